"""The iptables mode's render module: DesiredState -> iptables-restore input, golden text.

Each golden test: the Kubernetes scenario in words, the objects as the API would serve them (fed
through ClusterModel, as the agent does), and the EXACT restore input a full sync writes. Chain
names are KPA-<kind>-<16 base32 chars of sha256(service port name + protocol [+ endpoint])>; the
ones used below are pinned by test_chain_names_are_stable_hashes.

Then the incremental behaviour of IptablesRenderer: partial syncs write only what changed.
"""

from __future__ import annotations

import random
import re
from textwrap import dedent
from typing import Any

from agent.backends.iptables import chains as C
from agent.backends.iptables.render import IptablesRenderer, RenderResult, base_rules
from agent.model.desired import DesiredState
from agent.model.records import EndpointSlice, Service, from_builtins
from agent.model.serviceport import NamespacedName, ServicePortName
from agent.model.state import ClusterModel

NODE = "node-a"
CLUSTER_CIDR = "10.244.0.0/16"
HTTP = [{"name": "http", "port": 80, "protocol": "TCP"}]
HTTP_NP = [{"name": "http", "port": 80, "protocol": "TCP", "nodePort": 30080}]
EP_HTTP = [{"name": "http", "port": 8080, "protocol": "TCP"}]
WEB = ServicePortName("ns", "web", "http", "TCP")
DB = ServicePortName("ns", "db", "http", "TCP")


def service(name: str, cluster_ip: str, ports: list[dict[str, Any]], *, status: dict[str, Any] | None = None,
            **spec: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {"kind": "Service", "metadata": {"namespace": "ns", "name": name},
                           "spec": {"clusterIP": cluster_ip, "clusterIPs": [cluster_ip], "ports": ports, **spec}}
    if status is not None:
        obj["status"] = status
    return obj


def endpoint(ip: str, node: str = "node-b", **conditions: bool) -> dict[str, Any]:
    return {"addresses": [ip], "nodeName": node, "conditions": conditions}


def endpoint_slice(name: str, svc: str, endpoints: list[dict[str, Any]], ports: list[dict[str, Any]] | None = None,
                   address_type: str = "IPv4") -> dict[str, Any]:
    return {"kind": "EndpointSlice",
            "metadata": {"namespace": "ns", "name": name, "labels": {"kubernetes.io/service-name": svc}},
            "addressType": address_type, "endpoints": endpoints, "ports": EP_HTTP if ports is None else ports}


class Node:
    """One node: the model fed with records, and one IptablesRenderer that remembers what it wrote."""

    def __init__(self, *, cluster_cidrs: tuple[str, ...] = (CLUSTER_CIDR,), masquerade_all: bool = False,
                 nodeport_cidrs: tuple[str, ...] = (), local_ips: tuple[str, ...] = (), family: int = 4) -> None:
        self.model = ClusterModel(NODE, cluster_cidrs, masquerade_all, nodeport_cidrs)
        self.model.set_local_ips(local_ips)
        self.renderer = IptablesRenderer()
        self.family = family

    def apply(self, *objs: dict[str, Any]) -> Node:
        for obj in objs:
            rec = from_builtins(obj["kind"], obj)
            key = NamespacedName("ns", obj["metadata"]["name"])
            if isinstance(rec, Service):
                self.model.on_service(key, rec)
            elif isinstance(rec, EndpointSlice):
                self.model.on_slice(key, rec)
        return self

    def delete(self, kind: str, name: str) -> None:
        key = NamespacedName("ns", name)
        if kind == "Service":
            self.model.on_service(key, None)
        else:
            self.model.on_slice(key, None)

    @property
    def desired(self) -> DesiredState:
        return self.model.desired[self.family]

    def sync(self, *, full: bool = False, existing: dict[str, set[str]] | None = None,
             batch_chains: int = 0) -> RenderResult:
        update = self.model.drain()
        return self.renderer.render(self.desired, update.changed[self.family], full=full or update.full,
                                    existing_chains=existing, batch_chains=batch_chains)


def full_text(*objs: dict[str, Any], **node: Any) -> str:
    return Node(**node).apply(*objs).sync(full=True).text


def expect(text: str) -> str:
    return dedent(text).lstrip("\n")


def test_chain_names_are_stable_hashes() -> None:
    """The names the goldens use. A change here renames every chain on upgrade (the old ones are
    then removed by the first full sync), so it must be deliberate."""
    assert C.service_chain("SVC", "ns/web:http", "TCP") == "KPA-SVC-5SSZ2E7KIPKI2VRR"
    assert C.service_chain("EXT", "ns/web:http", "TCP") == "KPA-EXT-5SSZ2E7KIPKI2VRR"
    assert C.endpoint_chain("ns/web:http", "TCP", "10.244.1.5:8080") == "KPA-SEP-PFO2MPPOACGHSRKR"
    assert C.endpoint_chain("ns/web:http", "TCP", "10.244.2.6:8080") == "KPA-SEP-JCWLNDCAE5RWD7YY"
    assert C.service_chain("SVC", "ns/web:http", "UDP") != C.service_chain("SVC", "ns/web:http", "TCP")


# -- golden full syncs -----------------------------------------------------------------------


def test_cluster_ip_with_two_endpoints() -> None:
    """A ClusterIP Service (10.96.0.10:80) with two ready endpoints on other nodes: the cluster IP
    jumps to KPA-SVC, which DNATs half the new connections to the first endpoint and the rest to the
    second (no endpoint chains: neither endpoint can reach itself through this node); traffic from
    outside the pod CIDR is marked for masquerade."""
    text = full_text(
        service("web", "10.96.0.10", HTTP),
        endpoint_slice("web-1", "web", [endpoint("10.244.1.5"), endpoint("10.244.2.6")]),
    )
    assert text == expect("""
        *filter
        :KPA-EXTERNAL-SERVICES - [0:0]
        :KPA-FORWARD - [0:0]
        :KPA-HEALTH-CHECKS - [0:0]
        :KPA-LOCALNET - [0:0]
        :KPA-SERVICES - [0:0]
        -A KPA-FORWARD -m mark --mark 0x4000/0x4000 -j ACCEPT
        -A KPA-FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
        COMMIT
        *nat
        :KPA-MARK-MASQ - [0:0]
        :KPA-MASQ-NOT-PODS - [0:0]
        :KPA-NODEPORTS - [0:0]
        :KPA-POSTROUTING - [0:0]
        :KPA-SERVICES - [0:0]
        :KPA-SVC-5SSZ2E7KIPKI2VRR - [0:0]
        -A KPA-MARK-MASQ -j MARK --or-mark 0x4000
        -A KPA-MASQ-NOT-PODS -s 10.244.0.0/16 -j RETURN
        -A KPA-MASQ-NOT-PODS -j KPA-MARK-MASQ
        -A KPA-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
        -A KPA-POSTROUTING -j MARK --xor-mark 0x4000
        -A KPA-POSTROUTING -m comment --comment "kube-proxy-agent service traffic requiring SNAT" -j MASQUERADE --random-fully
        -A KPA-SERVICES -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -m comment --comment "ns/web:http cluster IP" -j KPA-SVC-5SSZ2E7KIPKI2VRR
        -A KPA-SERVICES ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -m comment --comment "node ports" -j KPA-NODEPORTS
        -A KPA-SVC-5SSZ2E7KIPKI2VRR ! -s 10.244.0.0/16 -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -j KPA-MARK-MASQ
        -A KPA-SVC-5SSZ2E7KIPKI2VRR -m statistic --mode random --probability 0.5000000000 -p tcp -j DNAT --to-destination 10.244.1.5:8080
        -A KPA-SVC-5SSZ2E7KIPKI2VRR -p tcp -j DNAT --to-destination 10.244.2.6:8080
        COMMIT
        *mangle
        :KPA-FIREWALL - [0:0]
        COMMIT
        """)  # noqa: E501


def test_node_port_with_external_traffic_policy_cluster() -> None:
    """A NodePort Service (nodePort 30080), externalTrafficPolicy Cluster: any local address on 30080
    enters KPA-EXT, which masquerades (the endpoint may be on another node) and goes to KPA-SVC."""
    text = full_text(
        service("web", "10.96.0.10", HTTP_NP, type="NodePort"),
        endpoint_slice("web-1", "web", [endpoint("10.244.1.5")]),
    )
    assert text == expect("""
        *filter
        :KPA-EXTERNAL-SERVICES - [0:0]
        :KPA-FORWARD - [0:0]
        :KPA-HEALTH-CHECKS - [0:0]
        :KPA-LOCALNET - [0:0]
        :KPA-SERVICES - [0:0]
        -A KPA-FORWARD -m mark --mark 0x4000/0x4000 -j ACCEPT
        -A KPA-FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
        COMMIT
        *nat
        :KPA-EXT-5SSZ2E7KIPKI2VRR - [0:0]
        :KPA-MARK-MASQ - [0:0]
        :KPA-MASQ-NOT-PODS - [0:0]
        :KPA-NODEPORTS - [0:0]
        :KPA-POSTROUTING - [0:0]
        :KPA-SERVICES - [0:0]
        :KPA-SVC-5SSZ2E7KIPKI2VRR - [0:0]
        -A KPA-EXT-5SSZ2E7KIPKI2VRR -j KPA-MARK-MASQ
        -A KPA-EXT-5SSZ2E7KIPKI2VRR -j KPA-SVC-5SSZ2E7KIPKI2VRR
        -A KPA-MARK-MASQ -j MARK --or-mark 0x4000
        -A KPA-MASQ-NOT-PODS -s 10.244.0.0/16 -j RETURN
        -A KPA-MASQ-NOT-PODS -j KPA-MARK-MASQ
        -A KPA-NODEPORTS -p tcp -m tcp --dport 30080 -m comment --comment "ns/web:http node port" -j KPA-EXT-5SSZ2E7KIPKI2VRR
        -A KPA-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
        -A KPA-POSTROUTING -j MARK --xor-mark 0x4000
        -A KPA-POSTROUTING -m comment --comment "kube-proxy-agent service traffic requiring SNAT" -j MASQUERADE --random-fully
        -A KPA-SERVICES -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -m comment --comment "ns/web:http cluster IP" -j KPA-SVC-5SSZ2E7KIPKI2VRR
        -A KPA-SERVICES ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -m comment --comment "node ports" -j KPA-NODEPORTS
        -A KPA-SVC-5SSZ2E7KIPKI2VRR ! -s 10.244.0.0/16 -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -j KPA-MARK-MASQ
        -A KPA-SVC-5SSZ2E7KIPKI2VRR -p tcp -j DNAT --to-destination 10.244.1.5:8080
        COMMIT
        *mangle
        :KPA-FIREWALL - [0:0]
        COMMIT
        """)  # noqa: E501


def test_service_without_endpoints_is_rejected() -> None:
    """A ClusterIP Service with no endpoint anywhere: new connections to the cluster IP are rejected
    (the client sees "connection refused" at once) in the filter table; nothing in nat."""
    text = full_text(service("web", "10.96.0.10", HTTP), endpoint_slice("web-1", "web", []))
    assert text == expect("""
        *filter
        :KPA-EXTERNAL-SERVICES - [0:0]
        :KPA-FORWARD - [0:0]
        :KPA-HEALTH-CHECKS - [0:0]
        :KPA-LOCALNET - [0:0]
        :KPA-SERVICES - [0:0]
        -A KPA-FORWARD -m mark --mark 0x4000/0x4000 -j ACCEPT
        -A KPA-FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
        -A KPA-SERVICES -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -m comment --comment "ns/web:http has no endpoints" -j REJECT
        COMMIT
        *nat
        :KPA-MARK-MASQ - [0:0]
        :KPA-MASQ-NOT-PODS - [0:0]
        :KPA-NODEPORTS - [0:0]
        :KPA-POSTROUTING - [0:0]
        :KPA-SERVICES - [0:0]
        -A KPA-MARK-MASQ -j MARK --or-mark 0x4000
        -A KPA-MASQ-NOT-PODS -s 10.244.0.0/16 -j RETURN
        -A KPA-MASQ-NOT-PODS -j KPA-MARK-MASQ
        -A KPA-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
        -A KPA-POSTROUTING -j MARK --xor-mark 0x4000
        -A KPA-POSTROUTING -m comment --comment "kube-proxy-agent service traffic requiring SNAT" -j MASQUERADE --random-fully
        -A KPA-SERVICES ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -m comment --comment "node ports" -j KPA-NODEPORTS
        COMMIT
        *mangle
        :KPA-FIREWALL - [0:0]
        COMMIT
        """)  # noqa: E501


def test_external_traffic_policy_local_with_local_and_remote_endpoints() -> None:
    """NodePort, externalTrafficPolicy Local, one endpoint on this node and one elsewhere. External
    clients keep their source IP and reach only the local endpoint (KPA-EXT -> KPA-SVL); pods (the
    cluster CIDR) and the node itself short-circuit to every endpoint (KPA-SVC), the node's own
    traffic masqueraded because its source is a local address."""
    text = full_text(
        service("web", "10.96.0.10", HTTP_NP, type="NodePort", externalTrafficPolicy="Local"),
        endpoint_slice("web-1", "web", [endpoint("10.244.1.5", node=NODE), endpoint("10.244.2.6")]),
    )
    assert text == expect("""
        *filter
        :KPA-EXTERNAL-SERVICES - [0:0]
        :KPA-FORWARD - [0:0]
        :KPA-HEALTH-CHECKS - [0:0]
        :KPA-LOCALNET - [0:0]
        :KPA-SERVICES - [0:0]
        -A KPA-FORWARD -m mark --mark 0x4000/0x4000 -j ACCEPT
        -A KPA-FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
        COMMIT
        *nat
        :KPA-EXT-5SSZ2E7KIPKI2VRR - [0:0]
        :KPA-MARK-MASQ - [0:0]
        :KPA-MASQ-NOT-PODS - [0:0]
        :KPA-NODEPORTS - [0:0]
        :KPA-POSTROUTING - [0:0]
        :KPA-SEP-JCWLNDCAE5RWD7YY - [0:0]
        :KPA-SEP-PFO2MPPOACGHSRKR - [0:0]
        :KPA-SERVICES - [0:0]
        :KPA-SVC-5SSZ2E7KIPKI2VRR - [0:0]
        :KPA-SVL-5SSZ2E7KIPKI2VRR - [0:0]
        -A KPA-EXT-5SSZ2E7KIPKI2VRR -s 10.244.0.0/16 -j KPA-SVC-5SSZ2E7KIPKI2VRR
        -A KPA-EXT-5SSZ2E7KIPKI2VRR -m addrtype --src-type LOCAL -j KPA-MARK-MASQ
        -A KPA-EXT-5SSZ2E7KIPKI2VRR -m addrtype --src-type LOCAL -j KPA-SVC-5SSZ2E7KIPKI2VRR
        -A KPA-EXT-5SSZ2E7KIPKI2VRR -j KPA-SVL-5SSZ2E7KIPKI2VRR
        -A KPA-MARK-MASQ -j MARK --or-mark 0x4000
        -A KPA-MASQ-NOT-PODS -s 10.244.0.0/16 -j RETURN
        -A KPA-MASQ-NOT-PODS -j KPA-MARK-MASQ
        -A KPA-NODEPORTS -p tcp -m tcp --dport 30080 -m comment --comment "ns/web:http node port" -j KPA-EXT-5SSZ2E7KIPKI2VRR
        -A KPA-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
        -A KPA-POSTROUTING -j MARK --xor-mark 0x4000
        -A KPA-POSTROUTING -m comment --comment "kube-proxy-agent service traffic requiring SNAT" -j MASQUERADE --random-fully
        -A KPA-SEP-JCWLNDCAE5RWD7YY -s 10.244.2.6/32 -j KPA-MARK-MASQ
        -A KPA-SEP-JCWLNDCAE5RWD7YY -p tcp -j DNAT --to-destination 10.244.2.6:8080
        -A KPA-SEP-PFO2MPPOACGHSRKR -s 10.244.1.5/32 -j KPA-MARK-MASQ
        -A KPA-SEP-PFO2MPPOACGHSRKR -p tcp -j DNAT --to-destination 10.244.1.5:8080
        -A KPA-SERVICES -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -m comment --comment "ns/web:http cluster IP" -j KPA-SVC-5SSZ2E7KIPKI2VRR
        -A KPA-SERVICES ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -m comment --comment "node ports" -j KPA-NODEPORTS
        -A KPA-SVC-5SSZ2E7KIPKI2VRR ! -s 10.244.0.0/16 -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -j KPA-MARK-MASQ
        -A KPA-SVC-5SSZ2E7KIPKI2VRR -m statistic --mode random --probability 0.5000000000 -j KPA-SEP-PFO2MPPOACGHSRKR
        -A KPA-SVC-5SSZ2E7KIPKI2VRR -j KPA-SEP-JCWLNDCAE5RWD7YY
        -A KPA-SVL-5SSZ2E7KIPKI2VRR ! -s 10.244.0.0/16 -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -j KPA-MARK-MASQ
        -A KPA-SVL-5SSZ2E7KIPKI2VRR -j KPA-SEP-PFO2MPPOACGHSRKR
        COMMIT
        *mangle
        :KPA-FIREWALL - [0:0]
        COMMIT
        """)  # noqa: E501


def test_external_traffic_policy_local_with_only_remote_endpoints() -> None:
    """NodePort, externalTrafficPolicy Local, the only endpoint on another node: pods and the node still
    reach it through KPA-EXT's short circuits; every other external packet falls through KPA-EXT
    un-DNATed and is dropped (not rejected: the Service has endpoints, just none here) in
    KPA-EXTERNAL-SERVICES, so the load balancer's health check takes this node out."""
    text = full_text(
        service("web", "10.96.0.10", HTTP_NP, type="NodePort", externalTrafficPolicy="Local"),
        endpoint_slice("web-1", "web", [endpoint("10.244.2.6")]),
    )
    assert text == expect("""
        *filter
        :KPA-EXTERNAL-SERVICES - [0:0]
        :KPA-FORWARD - [0:0]
        :KPA-HEALTH-CHECKS - [0:0]
        :KPA-LOCALNET - [0:0]
        :KPA-SERVICES - [0:0]
        -A KPA-EXTERNAL-SERVICES -m addrtype --dst-type LOCAL -p tcp -m tcp --dport 30080 -m comment --comment "ns/web:http has no local endpoints" -j DROP
        -A KPA-FORWARD -m mark --mark 0x4000/0x4000 -j ACCEPT
        -A KPA-FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
        COMMIT
        *nat
        :KPA-EXT-5SSZ2E7KIPKI2VRR - [0:0]
        :KPA-MARK-MASQ - [0:0]
        :KPA-MASQ-NOT-PODS - [0:0]
        :KPA-NODEPORTS - [0:0]
        :KPA-POSTROUTING - [0:0]
        :KPA-SEP-JCWLNDCAE5RWD7YY - [0:0]
        :KPA-SERVICES - [0:0]
        :KPA-SVC-5SSZ2E7KIPKI2VRR - [0:0]
        -A KPA-EXT-5SSZ2E7KIPKI2VRR -s 10.244.0.0/16 -j KPA-SVC-5SSZ2E7KIPKI2VRR
        -A KPA-EXT-5SSZ2E7KIPKI2VRR -m addrtype --src-type LOCAL -j KPA-MARK-MASQ
        -A KPA-EXT-5SSZ2E7KIPKI2VRR -m addrtype --src-type LOCAL -j KPA-SVC-5SSZ2E7KIPKI2VRR
        -A KPA-MARK-MASQ -j MARK --or-mark 0x4000
        -A KPA-MASQ-NOT-PODS -s 10.244.0.0/16 -j RETURN
        -A KPA-MASQ-NOT-PODS -j KPA-MARK-MASQ
        -A KPA-NODEPORTS -p tcp -m tcp --dport 30080 -m comment --comment "ns/web:http node port" -j KPA-EXT-5SSZ2E7KIPKI2VRR
        -A KPA-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
        -A KPA-POSTROUTING -j MARK --xor-mark 0x4000
        -A KPA-POSTROUTING -m comment --comment "kube-proxy-agent service traffic requiring SNAT" -j MASQUERADE --random-fully
        -A KPA-SEP-JCWLNDCAE5RWD7YY -s 10.244.2.6/32 -j KPA-MARK-MASQ
        -A KPA-SEP-JCWLNDCAE5RWD7YY -p tcp -j DNAT --to-destination 10.244.2.6:8080
        -A KPA-SERVICES -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -m comment --comment "ns/web:http cluster IP" -j KPA-SVC-5SSZ2E7KIPKI2VRR
        -A KPA-SERVICES ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -m comment --comment "node ports" -j KPA-NODEPORTS
        -A KPA-SVC-5SSZ2E7KIPKI2VRR ! -s 10.244.0.0/16 -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -j KPA-MARK-MASQ
        -A KPA-SVC-5SSZ2E7KIPKI2VRR -j KPA-SEP-JCWLNDCAE5RWD7YY
        COMMIT
        *mangle
        :KPA-FIREWALL - [0:0]
        COMMIT
        """)  # noqa: E501


def test_internal_traffic_policy_local() -> None:
    """internalTrafficPolicy Local, one endpoint here and one elsewhere: the cluster IP goes to the
    local endpoint only (KPA-SVL); no KPA-SVC chain is needed at all."""
    text = full_text(
        service("web", "10.96.0.10", HTTP, internalTrafficPolicy="Local"),
        endpoint_slice("web-1", "web", [endpoint("10.244.1.5", node=NODE), endpoint("10.244.2.6")]),
    )
    assert text == expect("""
        *filter
        :KPA-EXTERNAL-SERVICES - [0:0]
        :KPA-FORWARD - [0:0]
        :KPA-HEALTH-CHECKS - [0:0]
        :KPA-LOCALNET - [0:0]
        :KPA-SERVICES - [0:0]
        -A KPA-FORWARD -m mark --mark 0x4000/0x4000 -j ACCEPT
        -A KPA-FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
        COMMIT
        *nat
        :KPA-MARK-MASQ - [0:0]
        :KPA-MASQ-NOT-PODS - [0:0]
        :KPA-NODEPORTS - [0:0]
        :KPA-POSTROUTING - [0:0]
        :KPA-SEP-PFO2MPPOACGHSRKR - [0:0]
        :KPA-SERVICES - [0:0]
        :KPA-SVL-5SSZ2E7KIPKI2VRR - [0:0]
        -A KPA-MARK-MASQ -j MARK --or-mark 0x4000
        -A KPA-MASQ-NOT-PODS -s 10.244.0.0/16 -j RETURN
        -A KPA-MASQ-NOT-PODS -j KPA-MARK-MASQ
        -A KPA-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
        -A KPA-POSTROUTING -j MARK --xor-mark 0x4000
        -A KPA-POSTROUTING -m comment --comment "kube-proxy-agent service traffic requiring SNAT" -j MASQUERADE --random-fully
        -A KPA-SEP-PFO2MPPOACGHSRKR -s 10.244.1.5/32 -j KPA-MARK-MASQ
        -A KPA-SEP-PFO2MPPOACGHSRKR -p tcp -j DNAT --to-destination 10.244.1.5:8080
        -A KPA-SERVICES -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -m comment --comment "ns/web:http cluster IP" -j KPA-SVL-5SSZ2E7KIPKI2VRR
        -A KPA-SERVICES ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -m comment --comment "node ports" -j KPA-NODEPORTS
        -A KPA-SVL-5SSZ2E7KIPKI2VRR ! -s 10.244.0.0/16 -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -j KPA-MARK-MASQ
        -A KPA-SVL-5SSZ2E7KIPKI2VRR -j KPA-SEP-PFO2MPPOACGHSRKR
        COMMIT
        *mangle
        :KPA-FIREWALL - [0:0]
        COMMIT
        """)  # noqa: E501


def test_internal_traffic_policy_local_without_local_endpoint_drops() -> None:
    """internalTrafficPolicy Local and no endpoint on this node: cluster-IP traffic is dropped, not
    rejected, since the Service does have endpoints elsewhere."""
    text = full_text(
        service("web", "10.96.0.10", HTTP, internalTrafficPolicy="Local"),
        endpoint_slice("web-1", "web", [endpoint("10.244.2.6")]),
    )
    service_lines = [line for line in text.splitlines() if "ns/web" in line]
    assert service_lines == [
        '-A KPA-SERVICES -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -m comment --comment "ns/web:http has no endpoints"'
        " -j DROP",
    ]
    assert "KPA-SEP-" not in text


def test_session_affinity_client_ip() -> None:
    """sessionAffinity ClientIP, timeoutSeconds 600: each endpoint chain records the client address
    (recent --set); the service chain first sends a client seen in the last 600s back to its endpoint
    (recent --rcheck), and only new clients are spread at random."""
    text = full_text(
        service("web", "10.96.0.10", HTTP, sessionAffinity="ClientIP",
                sessionAffinityConfig={"clientIP": {"timeoutSeconds": 600}}),
        endpoint_slice("web-1", "web", [endpoint("10.244.1.5"), endpoint("10.244.2.6")]),
    )
    assert text == expect("""
        *filter
        :KPA-EXTERNAL-SERVICES - [0:0]
        :KPA-FORWARD - [0:0]
        :KPA-HEALTH-CHECKS - [0:0]
        :KPA-LOCALNET - [0:0]
        :KPA-SERVICES - [0:0]
        -A KPA-FORWARD -m mark --mark 0x4000/0x4000 -j ACCEPT
        -A KPA-FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
        COMMIT
        *nat
        :KPA-MARK-MASQ - [0:0]
        :KPA-MASQ-NOT-PODS - [0:0]
        :KPA-NODEPORTS - [0:0]
        :KPA-POSTROUTING - [0:0]
        :KPA-SEP-JCWLNDCAE5RWD7YY - [0:0]
        :KPA-SEP-PFO2MPPOACGHSRKR - [0:0]
        :KPA-SERVICES - [0:0]
        :KPA-SVC-5SSZ2E7KIPKI2VRR - [0:0]
        -A KPA-MARK-MASQ -j MARK --or-mark 0x4000
        -A KPA-MASQ-NOT-PODS -s 10.244.0.0/16 -j RETURN
        -A KPA-MASQ-NOT-PODS -j KPA-MARK-MASQ
        -A KPA-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
        -A KPA-POSTROUTING -j MARK --xor-mark 0x4000
        -A KPA-POSTROUTING -m comment --comment "kube-proxy-agent service traffic requiring SNAT" -j MASQUERADE --random-fully
        -A KPA-SEP-JCWLNDCAE5RWD7YY -s 10.244.2.6/32 -j KPA-MARK-MASQ
        -A KPA-SEP-JCWLNDCAE5RWD7YY -p tcp -m recent --name KPA-SEP-JCWLNDCAE5RWD7YY --mask 255.255.255.255 --rsource --set -j DNAT --to-destination 10.244.2.6:8080
        -A KPA-SEP-PFO2MPPOACGHSRKR -s 10.244.1.5/32 -j KPA-MARK-MASQ
        -A KPA-SEP-PFO2MPPOACGHSRKR -p tcp -m recent --name KPA-SEP-PFO2MPPOACGHSRKR --mask 255.255.255.255 --rsource --set -j DNAT --to-destination 10.244.1.5:8080
        -A KPA-SERVICES -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -m comment --comment "ns/web:http cluster IP" -j KPA-SVC-5SSZ2E7KIPKI2VRR
        -A KPA-SERVICES ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -m comment --comment "node ports" -j KPA-NODEPORTS
        -A KPA-SVC-5SSZ2E7KIPKI2VRR ! -s 10.244.0.0/16 -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -j KPA-MARK-MASQ
        -A KPA-SVC-5SSZ2E7KIPKI2VRR -m recent --name KPA-SEP-PFO2MPPOACGHSRKR --mask 255.255.255.255 --rsource --rcheck --seconds 600 --reap -j KPA-SEP-PFO2MPPOACGHSRKR
        -A KPA-SVC-5SSZ2E7KIPKI2VRR -m recent --name KPA-SEP-JCWLNDCAE5RWD7YY --mask 255.255.255.255 --rsource --rcheck --seconds 600 --reap -j KPA-SEP-JCWLNDCAE5RWD7YY
        -A KPA-SVC-5SSZ2E7KIPKI2VRR -m statistic --mode random --probability 0.5000000000 -j KPA-SEP-PFO2MPPOACGHSRKR
        -A KPA-SVC-5SSZ2E7KIPKI2VRR -j KPA-SEP-JCWLNDCAE5RWD7YY
        COMMIT
        *mangle
        :KPA-FIREWALL - [0:0]
        COMMIT
        """)  # noqa: E501


def test_load_balancer_with_source_ranges() -> None:
    """A LoadBalancer Service with ingress IP 203.0.113.7 and loadBalancerSourceRanges 192.0.2.0/24 and
    198.51.100.0/24: the LB IP is served like a node port (KPA-EXT), and in mangle, before any NAT,
    packets for the LB IP from other sources are dropped (KPA-FIREWALL -> KPA-FW-)."""
    text = full_text(
        service("web", "10.96.0.10", HTTP_NP, type="LoadBalancer",
                loadBalancerSourceRanges=["192.0.2.0/24", " 198.51.100.0/24"],
                status={"loadBalancer": {"ingress": [{"ip": "203.0.113.7"}]}}),
        endpoint_slice("web-1", "web", [endpoint("10.244.1.5")]),
    )
    assert text == expect("""
        *filter
        :KPA-EXTERNAL-SERVICES - [0:0]
        :KPA-FORWARD - [0:0]
        :KPA-HEALTH-CHECKS - [0:0]
        :KPA-LOCALNET - [0:0]
        :KPA-SERVICES - [0:0]
        -A KPA-FORWARD -m mark --mark 0x4000/0x4000 -j ACCEPT
        -A KPA-FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
        COMMIT
        *nat
        :KPA-EXT-5SSZ2E7KIPKI2VRR - [0:0]
        :KPA-MARK-MASQ - [0:0]
        :KPA-MASQ-NOT-PODS - [0:0]
        :KPA-NODEPORTS - [0:0]
        :KPA-POSTROUTING - [0:0]
        :KPA-SERVICES - [0:0]
        :KPA-SVC-5SSZ2E7KIPKI2VRR - [0:0]
        -A KPA-EXT-5SSZ2E7KIPKI2VRR -j KPA-MARK-MASQ
        -A KPA-EXT-5SSZ2E7KIPKI2VRR -j KPA-SVC-5SSZ2E7KIPKI2VRR
        -A KPA-MARK-MASQ -j MARK --or-mark 0x4000
        -A KPA-MASQ-NOT-PODS -s 10.244.0.0/16 -j RETURN
        -A KPA-MASQ-NOT-PODS -j KPA-MARK-MASQ
        -A KPA-NODEPORTS -p tcp -m tcp --dport 30080 -m comment --comment "ns/web:http node port" -j KPA-EXT-5SSZ2E7KIPKI2VRR
        -A KPA-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
        -A KPA-POSTROUTING -j MARK --xor-mark 0x4000
        -A KPA-POSTROUTING -m comment --comment "kube-proxy-agent service traffic requiring SNAT" -j MASQUERADE --random-fully
        -A KPA-SERVICES -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -m comment --comment "ns/web:http cluster IP" -j KPA-SVC-5SSZ2E7KIPKI2VRR
        -A KPA-SERVICES -d 203.0.113.7/32 -p tcp -m tcp --dport 80 -m comment --comment "ns/web:http load balancer IP" -j KPA-EXT-5SSZ2E7KIPKI2VRR
        -A KPA-SERVICES ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -m comment --comment "node ports" -j KPA-NODEPORTS
        -A KPA-SVC-5SSZ2E7KIPKI2VRR ! -s 10.244.0.0/16 -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -j KPA-MARK-MASQ
        -A KPA-SVC-5SSZ2E7KIPKI2VRR -p tcp -j DNAT --to-destination 10.244.1.5:8080
        COMMIT
        *mangle
        :KPA-FIREWALL - [0:0]
        :KPA-FW-5SSZ2E7KIPKI2VRR - [0:0]
        -A KPA-FIREWALL -d 203.0.113.7/32 -p tcp -m tcp --dport 80 -j KPA-FW-5SSZ2E7KIPKI2VRR
        -A KPA-FW-5SSZ2E7KIPKI2VRR -s 192.0.2.0/24 -j RETURN
        -A KPA-FW-5SSZ2E7KIPKI2VRR -s 198.51.100.0/24 -j RETURN
        -A KPA-FW-5SSZ2E7KIPKI2VRR -m comment --comment "ns/web:http source not in loadBalancerSourceRanges" -j DROP
        COMMIT
        """)  # noqa: E501


def test_endpoint_chains_only_where_hairpin_or_affinity_needs_one() -> None:
    """An endpoint gets a KPA-SEP- chain (hairpin mark, then DNAT) when a connection to it may come
    from itself unmasqueraded: it is on this node or names no node, or pods of other nodes reach
    this node's cluster chain unmasqueraded (a node port with externalTrafficPolicy Local; with
    Cluster, everything from outside is masqueraded anyway); or when ClientIP affinity records it.
    Any other is DNATed from the service chain."""
    local, remote, unnamed = "10.244.1.5", "10.244.2.6", "10.244.3.7"
    eps = [endpoint(local, NODE), endpoint(remote), {"addresses": [unnamed], "conditions": {}}]

    def seps(text: str) -> set[str]:
        return set(re.findall(r"^-A KPA-SEP-\w+ -s ([\d.]+)/32 -j KPA-MARK-MASQ$", text, flags=re.M))

    def direct(text: str) -> set[str]:
        return set(re.findall(r"^-A KPA-SVC-\w+ .*-j DNAT --to-destination ([\d.]+):8080$", text, flags=re.M))

    cluster_ip = full_text(service("web", "10.96.0.10", HTTP), endpoint_slice("web-1", "web", eps))
    assert (seps(cluster_ip), direct(cluster_ip)) == ({local, unnamed}, {remote})
    node_port = full_text(service("web", "10.96.0.10", HTTP_NP, type="NodePort"),
                          endpoint_slice("web-1", "web", eps))
    assert (seps(node_port), direct(node_port)) == ({local, unnamed}, {remote})
    etp_local = full_text(service("web", "10.96.0.10", HTTP_NP, type="NodePort", externalTrafficPolicy="Local"),
                          endpoint_slice("web-1", "web", eps))
    assert (seps(etp_local), direct(etp_local)) == ({local, remote, unnamed}, set())
    sticky = full_text(service("web", "10.96.0.10", HTTP, sessionAffinity="ClientIP"),
                       endpoint_slice("web-1", "web", eps))
    assert (seps(sticky), direct(sticky)) == ({local, remote, unnamed}, set())


def test_ipv6_udp_service_with_three_endpoints() -> None:
    """An IPv6 UDP Service (DNS on [fd00:96::a]:53) with three endpoints: host matches are /128, the
    DNAT target is [ip]:port, the loopback exclusion is ::1/128, and the spread is 1/3, 1/2, rest."""
    text = full_text(
        service("dns", "fd00:96::a", [{"name": "dns", "port": 53, "protocol": "UDP"}]),
        endpoint_slice("dns-1", "dns", [endpoint("fd00:244::5"), endpoint("fd00:244::6"), endpoint("fd00:244::7")],
                       [{"name": "dns", "port": 5353, "protocol": "UDP"}], address_type="IPv6"),
        family=6, cluster_cidrs=("fd00:244::/48",),
    )
    assert text == expect("""
        *filter
        :KPA-EXTERNAL-SERVICES - [0:0]
        :KPA-FORWARD - [0:0]
        :KPA-HEALTH-CHECKS - [0:0]
        :KPA-LOCALNET - [0:0]
        :KPA-SERVICES - [0:0]
        -A KPA-FORWARD -m mark --mark 0x4000/0x4000 -j ACCEPT
        -A KPA-FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
        COMMIT
        *nat
        :KPA-MARK-MASQ - [0:0]
        :KPA-MASQ-NOT-PODS - [0:0]
        :KPA-NODEPORTS - [0:0]
        :KPA-POSTROUTING - [0:0]
        :KPA-SERVICES - [0:0]
        :KPA-SVC-AHMVK2QKEUIM3L6V - [0:0]
        -A KPA-MARK-MASQ -j MARK --or-mark 0x4000
        -A KPA-MASQ-NOT-PODS -s fd00:244::/48 -j RETURN
        -A KPA-MASQ-NOT-PODS -j KPA-MARK-MASQ
        -A KPA-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
        -A KPA-POSTROUTING -j MARK --xor-mark 0x4000
        -A KPA-POSTROUTING -m comment --comment "kube-proxy-agent service traffic requiring SNAT" -j MASQUERADE --random-fully
        -A KPA-SERVICES -d fd00:96::a/128 -p udp -m udp --dport 53 -m comment --comment "ns/dns:dns cluster IP" -j KPA-SVC-AHMVK2QKEUIM3L6V
        -A KPA-SERVICES ! -d ::1/128 -m addrtype --dst-type LOCAL -m comment --comment "node ports" -j KPA-NODEPORTS
        -A KPA-SVC-AHMVK2QKEUIM3L6V ! -s fd00:244::/48 -d fd00:96::a/128 -p udp -m udp --dport 53 -j KPA-MARK-MASQ
        -A KPA-SVC-AHMVK2QKEUIM3L6V -m statistic --mode random --probability 0.3333333333 -p udp -j DNAT --to-destination [fd00:244::5]:5353
        -A KPA-SVC-AHMVK2QKEUIM3L6V -m statistic --mode random --probability 0.5000000000 -p udp -j DNAT --to-destination [fd00:244::6]:5353
        -A KPA-SVC-AHMVK2QKEUIM3L6V -p udp -j DNAT --to-destination [fd00:244::7]:5353
        COMMIT
        *mangle
        :KPA-FIREWALL - [0:0]
        COMMIT
        """)  # noqa: E501


def test_masquerade_all_with_an_external_ip() -> None:
    """--masquerade-all (and no --cluster-cidr): every packet to the cluster IP is masqueraded; the
    externalIP 192.0.2.10 is served through KPA-EXT like a node port."""
    text = full_text(
        service("web", "10.96.0.10", HTTP, externalIPs=["192.0.2.10"]),
        endpoint_slice("web-1", "web", [endpoint("10.244.1.5")]),
        cluster_cidrs=(), masquerade_all=True,
    )
    assert text == expect("""
        *filter
        :KPA-EXTERNAL-SERVICES - [0:0]
        :KPA-FORWARD - [0:0]
        :KPA-HEALTH-CHECKS - [0:0]
        :KPA-LOCALNET - [0:0]
        :KPA-SERVICES - [0:0]
        -A KPA-FORWARD -m mark --mark 0x4000/0x4000 -j ACCEPT
        -A KPA-FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
        COMMIT
        *nat
        :KPA-EXT-5SSZ2E7KIPKI2VRR - [0:0]
        :KPA-MARK-MASQ - [0:0]
        :KPA-MASQ-NOT-PODS - [0:0]
        :KPA-NODEPORTS - [0:0]
        :KPA-POSTROUTING - [0:0]
        :KPA-SERVICES - [0:0]
        :KPA-SVC-5SSZ2E7KIPKI2VRR - [0:0]
        -A KPA-EXT-5SSZ2E7KIPKI2VRR -j KPA-MARK-MASQ
        -A KPA-EXT-5SSZ2E7KIPKI2VRR -j KPA-SVC-5SSZ2E7KIPKI2VRR
        -A KPA-MARK-MASQ -j MARK --or-mark 0x4000
        -A KPA-MASQ-NOT-PODS -j KPA-MARK-MASQ
        -A KPA-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
        -A KPA-POSTROUTING -j MARK --xor-mark 0x4000
        -A KPA-POSTROUTING -m comment --comment "kube-proxy-agent service traffic requiring SNAT" -j MASQUERADE --random-fully
        -A KPA-SERVICES -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -m comment --comment "ns/web:http cluster IP" -j KPA-SVC-5SSZ2E7KIPKI2VRR
        -A KPA-SERVICES -d 192.0.2.10/32 -p tcp -m tcp --dport 80 -m comment --comment "ns/web:http external IP" -j KPA-EXT-5SSZ2E7KIPKI2VRR
        -A KPA-SERVICES ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -m comment --comment "node ports" -j KPA-NODEPORTS
        -A KPA-SVC-5SSZ2E7KIPKI2VRR -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -j KPA-MARK-MASQ
        -A KPA-SVC-5SSZ2E7KIPKI2VRR -p tcp -j DNAT --to-destination 10.244.1.5:8080
        COMMIT
        *mangle
        :KPA-FIREWALL - [0:0]
        COMMIT
        """)  # noqa: E501


def test_two_cluster_cidrs() -> None:
    """--cluster-cidr 10.244.0.0/16,10.245.0.0/16 (say, a second pod range added later), NodePort with
    externalTrafficPolicy Local: "not from a pod" is "outside both ranges", so the service chains jump
    to KPA-MASQ-NOT-PODS, which returns for each pod range and marks the rest; the EXT chain's pod
    short circuit has one line per range."""
    text = full_text(
        service("web", "10.96.0.10", HTTP_NP, type="NodePort", externalTrafficPolicy="Local"),
        endpoint_slice("web-1", "web", [endpoint("10.244.1.5", node=NODE), endpoint("10.245.2.6")]),
        cluster_cidrs=("10.244.0.0/16", "10.245.0.0/16"),
    )
    assert text == expect("""
        *filter
        :KPA-EXTERNAL-SERVICES - [0:0]
        :KPA-FORWARD - [0:0]
        :KPA-HEALTH-CHECKS - [0:0]
        :KPA-LOCALNET - [0:0]
        :KPA-SERVICES - [0:0]
        -A KPA-FORWARD -m mark --mark 0x4000/0x4000 -j ACCEPT
        -A KPA-FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
        COMMIT
        *nat
        :KPA-EXT-5SSZ2E7KIPKI2VRR - [0:0]
        :KPA-MARK-MASQ - [0:0]
        :KPA-MASQ-NOT-PODS - [0:0]
        :KPA-NODEPORTS - [0:0]
        :KPA-POSTROUTING - [0:0]
        :KPA-SEP-DKQJRHXCFGEO5SI4 - [0:0]
        :KPA-SEP-PFO2MPPOACGHSRKR - [0:0]
        :KPA-SERVICES - [0:0]
        :KPA-SVC-5SSZ2E7KIPKI2VRR - [0:0]
        :KPA-SVL-5SSZ2E7KIPKI2VRR - [0:0]
        -A KPA-EXT-5SSZ2E7KIPKI2VRR -s 10.244.0.0/16 -j KPA-SVC-5SSZ2E7KIPKI2VRR
        -A KPA-EXT-5SSZ2E7KIPKI2VRR -s 10.245.0.0/16 -j KPA-SVC-5SSZ2E7KIPKI2VRR
        -A KPA-EXT-5SSZ2E7KIPKI2VRR -m addrtype --src-type LOCAL -j KPA-MARK-MASQ
        -A KPA-EXT-5SSZ2E7KIPKI2VRR -m addrtype --src-type LOCAL -j KPA-SVC-5SSZ2E7KIPKI2VRR
        -A KPA-EXT-5SSZ2E7KIPKI2VRR -j KPA-SVL-5SSZ2E7KIPKI2VRR
        -A KPA-MARK-MASQ -j MARK --or-mark 0x4000
        -A KPA-MASQ-NOT-PODS -s 10.244.0.0/16 -j RETURN
        -A KPA-MASQ-NOT-PODS -s 10.245.0.0/16 -j RETURN
        -A KPA-MASQ-NOT-PODS -j KPA-MARK-MASQ
        -A KPA-NODEPORTS -p tcp -m tcp --dport 30080 -m comment --comment "ns/web:http node port" -j KPA-EXT-5SSZ2E7KIPKI2VRR
        -A KPA-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
        -A KPA-POSTROUTING -j MARK --xor-mark 0x4000
        -A KPA-POSTROUTING -m comment --comment "kube-proxy-agent service traffic requiring SNAT" -j MASQUERADE --random-fully
        -A KPA-SEP-DKQJRHXCFGEO5SI4 -s 10.245.2.6/32 -j KPA-MARK-MASQ
        -A KPA-SEP-DKQJRHXCFGEO5SI4 -p tcp -j DNAT --to-destination 10.245.2.6:8080
        -A KPA-SEP-PFO2MPPOACGHSRKR -s 10.244.1.5/32 -j KPA-MARK-MASQ
        -A KPA-SEP-PFO2MPPOACGHSRKR -p tcp -j DNAT --to-destination 10.244.1.5:8080
        -A KPA-SERVICES -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -m comment --comment "ns/web:http cluster IP" -j KPA-SVC-5SSZ2E7KIPKI2VRR
        -A KPA-SERVICES ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -m comment --comment "node ports" -j KPA-NODEPORTS
        -A KPA-SVC-5SSZ2E7KIPKI2VRR -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -j KPA-MASQ-NOT-PODS
        -A KPA-SVC-5SSZ2E7KIPKI2VRR -m statistic --mode random --probability 0.5000000000 -j KPA-SEP-PFO2MPPOACGHSRKR
        -A KPA-SVC-5SSZ2E7KIPKI2VRR -j KPA-SEP-DKQJRHXCFGEO5SI4
        -A KPA-SVL-5SSZ2E7KIPKI2VRR -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -j KPA-MASQ-NOT-PODS
        -A KPA-SVL-5SSZ2E7KIPKI2VRR -j KPA-SEP-PFO2MPPOACGHSRKR
        COMMIT
        *mangle
        :KPA-FIREWALL - [0:0]
        COMMIT
        """)  # noqa: E501


def test_nodeport_addresses_and_a_node_port_without_endpoints() -> None:
    """--nodeport-addresses 192.168.0.0/16 on a node with 10.0.0.1, 127.0.0.1, 192.168.1.10 and
    192.168.2.20: only the two 192.168 addresses jump to KPA-NODEPORTS. The NodePort Service has no
    endpoints, so both the cluster IP and the node port are rejected."""
    text = full_text(
        service("web", "10.96.0.10", HTTP_NP, type="NodePort"),
        nodeport_cidrs=("192.168.0.0/16",), local_ips=("192.168.1.10", "10.0.0.1", "127.0.0.1", "192.168.2.20"),
    )
    assert text == expect("""
        *filter
        :KPA-EXTERNAL-SERVICES - [0:0]
        :KPA-FORWARD - [0:0]
        :KPA-HEALTH-CHECKS - [0:0]
        :KPA-LOCALNET - [0:0]
        :KPA-SERVICES - [0:0]
        -A KPA-EXTERNAL-SERVICES -m addrtype --dst-type LOCAL -p tcp -m tcp --dport 30080 -m comment --comment "ns/web:http has no endpoints" -j REJECT
        -A KPA-FORWARD -m mark --mark 0x4000/0x4000 -j ACCEPT
        -A KPA-FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
        -A KPA-SERVICES -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -m comment --comment "ns/web:http has no endpoints" -j REJECT
        COMMIT
        *nat
        :KPA-MARK-MASQ - [0:0]
        :KPA-MASQ-NOT-PODS - [0:0]
        :KPA-NODEPORTS - [0:0]
        :KPA-POSTROUTING - [0:0]
        :KPA-SERVICES - [0:0]
        -A KPA-MARK-MASQ -j MARK --or-mark 0x4000
        -A KPA-MASQ-NOT-PODS -s 10.244.0.0/16 -j RETURN
        -A KPA-MASQ-NOT-PODS -j KPA-MARK-MASQ
        -A KPA-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
        -A KPA-POSTROUTING -j MARK --xor-mark 0x4000
        -A KPA-POSTROUTING -m comment --comment "kube-proxy-agent service traffic requiring SNAT" -j MASQUERADE --random-fully
        -A KPA-SERVICES -d 192.168.1.10/32 -m comment --comment "node ports" -j KPA-NODEPORTS
        -A KPA-SERVICES -d 192.168.2.20/32 -m comment --comment "node ports" -j KPA-NODEPORTS
        COMMIT
        *mangle
        :KPA-FIREWALL - [0:0]
        COMMIT
        """)  # noqa: E501


# -- chain names -----------------------------------------------------------------------------

EVERY_FEATURE = (
    service("web", "10.96.0.10", HTTP_NP, type="LoadBalancer", externalTrafficPolicy="Local",
            sessionAffinity="ClientIP", externalIPs=["192.0.2.10"], loadBalancerSourceRanges=["192.0.2.0/24"],
            status={"loadBalancer": {"ingress": [{"ip": "203.0.113.7"}]}}),
    endpoint_slice("web-1", "web", [endpoint("10.244.1.5", node=NODE), endpoint("10.244.2.6")]),
    service("a-very-long-service-name-that-is-at-the-limit-of-sixty-three-chars", "10.96.0.11",
            [{"name": "a-fifteen-char-", "port": 65535, "protocol": "SCTP"}], internalTrafficPolicy="Local"),
)


def _chains_in(text: str) -> dict[str, list[str]]:
    """table -> the chains a restore input declares (`:NAME`), in order, repeats kept."""
    out: dict[str, list[str]] = {}
    table = ""
    for line in text.splitlines():
        if line.startswith("*"):
            table = line[1:]
        elif line.startswith(":"):
            out.setdefault(table, []).append(line[1:].split()[0])
    return out


def test_chain_names_start_with_kpa_and_fit_iptables() -> None:
    """Every chain the mode declares or jumps to is ours (KPA-, never KUBE-) and fits iptables'
    28-character chain name limit, whatever the Service and port names."""
    text = full_text(*EVERY_FEATURE)
    declared = _chains_in(text)
    targets = {t for t in re.findall(r"-j (\S+)", text) if t.isupper() and "-" in t}
    names = {n for chains in declared.values() for n in chains} | targets
    assert {n.split("-")[1] for n in names} >= {"SVC", "SVL", "EXT", "SEP", "FW"}  # every kind of chain
    for name in names:
        assert name.startswith("KPA-"), name
        assert len(name) <= 28, name
    for chains in declared.values():
        assert len(chains) == len(set(chains))  # each chain declared once per table


# -- incremental behaviour -------------------------------------------------------------------


def two_services() -> Node:
    """web and db, their endpoints on this node: each endpoint has its own chain (for the hairpin
    mark), so these tests see endpoint chains come and go."""
    node = Node().apply(
        service("web", "10.96.0.10", HTTP),
        endpoint_slice("web-1", "web", [endpoint("10.244.1.5", NODE), endpoint("10.244.2.6", NODE)]),
        service("db", "10.96.0.20", HTTP),
        endpoint_slice("db-1", "db", [endpoint("10.244.3.7", NODE)]),
    )
    node.sync(full=True)
    return node


def test_partial_sync_writes_only_the_changed_service() -> None:
    """After a full sync, web loses one of its two endpoints. The partial sync rewrites web's
    remaining chains, flushes and deletes the endpoint chain that went away, and leaves KPA-SERVICES
    (whose text did not change) and the db Service alone."""
    node = two_services()
    node.apply(endpoint_slice("web-1", "web", [endpoint("10.244.1.5", NODE)]))
    result = node.sync()
    assert result.text == expect("""
        *nat
        :KPA-SEP-JCWLNDCAE5RWD7YY - [0:0]
        :KPA-SEP-PFO2MPPOACGHSRKR - [0:0]
        :KPA-SVC-5SSZ2E7KIPKI2VRR - [0:0]
        -A KPA-SEP-PFO2MPPOACGHSRKR -s 10.244.1.5/32 -j KPA-MARK-MASQ
        -A KPA-SEP-PFO2MPPOACGHSRKR -p tcp -j DNAT --to-destination 10.244.1.5:8080
        -A KPA-SVC-5SSZ2E7KIPKI2VRR ! -s 10.244.0.0/16 -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -j KPA-MARK-MASQ
        -A KPA-SVC-5SSZ2E7KIPKI2VRR -j KPA-SEP-PFO2MPPOACGHSRKR
        -X KPA-SEP-JCWLNDCAE5RWD7YY
        COMMIT
        """)
    assert len(result.batches) == 1  # one atomic restore
    assert (result.rules, result.chains, result.deleted_chains) == (4, 2, 1)
    assert result.per_table == {"nat": 4}
    # What the tables hold afterwards. nat: MARK-MASQ 1 + MASQ-NOT-PODS 2 + POSTROUTING 3 + KPA-SERVICES 3
    # (two cluster IPs and the node-port jump) + web 4 (SEP 2, SVC 2) + db 4 (SEP 2, SVC 2).
    assert result.totals == {"filter": 2, "nat": 17, "mangle": 0}


def test_partial_syncs_keep_shared_chains_and_totals_as_a_full_render_has_them() -> None:
    """A partial sync rebuilds a shared chain only when a rendered port's lines there changed, and
    keeps each table's rule total as it goes (it no longer walks every port). After any mix of
    Services added, changed (endpoints, type) and deleted, the shared chains' text and the totals
    are those of a full render of the same state on a fresh renderer."""
    rng = random.Random(7)
    node = Node()
    for i in range(12):
        node.apply(service(f"s{i}", f"10.96.2.{i}", HTTP),
                   endpoint_slice(f"s{i}-1", f"s{i}", [endpoint(f"10.244.2.{i}")]))
    node.sync(full=True)
    for step in range(80):
        i = rng.randrange(16)  # s12..s15 start absent
        what = rng.choice(["endpoints", "nodeport", "delete"])
        if what == "delete":
            node.delete("Service", f"s{i}")
            node.delete("EndpointSlice", f"s{i}-1")
        else:
            eps = [endpoint(f"10.244.3.{rng.randrange(200)}", rng.choice([NODE, "node-b"]))
                   for _ in range(rng.randrange(3))]
            svc = (service(f"s{i}", f"10.96.2.{i}", HTTP_NP, type="NodePort") if what == "nodeport"
                   else service(f"s{i}", f"10.96.2.{i}", HTTP))
            node.apply(svc, endpoint_slice(f"s{i}-1", f"s{i}", eps))
        out = node.sync()
        fresh = IptablesRenderer()
        want = fresh.render(node.desired, (), full=True)
        assert out.totals == want.totals, step
        assert node.renderer._dispatch_text == fresh._dispatch_text, step


def test_partial_sync_with_nothing_changed_writes_nothing() -> None:
    node = two_services()
    result = node.sync()
    assert result.batches == []
    assert result.text == ""
    assert (result.rules, result.chains, result.deleted_chains) == (0, 0, 0)


def test_service_gaining_its_first_endpoint_rewrites_the_dispatch_chains() -> None:
    """db had no endpoints (REJECT in filter KPA-SERVICES); its first endpoint adds a jump to nat
    KPA-SERVICES and removes the REJECT, so both shared chains are rewritten with db's chains."""
    node = Node().apply(service("web", "10.96.0.10", HTTP),
                        endpoint_slice("web-1", "web", [endpoint("10.244.1.5")]),
                        service("db", "10.96.0.20", HTTP))
    node.sync(full=True)
    node.apply(endpoint_slice("db-1", "db", [endpoint("10.244.3.7")]))
    assert node.sync().text == expect("""
        *filter
        :KPA-SERVICES - [0:0]
        COMMIT
        *nat
        :KPA-SERVICES - [0:0]
        :KPA-SVC-BGWYRPPMUUSJXOUY - [0:0]
        -A KPA-SERVICES -d 10.96.0.20/32 -p tcp -m tcp --dport 80 -m comment --comment "ns/db:http cluster IP" -j KPA-SVC-BGWYRPPMUUSJXOUY
        -A KPA-SERVICES -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -m comment --comment "ns/web:http cluster IP" -j KPA-SVC-5SSZ2E7KIPKI2VRR
        -A KPA-SERVICES ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -m comment --comment "node ports" -j KPA-NODEPORTS
        -A KPA-SVC-BGWYRPPMUUSJXOUY ! -s 10.244.0.0/16 -d 10.96.0.20/32 -p tcp -m tcp --dport 80 -j KPA-MARK-MASQ
        -A KPA-SVC-BGWYRPPMUUSJXOUY -p tcp -j DNAT --to-destination 10.244.3.7:8080
        COMMIT
        """)  # noqa: E501


def test_removing_a_service_deletes_its_chains_and_rewrites_the_dispatch_chain() -> None:
    """db is deleted: nat KPA-SERVICES is rewritten without db's jump, then db's chains are flushed
    and deleted in the same restore (the order iptables-restore needs to delete a chain)."""
    node = two_services()
    node.delete("Service", "db")
    node.delete("EndpointSlice", "db-1")
    result = node.sync()
    assert result.text == expect("""
        *nat
        :KPA-SEP-LERGOJ2PLHEGXB2C - [0:0]
        :KPA-SERVICES - [0:0]
        :KPA-SVC-BGWYRPPMUUSJXOUY - [0:0]
        -A KPA-SERVICES -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -m comment --comment "ns/web:http cluster IP" -j KPA-SVC-5SSZ2E7KIPKI2VRR
        -A KPA-SERVICES ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -m comment --comment "node ports" -j KPA-NODEPORTS
        -X KPA-SEP-LERGOJ2PLHEGXB2C
        -X KPA-SVC-BGWYRPPMUUSJXOUY
        COMMIT
        """)  # noqa: E501
    assert result.deleted_chains == 2
    # MARK-MASQ, MASQ-NOT-PODS, POSTROUTING, KPA-SERVICES, web (2 SEPs + SVC)
    assert result.totals["nat"] == 1 + 2 + 3 + 2 + 7


def test_full_sync_with_existing_chains_deletes_leftovers() -> None:
    """A full sync told which KPA- chains the kernel holds (from iptables-save) deletes the ones no
    Service wants any more (say, from before a restart), and none that are wanted."""
    node = two_services()
    existing = {
        "nat": {"KPA-SERVICES", "KPA-NODEPORTS", "KPA-SVC-5SSZ2E7KIPKI2VRR", "KPA-SVC-LEFTOVER0000000",
                "KPA-SEP-LEFTOVER0000000"},
        "filter": {"KPA-SERVICES", "KPA-OLD-FILTER"},
        "mangle": {"KPA-FIREWALL", "KPA-FW-LEFTOVER00000000"},
    }
    text = node.sync(full=True, existing=existing).text
    assert re.findall(r"^-X (\S+)$", text, flags=re.M) == [
        "KPA-OLD-FILTER", "KPA-SEP-LEFTOVER0000000", "KPA-SVC-LEFTOVER0000000", "KPA-FW-LEFTOVER00000000",
    ]
    for gone in ("KPA-OLD-FILTER", "KPA-SEP-LEFTOVER0000000", "KPA-SVC-LEFTOVER0000000", "KPA-FW-LEFTOVER00000000"):
        assert f":{gone} - [0:0]\n" in text  # flushed before it is deleted
    assert "KPA-SVC-5SSZ2E7KIPKI2VRR" not in re.findall(r"^-X (\S+)$", text, flags=re.M)


def test_full_sync_after_a_partial_one_writes_everything() -> None:
    node = two_services()
    node.apply(endpoint_slice("web-1", "web", [endpoint("10.244.1.5", NODE)]))
    node.sync()
    fresh = Node().apply(
        service("web", "10.96.0.10", HTTP), endpoint_slice("web-1", "web", [endpoint("10.244.1.5", NODE)]),
        service("db", "10.96.0.20", HTTP), endpoint_slice("db-1", "db", [endpoint("10.244.3.7", NODE)]),
    )
    assert node.sync(full=True).text == fresh.sync(full=True).text


def test_reset_forces_the_dispatch_chains_to_be_rewritten() -> None:
    """After a failed restore the writer calls reset(): the renderer no longer trusts what it believes
    the shared chains hold, so even a partial sync with no change rewrites all six of them."""
    node = two_services()
    node.renderer.reset()
    assert not node.renderer.in_sync
    assert node.sync().text == expect("""
        *filter
        :KPA-EXTERNAL-SERVICES - [0:0]
        :KPA-HEALTH-CHECKS - [0:0]
        :KPA-SERVICES - [0:0]
        COMMIT
        *nat
        :KPA-NODEPORTS - [0:0]
        :KPA-SERVICES - [0:0]
        -A KPA-SERVICES -d 10.96.0.20/32 -p tcp -m tcp --dport 80 -m comment --comment "ns/db:http cluster IP" -j KPA-SVC-BGWYRPPMUUSJXOUY
        -A KPA-SERVICES -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -m comment --comment "ns/web:http cluster IP" -j KPA-SVC-5SSZ2E7KIPKI2VRR
        -A KPA-SERVICES ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -m comment --comment "node ports" -j KPA-NODEPORTS
        COMMIT
        *mangle
        :KPA-FIREWALL - [0:0]
        COMMIT
        """)  # noqa: E501
    assert node.sync().text == ""  # and after that, trusted again


def test_small_sync_stays_one_atomic_restore_even_with_batching() -> None:
    node = two_services()
    node.apply(endpoint_slice("web-1", "web", [endpoint("10.244.1.5")]))
    assert len(node.sync(batch_chains=2000).batches) == 1


def test_big_full_sync_is_split_into_batches_with_shared_chains_last() -> None:
    """iptables-nft-restore slows down with the chains in one input: above batch_chains the service
    chains go in several restores, and the shared chains that jump to them come in the last one."""
    node = Node()
    for i in range(6):
        node.apply(service(f"s{i}", f"10.96.1.{i}", HTTP),
                   endpoint_slice(f"s{i}-1", f"s{i}", [endpoint(f"10.244.1.{i + 1}", NODE)]))
    result = node.sync(full=True, batch_chains=4)
    assert len(result.batches) == 4  # base chains + 6 services * 2 chains in 3 batches, then dispatch
    assert ":KPA-SERVICES - [0:0]" in result.batches[-1]
    assert all(":KPA-SERVICES - [0:0]" not in b for b in result.batches[:-1])
    assert "KPA-MARK-MASQ - [0:0]" in result.batches[0]  # what every service chain jumps to comes first


def test_batched_sync_never_deletes_a_chain_still_jumped_to() -> None:
    """web loses its only endpoint while db changes, in a sync big enough to be batched: web's
    KPA-SVC may only be deleted in (or after) the restore that removes KPA-SERVICES' jump to it."""
    node = Node().apply(
        service("api", "10.96.0.10", HTTP), endpoint_slice("api-1", "api", [endpoint("10.244.1.5")]),
        service("web", "10.96.0.20", HTTP), endpoint_slice("web-1", "web", [endpoint("10.244.3.7")]),
    )
    node.sync(full=True)
    node.apply(endpoint_slice("api-1", "api", []),
               endpoint_slice("web-1", "web", [endpoint("10.244.3.7"), endpoint("10.244.3.8")]))
    result = node.sync(batch_chains=1)
    api_svc = C.service_chain("SVC", "ns/api:http", "TCP")
    deleted_in = next(i for i, b in enumerate(result.batches) if f"-X {api_svc}\n" in b)
    unjumped_in = next(i for i, b in enumerate(result.batches) if "\n:KPA-SERVICES - [0:0]\n" in b)
    assert deleted_in >= unjumped_in


# -- drift -----------------------------------------------------------------------------------


def kernel_counts(node: Node) -> dict[tuple[str, str], int]:
    """Rules per chain, as iptables-save would show them right after the last full render."""
    counts: dict[tuple[str, str], int] = {}
    table = ""
    for line in IptablesRenderer().render(node.desired, (), full=True).text.splitlines():
        if line.startswith("*"):
            table = line[1:]
        elif line.startswith(":"):
            counts.setdefault((table, line[1:].split()[0]), 0)
        elif line.startswith("-A "):
            key = (table, line.split()[1])
            counts[key] = counts.get(key, 0) + 1
    return counts


def test_drift_before_any_full_write_asks_for_a_full_rewrite() -> None:
    node = two_services()
    assert node.renderer.drift({}) is None  # in_sync is only set by the writer after a full write


def test_drift_finds_the_service_whose_chain_changed() -> None:
    """Someone flushed web's KPA-SVC chain by hand: only web needs rewriting."""
    node = two_services()
    node.renderer.in_sync = True
    counts = kernel_counts(node)
    assert node.renderer.drift(counts) == set()
    counts[("nat", C.service_chain("SVC", "ns/web:http", "TCP"))] = 0
    assert node.renderer.drift(counts) == {WEB}


def test_drift_in_a_base_chain_asks_for_a_full_rewrite() -> None:
    node = two_services()
    node.renderer.in_sync = True
    counts = kernel_counts(node)
    counts[("nat", C.POSTROUTING)] = 0
    assert node.renderer.drift(counts) is None


def test_drift_in_a_shared_chain_rewrites_it_on_the_next_sync() -> None:
    node = two_services()
    node.renderer.in_sync = True
    counts = kernel_counts(node)
    counts[("nat", C.SERVICES)] = 0
    assert node.renderer.drift(counts) == set()
    assert ":KPA-SERVICES - [0:0]" in node.sync().text


def checked_services() -> tuple[Node, dict[tuple[str, str], int], dict[tuple[str, str], int],
                                dict[tuple[str, str], int]]:
    """Two services written in full: (node, rule counts and chain digests as a check would read
    them, the same digests with web's service chain edited in place)."""
    node = two_services()
    node.renderer.in_sync = True
    counts = kernel_counts(node)
    digests = {key: hash(key) for key in counts}
    svc = ("nat", C.service_chain("SVC", "ns/web:http", "TCP"))
    return node, counts, digests, {**digests, svc: digests[svc] + 1}


def test_drift_finds_a_rule_edited_in_place_once_its_chain_was_seen_as_written() -> None:
    """Same rule count, different rules: found from the second check on (the first check records
    how the kernel prints each chain written since the previous one)."""
    node, counts, digests, edited = checked_services()
    assert node.renderer.drift(counts, digests) == set()  # the first check: nothing to compare with yet
    assert node.renderer.drift(counts, digests) == set()
    assert node.renderer.drift(counts, edited) == {WEB}
    # web gets rewritten: its chains are unchecked again until the next check records them
    node.renderer.render(node.desired, {WEB}, full=False)
    assert node.renderer.drift(counts, edited) == set()
    assert node.renderer.drift(counts, digests) == {WEB}


def test_ports_written_before_a_foreign_commit_are_not_digested_but_left_to_rewrite() -> None:
    """A check after someone else committed (digest_unchecked=False) does not take a port written
    since the last check as the kernel shows it (it may have been edited already): the port stays
    unchecked, for the writer to rewrite; a later check with nobody in between records it."""
    node, counts, digests, edited = checked_services()
    assert node.renderer.unchecked >= {WEB} and node.renderer.as_written
    assert node.renderer.drift(counts, edited, digest_unchecked=False) == set()
    assert WEB in node.renderer.unchecked
    assert node.renderer.drift(counts, digests) == set() and not node.renderer.unchecked
    assert node.renderer.drift(counts, edited) == {WEB}


def test_a_port_rewritten_by_a_check_takes_its_digest_at_the_next_one_whoever_committed() -> None:
    """On a node where someone else commits between most checks, a port rewritten because of that
    is not rewritten again at every later check: the next read-back records it."""
    node, counts, digests, _ = checked_services()
    assert node.renderer.drift(counts, digests, digest_unchecked=False) == set()
    reassert = node.renderer.unchecked
    node.renderer.render(node.desired, reassert, full=False)
    node.renderer.mark_reasserted(reassert)
    assert node.renderer.reasserted == reassert
    assert node.renderer.drift(counts, digests, digest_unchecked=False) == set()
    assert not node.renderer.unchecked and not node.renderer.reasserted


def test_periodic_sync_with_a_change_deletes_each_old_chain_once() -> None:
    """Issue 15: a periodic full sync (told the kernel's chains by iptables-save) in which a port's
    endpoints also changed listed the replaced endpoint chain twice: once as the port's own
    leftover and once as a chain the kernel has and nobody wants. The second `-X` of one input
    failed ("No chain/target/match by that name") and the whole restore was refused. Each chain is
    deleted once, in one of the restores, batched or not."""
    for batch in (0, 1):
        node = two_services()
        existing = {t: set(chains) for t, chains in _chains_in(node.sync(full=True).text).items()}
        node.apply(endpoint_slice("web-1", "web", [endpoint("10.244.1.5", NODE), endpoint("10.244.9.9", NODE)]))
        update = node.model.drain()
        out = node.renderer.render(node.desired, update.changed[node.family], full=False,
                                   existing_chains=existing, batch_chains=batch)
        deletions = [c for text in out.batches for c in re.findall(r"^-X (\S+)$", text, flags=re.M)]
        assert deletions == ["KPA-SEP-JCWLNDCAE5RWD7YY"], (batch, out.batches)
        assert out.deleted_chains == 1


def test_a_refused_batch_costs_that_batch_not_a_full_rewrite() -> None:
    """Issue 15: a periodic sync writing service chains in several restores had one refused. The
    restores before it went in; the next sync rewrites the ports of the refused restore and later
    ones (and the shared chains), not every chain of every port."""
    node = Node().apply(*(obj for i in range(6) for obj in (
        service(f"s{i}", f"10.96.0.{10 + i}", HTTP),
        endpoint_slice(f"s{i}-1", f"s{i}", [endpoint(f"10.244.1.{10 + i}")]))))
    node.sync(full=True)
    node.renderer.in_sync = True  # as the writer marks it after a full sync went in
    out = node.sync(full=True, batch_chains=4)
    assert len(out.batches) > 2 and len(out.batch_ports) == len(out.batches)
    refused = frozenset().union(*out.batch_ports[1:])
    assert refused and refused != frozenset(node.desired.services)
    node.renderer.refused(refused)
    assert node.renderer.in_sync
    # the next sync, even one with no change of its own, rewrites exactly those ports' chains
    retry = node.sync()
    written = {spn for spn in node.desired.services
               if f":{C.service_chain('SVC', str(spn), spn.protocol)} " in retry.text}
    assert written == refused
    # and the periodic check counts them as drift until written
    node.renderer.refused(refused)
    counts = {key: len(rules) for key, rules in base_rules(node.desired.node).items()}
    counts |= node.renderer._dispatch_count
    counts |= {(t, c): n for spn in node.desired.services
               for t, cs in node.renderer._rules[spn].chains.items() for c, n in cs}
    assert node.renderer.drift(counts) == set(refused)


def test_a_refused_restore_before_anything_was_in_sync_means_a_complete_rewrite() -> None:
    node = two_services()  # never marked in sync: the kernel's state is unknown
    node.renderer.refused({WEB})
    assert node.renderer.drift({}) is None


def test_health_check_node_port_is_accepted_in_the_filter_table() -> None:
    """Issue 14 item 3, as kube-proxy does: a LoadBalancer Service with externalTrafficPolicy Local
    has a healthCheckNodePort; a filter chain jumped to from INPUT accepts new connections to it, so
    a host firewall that drops unknown ports still lets the load balancer's health checks in."""
    text = full_text(
        service("web", "10.96.0.10", HTTP_NP, type="LoadBalancer", externalTrafficPolicy="Local",
                healthCheckNodePort=32100, status={"loadBalancer": {"ingress": [{"ip": "203.0.113.7"}]}}),
        endpoint_slice("web-1", "web", [endpoint("10.244.1.5", node=NODE)]),
    )
    filter_part = text.split("*nat")[0]
    assert ('-A KPA-HEALTH-CHECKS -m comment --comment "ns/web:http health check node port" '
            "-p tcp -m tcp --dport 32100 -j ACCEPT") in filter_part
    assert ("filter", "INPUT", "KPA-HEALTH-CHECKS", "") in C.HOOKS
    plain = full_text(service("db", "10.96.0.20", HTTP), endpoint_slice("db-1", "db", [endpoint("10.244.1.6")]))
    assert "-A KPA-HEALTH-CHECKS" not in plain


def _node_port_jumps(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.endswith("-j KPA-NODEPORTS")]


def test_localhost_node_ports_follow_kube_proxys_default() -> None:
    """--iptables-localhost-nodeports (kube-proxy's default, true): with NodePorts on every address,
    127.0.0.1 enters the node-port chain too, and KPA-LOCALNET drops what reaches 127.0.0.0/8 from
    outside the node (route_localnet=1 would otherwise expose what listens there: CVE-2020-8558).
    Off: loopback never enters the node-port chain (a DNAT from it would be black-holed)."""
    np = service("web", "10.96.0.10", HTTP_NP, type="NodePort")
    node = Node().apply(np)
    node.renderer = IptablesRenderer(localhost_nodeports=True)
    text = node.sync(full=True).text
    assert _node_port_jumps(text) == [
        '-A KPA-SERVICES -m addrtype --dst-type LOCAL -m comment --comment "node ports" -j KPA-NODEPORTS']
    assert ('-A KPA-LOCALNET -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m comment --comment '
            '"block incoming localnet connections" -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP') in text
    off = full_text(np)
    assert _node_port_jumps(off) == [
        '-A KPA-SERVICES ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -m comment --comment "node ports" '
        '-j KPA-NODEPORTS']
    assert "-A KPA-LOCALNET" not in off


def test_localhost_in_nodeport_addresses() -> None:
    """--nodeport-addresses 127.0.0.0/8,192.168.0.0/16: 127.0.0.1 takes NodePorts only with
    localhost node ports on; never in IPv6 (::1 cannot be routed to a pod)."""
    np = service("web", "10.96.0.10", HTTP_NP, type="NodePort")
    ips = ("192.168.1.10", "127.0.0.1", "::1", "fd00::1")
    on = Node(nodeport_cidrs=("127.0.0.0/8", "192.168.0.0/16", "::1/128"), local_ips=ips).apply(np)
    on.renderer = IptablesRenderer(localhost_nodeports=True)
    text = on.sync(full=True).text
    assert [j.split()[3] for j in _node_port_jumps(text)] == ["127.0.0.1/32", "192.168.1.10/32"]
    assert "-A KPA-LOCALNET -d 127.0.0.0/8" in text
    off = Node(nodeport_cidrs=("127.0.0.0/8", "192.168.0.0/16"), local_ips=ips).apply(np).sync(full=True).text
    assert [j.split()[3] for j in _node_port_jumps(off)] == ["192.168.1.10/32"]
    v6 = Node(nodeport_cidrs=("::1/128", "fd00::/64"), local_ips=ips, family=6, cluster_cidrs=("fd00:244::/64",))
    v6.renderer = IptablesRenderer(localhost_nodeports=True)
    v6text = v6.apply(service("web6", "fd00:96::1", HTTP_NP, type="NodePort")).sync(full=True).text
    assert [j.split()[3] for j in _node_port_jumps(v6text)] == ["fd00::1/128"]
    assert "-A KPA-LOCALNET" not in v6text
    # without loopback in --nodeport-addresses there is nothing to guard
    plain = Node(nodeport_cidrs=("192.168.0.0/16",), local_ips=ips).apply(np)
    plain.renderer = IptablesRenderer(localhost_nodeports=True)
    assert "-A KPA-LOCALNET" not in plain.sync(full=True).text


def test_load_balancer_ips_are_allowed_sources_when_the_node_is_in_the_ranges() -> None:
    """loadBalancerSourceRanges 192.168.0.0/16 and a node address in it: the Service's own LB IP
    is an allowed source too (a VIP-like load balancer loops the node's own requests back with
    the LB IP as source), as kube-proxy does. The node's address moving out of the range takes it
    away again, in a partial sync of that Service alone."""
    lb = service("lb", "10.96.0.20", HTTP, type="LoadBalancer", loadBalancerSourceRanges=["192.168.0.0/16"],
                 status={"loadBalancer": {"ingress": [{"ip": "203.0.113.7"}]}})
    node = Node(local_ips=("192.168.1.10",)).apply(lb, endpoint_slice("lb-1", "lb", [endpoint("10.244.1.5")]))
    fw = C.service_chain("FW", "ns/lb:http", "TCP")
    text = node.sync(full=True).text
    assert f"-A {fw} -s 192.168.0.0/16 -j RETURN" in text
    assert f"-A {fw} -s 203.0.113.7/32 -j RETURN" in text
    node.model.set_local_ips(("10.0.0.1",))
    out = node.sync()
    assert f"-A {fw} -s 203.0.113.7/32 -j RETURN" not in out.text and f"-A {fw} -s 192.168.0.0/16 -j RETURN" in out.text
    # and an unrelated address change touches nothing
    node.model.set_local_ips(("10.0.0.2",))
    assert node.sync().text == ""
