"""Every Service behaviour, proven with real packets through the node's kernel, for every mode.

Each test states the Kubernetes behaviour, writes the objects the API would serve into the
agent's --source directory, and checks who answers and which client address they saw.
"""

from __future__ import annotations

import time

import pytest

from tests.kernel.conftest import (
    CLIENT,
    CLIENT2,
    CLIENT6,
    NODE_BR,
    NODE_EXT,
    NODE_EXT6,
    PODS,
    Node,
    endpoint,
    service,
    slice_,
)
from tests.netlab import probe, sctp_available, wait_for, who

HTTP = [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]
EP_HTTP = [{"name": "http", "port": 8080, "protocol": "TCP"}]


def test_cluster_ip_spreads_over_ready_endpoints(node: Node) -> None:
    ips = node.cluster_ip()
    node.apply("spread", [
        service("spread", ips[0], HTTP),
        slice_("spread-1", "spread", [endpoint("pod-a"), endpoint("pod-b")], EP_HTTP),
        slice_("spread-2", "spread", [endpoint("pod-c"), endpoint("pod-r", ready=False)], EP_HTTP),
    ])
    seen = who(node.answers(ips[0], 80, n=40, src="pod-a"))
    assert seen == {"pod-a", "pod-b", "pod-c"}  # merged over two slices, never the unready one


@pytest.mark.parametrize("proto", ["UDP", "SCTP"])
def test_cluster_ip_udp_and_sctp(node: Node, proto: str) -> None:
    if proto == "SCTP" and not sctp_available():
        pytest.skip("this kernel has no SCTP sockets")
    ips = node.cluster_ip()
    name = f"proto-{proto.lower()}"
    node.apply(name, [
        service(name, ips[0], [{"name": "p", "port": 53, "protocol": proto}]),
        slice_(f"{name}-1", name, [endpoint("pod-b")], [{"name": "p", "port": 8080, "protocol": proto}]),
    ])
    assert node.probe(ips[0], 53, proto.lower(), src="pod-a") == f"pod-b {PODS['pod-a'][0]}"


def test_no_endpoints_is_rejected_not_blackholed(node: Node) -> None:
    ips = node.cluster_ip()
    node.apply("empty", [
        service("empty", ips[0], [*HTTP, {"name": "dns", "port": 53, "protocol": "UDP"}]),
        slice_("empty-1", "empty", [endpoint("pod-a", ready=False)], EP_HTTP),
    ])
    start = time.monotonic()
    assert node.probe(ips[0], 80, src="pod-b", timeout=3) == "REFUSED"
    assert node.probe(ips[0], 53, "udp", src="pod-b", timeout=3) == "REFUSED"
    assert time.monotonic() - start < 2.5  # refused at once, not a timeout


def test_masquerade_outside_cluster_cidr_and_hairpin(node: Node) -> None:
    ips = node.cluster_ip()
    node.apply("masq", [
        service("masq", ips[0], HTTP),
        slice_("masq-1", "masq", [endpoint("pod-a")], EP_HTTP),
    ])
    # From a pod: no SNAT, the backend sees the pod.
    assert node.probe(ips[0], 80, src="pod-b") == f"pod-a {PODS['pod-b'][0]}"
    # From outside the cluster CIDR: SNAT to the node.
    assert node.probe(ips[0], 80) == f"pod-a {NODE_BR}"
    # Hairpin: the only endpoint reaching itself through its Service: masqueraded, so its reply
    # goes back through the node. The eBPF mode picks the backend at connect(): the pod connects to
    # itself directly, no NAT on the way, so it sees its own address (README: known differences).
    hairpin_source = PODS["pod-a"][0] if node.mode == "ebpf" else NODE_BR
    assert node.probe(ips[0], 80, src="pod-a") == f"pod-a {hairpin_source}"


def test_node_port_external_ip_and_load_balancer(node: Node) -> None:
    ips = node.cluster_ip()
    ports = [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30080, "protocol": "TCP"}]
    node.apply("np", [
        service("np", ips[0], ports, type="LoadBalancer", externalIPs=["10.20.0.6"],
                status={"loadBalancer": {"ingress": [{"ip": "10.20.0.5"}]}}),
        slice_("np-1", "np", [endpoint("pod-a"), endpoint("pod-r")], EP_HTTP),
    ])
    for ip, port in [(NODE_EXT, 30080), ("10.20.0.6", 80), ("10.20.0.5", 80)]:
        answers = node.answers(ip, port, n=12)
        assert who(answers) <= {"pod-a", "pod-r"} and "TIMEOUT" not in answers, (ip, answers)
        assert {a.split()[1] for a in answers} == {NODE_BR}  # ETP Cluster masquerades
    # 127.0.0.1 takes NodePorts only in iptables mode (kube-proxy's --iptables-localhost-nodeports,
    # on by default); elsewhere loopback is left alone: nothing listens there, so refused at once.
    local = probe(node.node, "127.0.0.1", 30080, timeout=2)
    if node.mode == "iptables":
        assert local.split()[0] in {"pod-a", "pod-r"}, local
    else:
        assert local in ("REFUSED", "TIMEOUT") if node.mode == "ebpf" else local == "REFUSED", local


def test_load_balancer_source_ranges(node: Node) -> None:
    ips = node.cluster_ip()
    node.apply("fw", [
        service("fw", ips[0], HTTP, type="LoadBalancer", loadBalancerSourceRanges=[f"{CLIENT}/32"],
                status={"loadBalancer": {"ingress": [{"ip": "10.20.0.7"}]}}),
        slice_("fw-1", "fw", [endpoint("pod-b")], EP_HTTP),
    ])
    assert node.probe("10.20.0.7", 80).startswith("pod-b")
    assert node.probe("10.20.0.7", 80, src_ip=CLIENT2, timeout=1) == "TIMEOUT"


def test_load_balancer_ip_as_source_when_the_node_is_in_the_source_ranges(node: Node) -> None:
    """Issue 14 items 1 and 6: when a node address lies in loadBalancerSourceRanges, kube-proxy also
    lets through sources that are the Service's own load-balancer IPs. With the LB IP on the node,
    the node's own connection to it leaves with the LB IP as its source."""
    ips, other = node.cluster_ip(), node.cluster_ip()
    node.lab.exec(node.node, "ip", "addr", "add", "10.20.0.8/32", "dev", "lo")
    node.lab.exec(node.node, "ip", "addr", "add", "10.20.0.9/32", "dev", "lo")
    try:
        node.apply("fwnode", [
            service("fwnode", ips[0], HTTP, type="LoadBalancer", loadBalancerSourceRanges=[f"{NODE_EXT}/32"],
                    status={"loadBalancer": {"ingress": [{"ip": "10.20.0.8"}]}}),
            slice_("fwnode-1", "fwnode", [endpoint("pod-b")], EP_HTTP),
            # the control: a range without a node address keeps the LB IP out
            service("fwother", other[0], HTTP, type="LoadBalancer", loadBalancerSourceRanges=[f"{CLIENT}/32"],
                    status={"loadBalancer": {"ingress": [{"ip": "10.20.0.9"}]}}),
            slice_("fwother-1", "fwother", [endpoint("pod-b")], EP_HTTP),
        ])
        assert probe(node.node, "10.20.0.8", 80, timeout=2).startswith("pod-b")
        assert node.probe("10.20.0.8", 80, timeout=1) == "TIMEOUT"  # the client is not in the range
        if node.mode != "ebpf":  # connect() from the node picks a backend before any firewall
            assert probe(node.node, "10.20.0.9", 80, timeout=1) == "TIMEOUT"
        assert node.probe("10.20.0.9", 80).startswith("pod-b")
    finally:
        node.lab.exec(node.node, "ip", "addr", "del", "10.20.0.8/32", "dev", "lo")
        node.lab.exec(node.node, "ip", "addr", "del", "10.20.0.9/32", "dev", "lo")
        node.remove("fwnode")


def test_cluster_ip_on_a_port_it_does_not_have(node: Node) -> None:
    """Issue 14 items 4 and 5, the nftables mode as kube-proxy's: a cluster IP on a port or protocol
    the Service lacks is rejected (refused at once, not a timeout); an address of the service CIDR
    (a ServiceCIDR object) that no Service holds is dropped."""
    ips = node.cluster_ip()
    node.apply("ports", [
        {"apiVersion": "networking.k8s.io/v1", "kind": "ServiceCIDR", "metadata": {"name": "kubernetes"},
         "spec": {"cidrs": ["10.96.0.0/16", "fd00:96::/64"]}},
        service("ports", ips[0], HTTP),
        slice_("ports-1", "ports", [endpoint("pod-a")], EP_HTTP),
    ])
    # an unallocated service address that something on the network answers (pod-c holds it):
    # without the check, traffic to it would be routed there
    pod_c = node.pods["pod-c"]
    node.lab.exec(pod_c, "ip", "addr", "add", "10.96.0.250/32", "dev", "eth0")
    node.lab.exec(node.node, "ip", "route", "add", "10.96.0.250/32", "via", PODS["pod-c"][0], "dev", "br0")
    try:
        assert node.probe(ips[0], 80).startswith("pod-a")
        if node.mode == "iptables":  # kube-proxy's iptables mode has no such checks
            assert node.probe("10.96.0.250", 8080).startswith("pod-c")
        if node.mode != "nftables":
            return
        start = time.monotonic()
        assert node.probe(ips[0], 9090, timeout=3) == "REFUSED"
        assert node.probe(ips[0], 80, "udp", timeout=3) == "REFUSED"
        assert node.probe(ips[0], 9090, src="pod-b", timeout=3) == "REFUSED"
        assert time.monotonic() - start < 2.5
        assert node.probe("10.96.0.250", 8080, timeout=1) == "TIMEOUT"
        assert node.probe("10.96.0.250", 8080, src="pod-b", timeout=1) == "TIMEOUT"
    finally:
        node.lab.exec(node.node, "ip", "route", "del", "10.96.0.250/32")
        node.lab.exec(pod_c, "ip", "addr", "del", "10.96.0.250/32", "dev", "eth0")
        node.remove("ports")


def test_session_affinity_client_ip(node: Node) -> None:
    ips = node.cluster_ip()
    node.apply("aff", [
        service("aff", ips[0], HTTP, sessionAffinity="ClientIP",
                sessionAffinityConfig={"clientIP": {"timeoutSeconds": 60}}),
        slice_("aff-1", "aff", [endpoint("pod-a"), endpoint("pod-b"), endpoint("pod-c")], EP_HTTP),
    ])
    assert len(who(node.answers(ips[0], 80, n=15, src="pod-r"))) == 1
    assert len(who(node.answers(ips[0], 80, n=15))) == 1


def test_external_traffic_policy_local(node: Node) -> None:
    ips = node.cluster_ip()
    ports = [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30081, "protocol": "TCP"}]
    node.apply("etp", [
        service("etp", ips[0], ports, type="NodePort", externalTrafficPolicy="Local", healthCheckNodePort=32001),
        slice_("etp-1", "etp", [endpoint("pod-a"), endpoint("pod-r")], EP_HTTP),
    ])
    answers = node.answers(NODE_EXT, 30081, n=10)
    assert set(answers) == {f"pod-a {CLIENT}"}  # only the local endpoint, client IP preserved
    # Pods still reach every endpoint through the cluster IP.
    assert who(node.answers(ips[0], 80, n=20, src="pod-b")) == {"pod-a", "pod-r"}
    code, body = node.http(32001, "/", ip=NODE_EXT, ns=node.client)
    assert code == 200 and '"localEndpoints": 1' in body
    # No local endpoint left: external traffic is dropped (not sent to another node), health says 503.
    node.apply("etp", [
        service("etp", ips[0], ports, type="NodePort", externalTrafficPolicy="Local", healthCheckNodePort=32001),
        slice_("etp-1", "etp", [endpoint("pod-r")], EP_HTTP),
    ])
    assert node.probe(NODE_EXT, 30081, timeout=1) == "TIMEOUT"
    code, body = node.http(32001, "/", ip=NODE_EXT, ns=node.client)
    assert code == 503 and '"localEndpoints": 0' in body


def test_internal_traffic_policy_local(node: Node) -> None:
    ips = node.cluster_ip()
    node.apply("itp", [
        service("itp", ips[0], HTTP, internalTrafficPolicy="Local"),
        slice_("itp-1", "itp", [endpoint("pod-b"), endpoint("pod-r")], EP_HTTP),
    ])
    assert who(node.answers(ips[0], 80, n=15, src="pod-a")) == {"pod-b"}


def test_terminating_endpoints_only_when_no_ready_one(node: Node) -> None:
    ips = node.cluster_ip()
    node.apply("term", [
        service("term", ips[0], HTTP),
        slice_("term-1", "term", [endpoint("pod-a"), endpoint("pod-b", ready=False, serving=True, terminating=True)],
               EP_HTTP),
    ])
    assert who(node.answers(ips[0], 80, n=15, src="pod-c")) == {"pod-a"}
    node.apply("term", [
        service("term", ips[0], HTTP),
        slice_("term-1", "term", [endpoint("pod-a", ready=False, serving=False, terminating=True),
                                  endpoint("pod-b", ready=False, serving=True, terminating=True)], EP_HTTP),
    ])
    assert who(node.answers(ips[0], 80, n=10, src="pod-c")) == {"pod-b"}


def test_dual_stack(node: Node) -> None:
    ips = node.cluster_ip()
    ports = [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30082, "protocol": "TCP"}]
    node.apply("dual", [
        service("dual", ips, ports, type="NodePort", ipFamilies=["IPv4", "IPv6"]),
        slice_("dual-4", "dual", [endpoint("pod-a")], EP_HTTP),
        slice_("dual-6", "dual", [endpoint("pod-b", family=6)], EP_HTTP, family=6),
    ])
    assert node.probe(ips[0], 80, src="pod-c").startswith("pod-a")
    assert node.probe(ips[1], 80, src="pod-c") == f"pod-b {PODS['pod-c'][1]}"
    assert node.probe(NODE_EXT6, 30082).startswith("pod-b")
    assert node.probe(NODE_EXT, 30082).startswith("pod-a")
    assert CLIENT6  # the IPv6 client address is on the client namespace


def test_udp_conntrack_cleared_when_endpoint_goes(node: Node) -> None:
    ips = node.cluster_ip()
    udp = [{"name": "dns", "port": 53, "protocol": "UDP"}]
    ep_udp = [{"name": "dns", "port": 8080, "protocol": "UDP"}]
    node.apply("ct", [service("ct", ips[0], udp), slice_("ct-1", "ct", [endpoint("pod-a")], ep_udp)])
    # The same client socket (same 5-tuple) keeps its conntrack entry to pod-a.
    assert node.probe(ips[0], 53, "udp", src="pod-c", src_port=40053).startswith("pod-a")
    node.apply("ct", [service("ct", ips[0], udp), slice_("ct-1", "ct", [endpoint("pod-b")], ep_udp)])
    assert wait_for(lambda: node.probe(ips[0], 53, "udp", src="pod-c", src_port=40053, timeout=0.5)
                    .startswith("pod-b"), 5)


def test_udp_node_port_flow_moves_when_its_endpoint_goes(node: Node) -> None:
    """From outside, to a NodePort, the same client port: after the endpoint is replaced the flow
    reaches the new one (netfilter modes: conntrack cleanup; ebpf: the tc path's own flow table)."""
    ips = node.cluster_ip()
    udp = [{"name": "dns", "port": 53, "protocol": "UDP", "nodePort": 30553}]
    ep_udp = [{"name": "dns", "port": 8080, "protocol": "UDP"}]
    node.apply("ctnp", [service("ctnp", ips[0], udp, type="NodePort"),
                        slice_("ctnp-1", "ctnp", [endpoint("pod-a")], ep_udp)])
    assert wait_for(lambda: node.probe(NODE_EXT, 30553, "udp", src_port=40057, timeout=0.5).startswith("pod-a"), 10)
    node.apply("ctnp", [service("ctnp", ips[0], udp, type="NodePort"),
                        slice_("ctnp-1", "ctnp", [endpoint("pod-b")], ep_udp)])
    assert wait_for(lambda: node.probe(NODE_EXT, 30553, "udp", src_port=40057, timeout=0.5)
                    .startswith("pod-b"), 5)


def test_topology_zone_hints(node: Node) -> None:
    ips = node.cluster_ip()
    node.apply("zone", [
        service("zone", ips[0], HTTP, trafficDistribution="PreferClose"),
        slice_("zone-1", "zone", [endpoint("pod-a", zones=["zone-a"]), endpoint("pod-b", zones=["zone-b"]),
                                  endpoint("pod-c", zones=["zone-a"])], EP_HTTP),
    ])
    assert who(node.answers(ips[0], 80, n=20, src="pod-r")) == {"pod-a", "pod-c"}
    # One endpoint without hints: hints are ignored, every endpoint serves.
    node.apply("zone", [
        service("zone", ips[0], HTTP, trafficDistribution="PreferClose"),
        slice_("zone-1", "zone", [endpoint("pod-a", zones=["zone-a"]), endpoint("pod-b")], EP_HTTP),
    ])
    assert who(node.answers(ips[0], 80, n=20, src="pod-r")) == {"pod-a", "pod-b"}


def test_bad_objects_are_skipped_and_counted(node: Node) -> None:
    ips = node.cluster_ip()
    before = node.metric("kubeproxyagent_invalid_objects_total")
    node.apply("bad", [
        service("good", ips[0], HTTP),
        slice_("good-1", "good", [endpoint("pod-c"), {"addresses": ["999.1.1.1"]}], EP_HTTP),
        service("badproto", node.cluster_ip()[0], [{"name": "x", "port": 80, "protocol": "ICMP"}]),
        service("badport", node.cluster_ip()[0], [{"name": "x", "port": 70000}]),
        service("badip", "10.96.999.1", HTTP),
        slice_("orphan-1", "no-such-service", [endpoint("pod-a")], EP_HTTP),
        {"kind": "Service", "apiVersion": "v1", "metadata": {"name": "typo", "namespace": "default"},
         "spec": {"ports": "not-a-list"}},
    ])
    assert node.probe(ips[0], 80, src="pod-a").startswith("pod-c")
    assert node.metric("kubeproxyagent_invalid_objects_total") >= before + 4
    assert node.proc.poll() is None


def test_service_removed_stops_answering(node: Node) -> None:
    ips = node.cluster_ip()
    node.apply("gone", [service("gone", ips[0], HTTP), slice_("gone-1", "gone", [endpoint("pod-a")], EP_HTTP)])
    assert node.probe(ips[0], 80, src="pod-b").startswith("pod-a")
    node.remove("gone")
    assert node.probe(ips[0], 80, src="pod-b", timeout=1) in ("TIMEOUT", "UNREACHABLE", "REFUSED")


def test_udp_flows_sent_before_a_service_had_endpoints_are_cleared(node: Node) -> None:
    """A DNS-like client keeps one socket (one 5-tuple): datagrams it sent before the Service had
    an endpoint made a conntrack entry that was never DNATed, and every later datagram would follow
    it. When the first endpoint appears, that entry is deleted; the client reaches the pod."""
    ips = node.cluster_ip()
    udp = [{"name": "dns", "port": 53, "protocol": "UDP"}]
    ep_udp = [{"name": "dns", "port": 8080, "protocol": "UDP"}]
    # before the Service exists: routed as plain traffic, nobody answers
    assert node.probe(ips[0], 53, "udp", src="pod-c", src_port=40054, timeout=0.3) == "TIMEOUT"
    flows = node.lab.exec(node.node, "conntrack", "-L", "-p", "udp", "--orig-dst", ips[0], check=False)
    assert "sport=40054" in flows and f"src={ips[0]}" in flows, flows  # not DNATed
    node.apply("early", [service("early", ips[0], udp), slice_("early-1", "early", [endpoint("pod-a")], ep_udp)])
    assert wait_for(lambda: node.probe(ips[0], 53, "udp", src="pod-c", src_port=40054, timeout=0.5)
                    .startswith("pod-a"), 5), node.log_tail()
    if node.mode != "ebpf":  # the eBPF mode's sockets never go through those conntrack entries
        assert wait_for(lambda: "conntrack entries deleted" in node.log.read_text(), 5)
