"""Frontends: every address:port/protocol a node serves, per family, with the endpoints taking its
traffic (what IPVS virtual servers and BPF service map keys are made from). Each test is a
Kubernetes scenario in words, the objects, and the frontends the node must serve."""

from __future__ import annotations

import random
from typing import Any

from agent.model.frontends import FrontendKey, FrontendTable, nodeport_addresses
from tests.unit.test_tracker_state import (
    DNS,
    EP_DNS,
    EP_HTTP,
    HTTP,
    NODE,
    Cluster,
    endpoint,
    endpoint_slice,
    service,
    spn,
)

NP = [{"name": "http", "port": 80, "protocol": "TCP", "nodePort": 30080}]


def fronts(c: Cluster, family: int = 4) -> dict[str, str]:
    """key -> 'Kind endpoints' for every frontend of a family."""
    table = c.model.desired[family].frontends
    return {str(k): f"{f.kind} {','.join(e.address for e in f.endpoints) or f.unserved}"
            for k in sorted(table) if (f := table.get(k)) is not None}


def test_cluster_ip_only_service_has_one_frontend() -> None:
    c = Cluster().apply(service("web", ["10.96.0.10"], HTTP),
                        endpoint_slice("web-1", "web", [endpoint("10.244.1.5"), endpoint("10.244.1.6")], EP_HTTP))
    u = c.drain()
    assert fronts(c) == {"10.96.0.10:80/TCP": "ClusterIP 10.244.1.5:8080,10.244.1.6:8080"}
    assert u.frontends[4] == {FrontendKey("10.96.0.10", 80, "TCP")}
    assert u.changes(4).frontends == u.frontends[4] and u.changes(4).ports == {spn("web")}


def test_load_balancer_service_exposes_every_kind_and_node_ports_on_each_node_address() -> None:
    """type LoadBalancer with an external IP: the cluster IP, the external IP, the ingress IP, and the
    NodePort on every node address of the family (never loopback, never IPv6 link-local)."""
    svc = service("web", ["10.96.0.10", "fd00:96::10"], NP, type="LoadBalancer", externalIPs=["192.0.2.7"],
                  loadBalancerSourceRanges=["203.0.113.0/24"])
    svc["status"] = {"loadBalancer": {"ingress": [{"ip": "198.51.100.9"}]}}
    c = Cluster().apply(svc, endpoint_slice("web-1", "web", [endpoint("10.244.1.5")], EP_HTTP))
    c.model.set_local_ips(["127.0.0.1", "10.0.0.1", "192.168.1.10", "::1", "fe80::1", "2001:db8::1"])
    c.drain()
    ep = "10.244.1.5:8080"
    assert fronts(c) == {
        "10.0.0.1:30080/TCP": f"NodePort {ep}",
        "10.96.0.10:80/TCP": f"ClusterIP {ep}",
        "192.0.2.7:80/TCP": f"ExternalIP {ep}",
        "192.168.1.10:30080/TCP": f"NodePort {ep}",
        "198.51.100.9:80/TCP": f"LoadBalancerIP {ep}",
    }
    lb = c.model.desired[4].frontends.get(FrontendKey("198.51.100.9", 80, "TCP"))
    assert lb is not None and lb.source_ranges == ("203.0.113.0/24",) and not lb.preserve_source
    # IPv6: the cluster IP (no IPv6 endpoint: reject) and the NodePort on the global address only
    assert fronts(c, 6) == {"[2001:db8::1]:30080/TCP": "NodePort reject", "[fd00:96::10]:80/TCP": "ClusterIP reject"}


def test_external_traffic_policy_local_keeps_the_client_and_uses_local_endpoints() -> None:
    """ETP Local: external clients reach only this node's endpoints with their address kept; pods and
    the node itself still reach every endpoint (kube-proxy's short circuit). Without a local
    endpoint, external traffic is dropped (other nodes have endpoints), not rejected."""
    objs: list[dict[str, Any]] = [
        service("web", ["10.96.0.10"], NP, type="NodePort", externalTrafficPolicy="Local"),
        endpoint_slice("web-1", "web", [endpoint("10.244.1.5", node=NODE), endpoint("10.244.2.5")], EP_HTTP),
    ]
    c = Cluster().apply(*objs)
    c.model.set_local_ips(["10.0.0.1"])
    c.drain()
    np = c.model.desired[4].frontends.get(FrontendKey("10.0.0.1", 30080, "TCP"))
    assert np is not None and np.preserve_source
    assert [e.address for e in np.endpoints] == ["10.244.1.5:8080"]
    assert [e.address for e in np.in_cluster_endpoints] == ["10.244.1.5:8080", "10.244.2.5:8080"]
    cip = c.model.desired[4].frontends.get(FrontendKey("10.96.0.10", 80, "TCP"))
    assert cip is not None and len(cip.endpoints) == 2 and not cip.preserve_source
    c.apply(endpoint_slice("web-1", "web", [endpoint("10.244.2.5")], EP_HTTP))
    u = c.drain()
    np = c.model.desired[4].frontends.get(FrontendKey("10.0.0.1", 30080, "TCP"))
    assert np is not None and np.endpoints == () and np.unserved == "drop"
    assert FrontendKey("10.0.0.1", 30080, "TCP") in u.frontends[4]


def test_node_address_change_changes_only_node_port_frontends() -> None:
    """A new node address is a change like any other: the NodePort frontends on it appear, nothing
    else is touched, and no full sync is needed."""
    c = Cluster().apply(service("web", ["10.96.0.10"], NP, type="NodePort"),
                        service("db", ["10.96.0.11"], HTTP),
                        endpoint_slice("web-1", "web", [endpoint("10.244.1.5")], EP_HTTP))
    c.model.set_local_ips(["10.0.0.1"])
    c.drain()
    c.model.set_local_ips(["10.0.0.1", "10.0.0.2"])
    u = c.drain()
    assert not u.full and u.changed[4] == frozenset()
    assert u.frontends[4] == {FrontendKey("10.0.0.2", 30080, "TCP")}
    c.model.set_local_ips(["10.0.0.2"])
    u = c.drain()
    assert u.frontends[4] == {FrontendKey("10.0.0.1", 30080, "TCP")}
    assert FrontendKey("10.0.0.1", 30080, "TCP") not in c.model.desired[4].frontends


def test_nodeport_addresses_narrow_the_node_port_frontends() -> None:
    assert nodeport_addresses(4, ["10.0.0.1", "192.168.1.10", "127.0.0.1", "2001:db8::1"], ["192.168.0.0/16"]) == (
        "192.168.1.10",)
    # a family without CIDRs of its own keeps every address (as the chain-based modes do)
    assert nodeport_addresses(6, ["2001:db8::1", "fe80::1", "::1"], ["192.168.0.0/16"]) == ("2001:db8::1",)
    assert nodeport_addresses(4, ["10.0.0.2", "10.0.0.10", "bogus"]) == ("10.0.0.2", "10.0.0.10")


def test_service_removed_removes_its_frontends() -> None:
    c = Cluster().apply(service("dns", ["10.96.0.53"], DNS),
                        endpoint_slice("dns-1", "dns", [endpoint("10.244.1.5")], EP_DNS))
    c.drain()
    c.delete("Service", "dns")
    u = c.drain()
    assert u.frontends[4] == {FrontendKey("10.96.0.53", 53, "UDP")}
    assert len(c.model.desired[4].frontends) == 0


def test_two_services_claiming_one_address_the_smallest_name_wins_and_the_other_takes_over() -> None:
    """Two Services with the same external IP and port are legal; the smallest service port name
    serves it (as the first matching iptables rule would), and when it goes the other takes over."""
    c = Cluster().apply(
        service("a", ["10.96.0.1"], HTTP, externalIPs=["192.0.2.1"]),
        service("b", ["10.96.0.2"], HTTP, externalIPs=["192.0.2.1"]),
        endpoint_slice("a-1", "a", [endpoint("10.244.1.1")], EP_HTTP),
        endpoint_slice("b-1", "b", [endpoint("10.244.1.2")], EP_HTTP),
    )
    c.drain()
    key = FrontendKey("192.0.2.1", 80, "TCP")
    table = c.model.desired[4].frontends
    assert table.get(key).service == spn("a")  # type: ignore[union-attr]
    assert table.conflicts() == [(key, [spn("a"), spn("b")])]
    assert [f.key for f in table.of_port(spn("b"))] == [FrontendKey("10.96.0.2", 80, "TCP")]
    c.delete("Service", "a")
    u = c.drain()
    assert key in u.frontends[4]
    assert table.get(key).service == spn("b")  # type: ignore[union-attr]
    assert table.conflicts() == []


def test_describe_and_table_are_one_line_per_frontend() -> None:
    c = Cluster().apply(service("web", ["10.96.0.10"], HTTP, sessionAffinity="ClientIP"),
                        endpoint_slice("web-1", "web", [endpoint("10.244.1.5")], EP_HTTP))
    c.drain()
    assert c.model.desired[4].frontends.table() == (
        "10.96.0.10:80/TCP ClusterIP shop/web:http -> 10.244.1.5:8080 affinity=10800s\n")
    assert str(FrontendKey("fd00::1", 53, "UDP")) == "[fd00::1]:53/UDP"


def test_incremental_frontends_match_a_table_built_from_scratch() -> None:
    """Random Service, slice and node-address changes, drained one batch at a time: the frontend
    table equals one built from the final plans alone, and every key whose frontend changed was
    reported."""
    rnd = random.Random(20261202)
    c = Cluster()
    c.drain()
    addresses = [["10.0.0.1"], ["10.0.0.1", "10.0.0.2"], ["10.0.0.3"], []]
    for _ in range(200):
        for _ in range(rnd.randint(1, 4)):
            n = rnd.randint(0, 5)
            name, op = f"s{n}", rnd.random()
            if op < 0.4:
                spec: dict[str, Any] = {}
                ports = [dict(p) for p in rnd.choice([HTTP, NP, DNS])]
                if rnd.random() < 0.5 and "nodePort" in ports[0]:
                    spec["type"] = "NodePort"
                    spec["externalTrafficPolicy"] = rnd.choice(["Cluster", "Local"])
                if rnd.random() < 0.3:
                    spec["externalIPs"] = [rnd.choice(["192.0.2.1", "192.0.2.2"])]
                c.apply(service(name, [f"10.96.0.{n + 1}"], ports, **spec))
            elif op < 0.5:
                c.delete("Service", name)
            elif op < 0.9:
                eps = [endpoint(f"10.244.1.{rnd.randint(2, 6)}", node=rnd.choice([NODE, "node-b"]),
                                ready=rnd.random() < 0.8) for _ in range(rnd.randint(0, 3))]
                c.apply(endpoint_slice(f"{name}-1", name, eps, rnd.choice([EP_HTTP, EP_DNS])))
            else:
                c.model.set_local_ips(rnd.choice(addresses))
        table = c.model.desired[4].frontends
        before = {k: table.get(k) for k in table}
        u = c.drain()
        after = {k: table.get(k) for k in table}
        differ = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
        assert differ <= u.frontends[4], differ - u.frontends[4]
        fresh = FrontendTable()
        fresh.set_node_addresses(table.node_addresses)
        for port, plan in c.model.desired[4].services.items():
            fresh.set_port(port, plan)
        assert {k: fresh.get(k) for k in fresh} == after
