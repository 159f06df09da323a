"""ChangeTracker (previous/current per key, changes that end where they began dropped) and
ClusterModel (records in, DesiredState per family out, recomputing only what changed).

The model is fed record dicts, exactly as a source would after reading the API or a YAML file.
"""

from __future__ import annotations

import random
from typing import Any

import pytest

from agent.model.records import EndpointSlice, Service, ServiceCIDR, from_builtins
from agent.model.serviceport import NamespacedName, Problem, ServicePortName
from agent.model.state import ClusterModel, StaleFlow, Update
from agent.model.tracker import ChangeTracker

# -- ChangeTracker ---------------------------------------------------------------------------


def test_update_then_drain_commits() -> None:
    t: ChangeTracker[str, int] = ChangeTracker()
    t.update("a", 1)
    assert t.pending == 1
    assert dict(t.committed) == {}
    assert t.drain() == {"a": (None, 1)}
    assert dict(t.committed) == {"a": 1}
    assert t.keys() == {"a"}
    assert t.pending == 0
    assert t.drain() == {}  # drained once


def test_change_then_revert_is_dropped() -> None:
    """An object that flaps back to its committed value causes no sync."""
    t: ChangeTracker[str, int] = ChangeTracker()
    t.update("a", 1)
    t.drain()
    t.update("a", 2)
    t.update("a", 1)
    assert t.pending == 0
    assert t.drain() == {}


def test_add_then_delete_before_a_drain_is_dropped() -> None:
    t: ChangeTracker[str, int] = ChangeTracker()
    t.update("a", 1)
    t.update("a", None)
    assert t.pending == 0
    assert t.drain() == {}
    assert "a" not in t.committed


def test_several_updates_keep_the_committed_previous() -> None:
    t: ChangeTracker[str, int] = ChangeTracker()
    t.update("a", 1)
    t.drain()
    t.update("a", 2)
    t.update("a", 3)
    assert t.drain() == {"a": (1, 3)}
    assert t.committed["a"] == 3


def test_delete() -> None:
    t: ChangeTracker[str, int] = ChangeTracker()
    t.update("a", 1)
    t.update("b", 2)
    t.drain()
    t.update("a", None)
    assert t.drain() == {"a": (1, None)}
    assert dict(t.committed) == {"b": 2}


def test_deleting_an_unknown_key_is_no_change() -> None:
    t: ChangeTracker[str, int] = ChangeTracker()
    t.update("ghost", None)
    assert t.pending == 0


# -- ClusterModel ----------------------------------------------------------------------------

NODE = "node-a"


def service(name: str, cluster_ips: list[str], ports: list[dict[str, Any]], **spec: Any) -> dict[str, Any]:
    return {
        "kind": "Service",
        "metadata": {"namespace": "shop", "name": name},
        "spec": {"clusterIP": cluster_ips[0], "clusterIPs": cluster_ips, "ports": ports, **spec},
    }


def endpoint(ip: str, *, node: str = "node-b", hints: list[str] | None = None,
             **conditions: bool) -> dict[str, Any]:
    ep: dict[str, Any] = {"addresses": [ip], "nodeName": node, "conditions": conditions}
    if hints is not None:
        ep["hints"] = {"forZones": [{"name": z} for z in hints]}
    return ep


def endpoint_slice(name: str, svc: str, endpoints: list[dict[str, Any]], ports: list[dict[str, Any]],
                   address_type: str = "IPv4", trigger: str = "") -> dict[str, Any]:
    annotations = {"endpoints.kubernetes.io/last-change-trigger-time": trigger} if trigger else {}
    return {
        "kind": "EndpointSlice",
        "metadata": {"namespace": "shop", "name": name, "labels": {"kubernetes.io/service-name": svc},
                     "annotations": annotations},
        "addressType": address_type,
        "endpoints": endpoints,
        "ports": ports,
    }


def node(zone: str = "", deleting: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": NODE, "labels": {"topology.kubernetes.io/zone": zone} if zone else {}}
    if deleting:
        meta["deletionTimestamp"] = "2024-05-01T11:00:00Z"
    return {"kind": "Node", "metadata": meta}


class Cluster:
    """A ClusterModel fed the way a source feeds it: decoded records per namespace/name."""

    def __init__(self, **kwargs: Any) -> None:
        self.model = ClusterModel(NODE, **kwargs)
        self.problems: list[Problem] = []

    def apply(self, *objs: dict[str, Any]) -> Cluster:
        for obj in objs:
            rec = from_builtins(obj["kind"], obj)
            key = NamespacedName(obj["metadata"].get("namespace", ""), obj["metadata"]["name"])
            if isinstance(rec, Service):
                self.problems += self.model.on_service(key, rec)
            elif isinstance(rec, EndpointSlice):
                self.problems += self.model.on_slice(key, rec)
            else:
                self.model.on_node(rec)
        return self

    def delete(self, kind: str, name: str) -> None:
        key = NamespacedName("shop", name)
        if kind == "Service":
            self.model.on_service(key, None)
        else:
            self.model.on_slice(key, None)

    def drain(self) -> Update:
        return self.model.drain()

    def endpoints(self, spn: ServicePortName, family: int = 4) -> list[str]:
        return [e.address for e in self.model.desired[family].services[spn].cluster]


HTTP = [{"name": "http", "port": 80, "protocol": "TCP"}]
EP_HTTP = [{"name": "http", "port": 8080, "protocol": "TCP"}]
DNS = [{"name": "dns", "port": 53, "protocol": "UDP"}]
EP_DNS = [{"name": "dns", "port": 5353, "protocol": "UDP"}]


def spn(name: str, port: str = "http", proto: str = "TCP") -> ServicePortName:
    return ServicePortName("shop", name, port, proto)


def test_first_drain_is_full_and_builds_plans() -> None:
    """A Service and its slice: the first drain is a full one (node context is new) and plans the port."""
    c = Cluster().apply(service("web", ["10.96.0.10"], HTTP),
                        endpoint_slice("web-1", "web", [endpoint("10.244.1.5")], EP_HTTP))
    u = c.drain()
    assert u.full
    assert u.changed == {4: frozenset({spn("web")}), 6: frozenset()}
    assert (u.services_changed, u.endpoints_changed) == (1, 1)
    assert c.endpoints(spn("web")) == ["10.244.1.5:8080"]
    assert c.model.pending == (0, 0)


def test_drain_without_changes_changes_nothing() -> None:
    c = Cluster().apply(service("web", ["10.96.0.10"], HTTP))
    c.drain()
    u = c.drain()
    assert not u.full
    assert u.changed == {4: frozenset(), 6: frozenset()}


def test_drain_returns_only_changed_ports_per_family() -> None:
    """A dual-stack Service with two ports; the IPv4 slice moves its dns target port: only the IPv4
    plan of the dns port changes, the http port and the whole IPv6 side are untouched."""
    ports = HTTP + DNS
    c = Cluster().apply(
        service("web", ["10.96.0.10", "fd00:96::a"], ports),
        endpoint_slice("web-v4", "web", [endpoint("10.244.1.5")], EP_HTTP + EP_DNS),
        endpoint_slice("web-v6", "web", [endpoint("fd00:244::5")], EP_HTTP + EP_DNS, address_type="IPv6"),
    )
    first = c.drain()
    assert first.changed[4] == first.changed[6] == frozenset({spn("web"), spn("web", "dns", "UDP")})
    c.apply(endpoint_slice("web-v4", "web", [endpoint("10.244.1.5")],
                           [*EP_HTTP, {"name": "dns", "port": 5354, "protocol": "UDP"}]))
    u = c.drain()
    assert not u.full
    assert u.changed == {4: frozenset({spn("web", "dns", "UDP")}), 6: frozenset()}
    assert c.endpoints(spn("web", "dns", "UDP")) == ["10.244.1.5:5354"]
    assert c.endpoints(spn("web", "dns", "UDP"), family=6) == ["[fd00:244::5]:5353"]


def test_one_endpoint_change_touches_only_its_service() -> None:
    c = Cluster().apply(
        service("web", ["10.96.0.10"], HTTP), endpoint_slice("web-1", "web", [endpoint("10.244.1.5")], EP_HTTP),
        service("db", ["10.96.0.20"], HTTP), endpoint_slice("db-1", "db", [endpoint("10.244.2.5")], EP_HTTP),
    )
    c.drain()
    before_db = c.model.desired[4].services[spn("db")]
    c.apply(endpoint_slice("web-1", "web", [endpoint("10.244.1.6")], EP_HTTP))
    u = c.drain()
    assert u.changed[4] == frozenset({spn("web")})
    assert (u.services_changed, u.endpoints_changed) == (0, 1)
    assert c.model.desired[4].services[spn("db")] is before_db  # not even recomputed into a new object


def test_slice_changes_that_do_not_change_the_plan_report_nothing() -> None:
    """A new slice resourceVersion with the same endpoints (say, a label change) changes no plan."""
    c = Cluster().apply(service("web", ["10.96.0.10"], HTTP),
                        endpoint_slice("web-1", "web", [endpoint("10.244.1.5")], EP_HTTP))
    c.drain()
    es = endpoint_slice("web-1", "web", [endpoint("10.244.1.5")], EP_HTTP)
    es["metadata"]["resourceVersion"] = "99"
    c.apply(es)
    assert c.drain().changed[4] == frozenset()


def test_node_zone_change_is_a_full_recompute() -> None:
    """Topology hints: when this node's zone label appears, every plan is recomputed and the hinted
    endpoint for this zone is chosen."""
    c = Cluster().apply(
        node(),
        service("web", ["10.96.0.10"], HTTP),
        endpoint_slice("web-1", "web", [endpoint("10.244.1.5", hints=["zone-a"]),
                                        endpoint("10.244.2.5", hints=["zone-b"])], EP_HTTP),
    )
    c.drain()
    assert c.endpoints(spn("web")) == ["10.244.1.5:8080", "10.244.2.5:8080"]
    c.apply(node(zone="zone-a"))
    u = c.drain()
    assert u.full
    assert u.changed[4] == frozenset({spn("web")})
    assert c.model.desired[4].node.zone == "zone-a"
    assert c.endpoints(spn("web")) == ["10.244.1.5:8080"]


def test_same_node_again_is_not_a_full_sync() -> None:
    c = Cluster().apply(node(zone="zone-a"))
    c.drain()
    c.apply(node(zone="zone-a"))
    assert not c.drain().full


def test_node_being_deleted() -> None:
    c = Cluster().apply(node(zone="zone-a"))
    assert not c.model.node_deleting
    c.apply(node(zone="zone-a", deleting=True))
    assert c.model.node_deleting


def test_service_deletion_removes_its_plans() -> None:
    c = Cluster().apply(service("web", ["10.96.0.10", "fd00:96::a"], HTTP),
                        endpoint_slice("web-1", "web", [endpoint("10.244.1.5")], EP_HTTP))
    c.drain()
    c.delete("Service", "web")
    u = c.drain()
    assert u.changed == {4: frozenset({spn("web")}), 6: frozenset({spn("web")})}
    assert c.model.desired[4].services == {}
    assert c.model.desired[6].services == {}


@pytest.mark.parametrize(
    "change",
    [
        pytest.param({"clusterIP": "None", "clusterIPs": ["None"]}, id="becomes-headless"),
        pytest.param({"type": "ExternalName", "externalName": "db.example.com"}, id="becomes-ExternalName"),
    ],
)
def test_service_no_longer_proxied_removes_its_plans(change: dict[str, Any]) -> None:
    c = Cluster().apply(service("web", ["10.96.0.10"], HTTP))
    c.drain()
    svc = service("web", ["10.96.0.10"], HTTP)
    svc["spec"].update(change)
    c.apply(svc)
    assert c.drain().changed[4] == frozenset({spn("web")})
    assert c.model.desired[4].services == {}


def test_slice_deletion_leaves_the_service_without_endpoints() -> None:
    c = Cluster().apply(service("web", ["10.96.0.10"], HTTP),
                        endpoint_slice("web-1", "web", [endpoint("10.244.1.5")], EP_HTTP))
    c.drain()
    c.delete("EndpointSlice", "web-1")
    assert c.drain().changed[4] == frozenset({spn("web")})
    plan = c.model.desired[4].services[spn("web")]
    assert (plan.cluster, plan.has_any) == ((), False)


def test_slice_relabelled_to_another_service_moves_its_endpoints() -> None:
    c = Cluster().apply(service("web", ["10.96.0.10"], HTTP), service("db", ["10.96.0.20"], HTTP),
                        endpoint_slice("shared", "web", [endpoint("10.244.1.5")], EP_HTTP))
    c.drain()
    c.apply(endpoint_slice("shared", "db", [endpoint("10.244.1.5")], EP_HTTP))
    u = c.drain()
    assert u.changed[4] == frozenset({spn("web"), spn("db")})
    assert c.endpoints(spn("web")) == []
    assert c.endpoints(spn("db")) == ["10.244.1.5:8080"]


def test_slice_arriving_before_its_service() -> None:
    """Watches race: the slice may come first; the plan appears with the Service."""
    c = Cluster().apply(endpoint_slice("web-1", "web", [endpoint("10.244.1.5")], EP_HTTP))
    assert c.drain().changed[4] == frozenset()
    c.apply(service("web", ["10.96.0.10"], HTTP))
    assert c.drain().changed[4] == frozenset({spn("web")})
    assert c.endpoints(spn("web")) == ["10.244.1.5:8080"]


def test_problems_and_trigger_times() -> None:
    """Invalid parts come back from on_service/on_slice; duplicate endpoints with different state come
    back from drain(); last-change-trigger-time annotations are collected for the latency metric."""
    c = Cluster().apply(
        service("web", ["10.96.0.10"], [*HTTP, {"name": "bad", "port": 0}]),
        endpoint_slice("web-1", "web", [endpoint("10.244.1.5", ready=False)], EP_HTTP,
                       trigger="2024-05-01T10:00:00Z"),
        endpoint_slice("web-2", "web", [endpoint("10.244.1.5"), endpoint("nope")], EP_HTTP),
    )
    assert sorted((p.kind, p.reason) for p in c.problems) == [("EndpointSlice", "invalid_ip"),
                                                             ("Service", "invalid_port")]
    u = c.drain()
    assert u.trigger_times == ["2024-05-01T10:00:00Z"]
    assert [(p.object, p.reason) for p in u.problems] == [("shop/web", "duplicate_endpoint")]
    assert c.endpoints(spn("web")) == ["10.244.1.5:8080"]  # the ready copy


def test_nodeport_addresses_follow_local_ips() -> None:
    """--nodeport-addresses 192.168.0.0/16: only this node's addresses inside it take NodePorts; a new
    address is a node-wide change, hence a full sync."""
    c = Cluster(nodeport_cidrs=["192.168.0.0/16"])
    seen: list[tuple[str, ...] | None] = []
    c.model.set_local_ips(["10.0.0.1", "192.168.1.10"])
    assert c.drain().full
    seen.append(c.model.desired[4].node.nodeport_ips)
    c.model.set_local_ips(["10.0.0.1", "192.168.1.10"])
    assert not c.drain().full
    c.model.set_local_ips(["10.0.0.1", "192.168.1.10", "192.168.2.20"])
    assert c.drain().full
    seen.append(c.model.desired[4].node.nodeport_ips)
    assert seen == [("192.168.1.10",), ("192.168.1.10", "192.168.2.20")]


def test_without_nodeport_addresses_every_local_address_takes_node_ports() -> None:
    c = Cluster()
    c.model.set_local_ips(["10.0.0.1"])
    c.drain()
    assert c.model.desired[4].node.nodeport_ips is None
    assert c.model.desired[6].node.nodeport_ips is None


def test_nodeport_addresses_of_one_family_leave_the_other_family_open() -> None:
    c = Cluster(nodeport_cidrs=["192.168.0.0/16"])
    c.model.set_local_ips(["192.168.1.10", "2001:db8::10"])
    c.drain()
    assert c.model.desired[4].node.nodeport_ips == ("192.168.1.10",)
    assert c.model.desired[6].node.nodeport_ips is None


def test_cluster_cidrs_are_split_per_family() -> None:
    c = Cluster(cluster_cidrs=["10.244.0.0/16", "fd00:244::/48"], masquerade_all=True)
    assert c.model.desired[4].node.cluster_cidrs == ("10.244.0.0/16",)
    assert c.model.desired[6].node.cluster_cidrs == ("fd00:244::/48",)
    assert c.model.desired[4].node.masquerade_all


# -- stale UDP flows -------------------------------------------------------------------------

UDP_SVC = service("dns", ["10.96.0.53"], [{"name": "dns", "port": 53, "protocol": "UDP", "nodePort": 30053}],
                  type="NodePort", externalIPs=["192.0.2.53"])


def test_udp_endpoint_removed_flushes_its_flows_on_every_frontend() -> None:
    """A UDP endpoint goes away: conntrack entries DNATed to it would keep sending packets into the
    void, so they are deleted for the cluster IP, the external IP and the node port (any address)."""
    c = Cluster().apply(UDP_SVC, endpoint_slice("dns-1", "dns", [endpoint("10.244.1.5"), endpoint("10.244.1.6")],
                                                 EP_DNS))
    c.drain()
    c.apply(endpoint_slice("dns-1", "dns", [endpoint("10.244.1.6")], EP_DNS))
    u = c.drain()
    assert sorted(u.stale_flows, key=repr) == sorted([
        StaleFlow(4, "10.96.0.53", 53, "10.244.1.5"),
        StaleFlow(4, "192.0.2.53", 53, "10.244.1.5"),
        StaleFlow(4, None, 30053, "10.244.1.5"),
    ], key=repr)


def test_udp_endpoint_turning_unready_flushes_its_flows() -> None:
    c = Cluster().apply(UDP_SVC, endpoint_slice("dns-1", "dns", [endpoint("10.244.1.5"), endpoint("10.244.1.6")],
                                                 EP_DNS))
    c.drain()
    c.apply(endpoint_slice("dns-1", "dns", [endpoint("10.244.1.5", ready=False), endpoint("10.244.1.6")], EP_DNS))
    assert {f.endpoint_ip for f in c.drain().stale_flows} == {"10.244.1.5"}


def test_udp_service_gaining_its_first_endpoint_flushes_black_holed_flows() -> None:
    """While a UDP Service had no endpoint, clients' packets created conntrack entries that go
    nowhere; when the first endpoint appears they are deleted (any endpoint)."""
    c = Cluster().apply(UDP_SVC)
    c.drain()
    c.apply(endpoint_slice("dns-1", "dns", [endpoint("10.244.1.5")], EP_DNS))
    u = c.drain()
    assert sorted(u.stale_flows, key=repr) == sorted([
        StaleFlow(4, "10.96.0.53", 53, None),
        StaleFlow(4, "192.0.2.53", 53, None),
        StaleFlow(4, None, 30053, None),
    ], key=repr)


def test_udp_service_deleted_flushes_flows_to_its_endpoints() -> None:
    c = Cluster().apply(service("dns", ["10.96.0.53"], DNS),
                        endpoint_slice("dns-1", "dns", [endpoint("10.244.1.5")], EP_DNS))
    c.drain()
    c.delete("Service", "dns")
    assert c.drain().stale_flows == [StaleFlow(4, "10.96.0.53", 53, "10.244.1.5")]


def test_udp_endpoint_added_to_a_serving_service_flushes_nothing() -> None:
    c = Cluster().apply(service("dns", ["10.96.0.53"], DNS),
                        endpoint_slice("dns-1", "dns", [endpoint("10.244.1.5")], EP_DNS))
    c.drain()
    c.apply(endpoint_slice("dns-1", "dns", [endpoint("10.244.1.5"), endpoint("10.244.1.6")], EP_DNS))
    assert c.drain().stale_flows == []


def test_ipv6_udp_flows() -> None:
    c = Cluster().apply(service("dns", ["fd00:96::53"], DNS),
                        endpoint_slice("dns-1", "dns", [endpoint("fd00:244::5"), endpoint("fd00:244::6")], EP_DNS,
                                       address_type="IPv6"))
    c.drain()
    c.apply(endpoint_slice("dns-1", "dns", [endpoint("fd00:244::6")], EP_DNS, address_type="IPv6"))
    assert c.drain().stale_flows == [StaleFlow(6, "fd00:96::53", 53, "fd00:244::5")]


def test_tcp_endpoint_gone_produces_no_stale_flows() -> None:
    """TCP connections to a gone endpoint are reset by the kernel; only the first endpoint names
    TCP flows (the unanswered attempts before it)."""
    c = Cluster().apply(service("web", ["10.96.0.10"], HTTP))
    c.drain()
    c.apply(endpoint_slice("web-1", "web", [endpoint("10.244.1.5")], EP_HTTP))
    assert [f.protocol for f in c.drain().stale_flows] == ["TCP"]
    c.apply(endpoint_slice("web-1", "web", [], EP_HTTP))
    assert c.drain().stale_flows == []


def test_udp_endpoint_terminating_but_serving_keeps_its_flows() -> None:
    """A DNS pod is being deleted (terminating, still serving) while another is ready: existing UDP
    clients keep talking to it until it stops serving."""
    c = Cluster().apply(UDP_SVC, endpoint_slice("dns-1", "dns", [endpoint("10.244.1.5"), endpoint("10.244.1.6")],
                                                 EP_DNS))
    c.drain()
    c.apply(endpoint_slice("dns-1", "dns", [endpoint("10.244.1.5", ready=False, serving=True, terminating=True),
                                            endpoint("10.244.1.6")], EP_DNS))
    assert c.drain().stale_flows == []


def test_desired_table_is_printable() -> None:
    c = Cluster().apply(service("web", ["10.96.0.10"], [{"name": "http", "port": 80, "nodePort": 30080}],
                                type="NodePort", sessionAffinity="ClientIP"),
                        endpoint_slice("web-1", "web", [endpoint("10.244.1.5")], EP_HTTP))
    c.drain()
    assert c.model.desired[4].table() == (
        "# IPv4 node=node-a services=1\n"
        "shop/web:http 10.96.0.10:80/TCP nodePort 30080 -> 10.244.1.5:8080 affinity=10800s\n"
    )


def test_slice_for_an_unknown_service_is_reported_once_and_ignored() -> None:
    """A slice whose kubernetes.io/service-name names no Service: one problem, nothing programmed;
    slices of headless Services are normal and not reported."""
    c = Cluster().apply(
        service("headless", ["None"], HTTP),
        endpoint_slice("ghost-1", "ghost", [endpoint("10.244.0.9")], EP_HTTP),
        endpoint_slice("headless-1", "headless", [endpoint("10.244.0.8")], EP_HTTP),
    )
    update = c.drain()
    assert [(p.object, p.reason) for p in update.problems] == [("shop/ghost-1", "unknown_service")]
    assert not c.model.desired[4].services
    assert not c.drain().problems  # not repeated while nothing changes
    c.apply(service("ghost", ["10.96.0.30"], HTTP))
    c.drain()
    assert c.endpoints(spn("ghost")) == ["10.244.0.9:8080"]


def test_incremental_drains_match_a_model_built_from_scratch() -> None:
    """Random changes drained one batch at a time give the same desired state as a new model fed
    only the final objects, and every port whose plan changed is reported as changed."""
    rnd = random.Random(20261125)
    objects: dict[tuple[str, str], dict[str, Any]] = {}
    current_node = node()
    c = Cluster().apply(current_node)
    c.drain()
    port_sets = [HTTP, DNS, [*HTTP, {"name": "https", "port": 443, "protocol": "TCP"}]]
    ep_port_sets = [EP_HTTP, EP_DNS, [*EP_HTTP, {"name": "https", "port": 8443, "protocol": "TCP"}]]
    for _ in range(300):
        for _ in range(rnd.randint(1, 4)):
            n = rnd.randint(0, 7)
            name, op = f"s{n}", rnd.random()
            if op < 0.35:
                obj = service(name, rnd.choice([[f"10.96.0.{n + 1}"], [f"10.96.0.{n + 1}", f"fd00:96::{n + 1}"]]),
                              rnd.choice(port_sets))
                objects[("Service", name)] = obj
                c.apply(obj)
            elif op < 0.5:
                objects.pop(("Service", name), None)
                c.delete("Service", name)
            elif op < 0.85:
                eps = [endpoint(f"10.244.{rnd.randint(1, 2)}.{rnd.randint(2, 9)}", node=rnd.choice([NODE, "node-b"]),
                                ready=rnd.random() < 0.8) for _ in range(rnd.randint(0, 3))]
                obj = endpoint_slice(f"{name}-{rnd.randint(1, 2)}", name, eps, rnd.choice(ep_port_sets))
                objects[("EndpointSlice", obj["metadata"]["name"])] = obj
                c.apply(obj)
            elif op < 0.95:
                slice_name = f"{name}-{rnd.randint(1, 2)}"
                objects.pop(("EndpointSlice", slice_name), None)
                c.delete("EndpointSlice", slice_name)
            else:
                current_node = node(zone=rnd.choice(["", "z1", "z2"]))
                c.apply(current_node)
        before = {f: dict(c.model.desired[f].services) for f in (4, 6)}
        u = c.drain()
        fresh = Cluster().apply(current_node, *(objects[k] for k in sorted(objects)))
        fresh.drain()
        for f in (4, 6):
            after = c.model.desired[f].services
            differ = {k for k in set(before[f]) | set(after) if before[f].get(k) != after.get(k)}
            assert differ <= u.changed[f], (f, differ - u.changed[f])
            assert after == fresh.model.desired[f].services, f


def test_service_cidrs_are_the_union_of_the_servicecidr_objects() -> None:
    """ServiceCIDR objects (networking.k8s.io/v1): their CIDRs, split per family, are node-wide
    (a change is a full sync); an entry that is not a CIDR is a problem and is skipped."""
    c = Cluster()
    c.drain()

    def cidr_obj(name: str, *cidrs: str) -> ServiceCIDR:
        rec = from_builtins("ServiceCIDR", {"kind": "ServiceCIDR", "metadata": {"name": name},
                                            "spec": {"cidrs": list(cidrs)}})
        assert isinstance(rec, ServiceCIDR)
        return rec

    assert c.model.on_service_cidr(NamespacedName("", "kubernetes"), cidr_obj("kubernetes", "10.96.0.0/16",
                                                                              "fd00:96::/112")) == []
    problems = c.model.on_service_cidr(NamespacedName("", "extra"), cidr_obj("extra", "10.100.0.0/16", "bogus"))
    assert [p.reason for p in problems] == ["invalid_cidr"] and "bogus" in problems[0].detail
    assert c.drain().full
    assert c.model.desired[4].node.service_cidrs == ("10.100.0.0/16", "10.96.0.0/16")
    assert c.model.desired[6].node.service_cidrs == ("fd00:96::/112",)
    c.model.on_service_cidr(NamespacedName("", "extra"), cidr_obj("extra", "10.100.0.0/16"))
    assert not c.drain().full  # the same CIDRs
    c.model.on_service_cidr(NamespacedName("", "extra"), None)
    assert c.drain().full
    assert c.model.desired[4].node.service_cidrs == ("10.96.0.0/16",)


def test_node_in_load_balancer_source_ranges_follows_the_node_addresses() -> None:
    """Only Services with source ranges (and LB IPs) are recomputed when the node's addresses change,
    and only their plans change when the node moves into or out of a range."""
    c = Cluster()
    lb = service("lb", ["10.96.0.20"], HTTP, type="LoadBalancer", loadBalancerSourceRanges=["192.168.0.0/16"])
    lb["status"] = {"loadBalancer": {"ingress": [{"ip": "203.0.113.7"}]}}
    c.apply(lb, service("web", ["10.96.0.10"], HTTP))
    c.model.set_local_ips(["10.0.0.1", "127.0.0.1"])
    c.drain()
    plan = c.model.desired[4].services[spn("lb")]
    assert not plan.node_in_source_ranges and plan.source_ranges == ("192.168.0.0/16",)
    c.model.set_local_ips(["192.168.1.10"])
    assert c.drain().changed[4] == {spn("lb")}
    assert c.model.desired[4].services[spn("lb")].source_ranges == ("192.168.0.0/16", "203.0.113.7/32")
    fronts = c.model.desired[4].frontends.of_port(spn("lb"))
    assert [f.source_ranges for f in fronts if f.kind == "LoadBalancerIP"] == [("192.168.0.0/16", "203.0.113.7/32")]


def test_nodeport_addresses_primary_follows_the_node_object() -> None:
    """--nodeport-addresses primary (kube-proxy's default in nftables mode): NodePorts only on the
    node's primary IP per family, its first InternalIP (else ExternalIP) from the Node object; a
    family without one takes every address; a changed address is a node-wide change."""
    c = Cluster(nodeport_cidrs=["primary"])
    c.model.set_local_ips(["10.0.0.5", "192.168.1.10", "fd00::5", "127.0.0.1"])
    meta = {"name": NODE}
    c.apply({"kind": "Node", "metadata": meta, "status": {"addresses": [
        {"type": "Hostname", "address": NODE}, {"type": "ExternalIP", "address": "10.0.0.5"},
        {"type": "InternalIP", "address": "192.168.1.10"}]}})
    assert c.drain().full
    assert c.model.desired[4].node.nodeport_ips == ("192.168.1.10",)
    assert c.model.desired[6].node.nodeport_ips is None
    c.apply({"kind": "Node", "metadata": meta, "status": {"addresses": [
        {"type": "ExternalIP", "address": "10.0.0.5"}, {"type": "InternalIP", "address": "fd00::5"}]}})
    assert c.drain().full
    assert c.model.desired[4].node.nodeport_ips == ("10.0.0.5",)
    assert c.model.desired[6].node.nodeport_ips == ("fd00::5",)
    # without "primary" the Node's addresses do not matter (no full sync when they change)
    plain = Cluster()

    def node_at(ip: str) -> dict[str, Any]:
        return {"kind": "Node", "metadata": meta, "status": {"addresses": [{"type": "InternalIP", "address": ip}]}}
    plain.apply(node_at("10.0.0.7"))
    plain.drain()
    plain.apply(node_at("10.0.0.8"))
    assert not plain.drain().full


def test_tcp_port_gaining_its_first_endpoint_names_unanswered_attempts_only() -> None:
    """TCP attempts made while a port had no endpoint (or before the proxy knew the Service) are
    never-DNATed SYN_SENT entries a retrying client keeps meeting; they are named when the first
    endpoint appears, and nothing when an endpoint goes (kube-proxy leaves TCP flows alone)."""
    tcp = [{"name": "web", "port": 80, "protocol": "TCP"}]
    c = Cluster().apply(service("web", ["10.96.0.80"], tcp))
    c.drain()
    c.apply(endpoint_slice("web-1", "web", [endpoint("10.244.1.5"), endpoint("10.244.1.6")],
                           [{"name": "web", "port": 8080, "protocol": "TCP"}]))
    assert c.drain().stale_flows == [StaleFlow(4, "10.96.0.80", 80, None, protocol="TCP")]
    c.apply(endpoint_slice("web-1", "web", [endpoint("10.244.1.6")],
                           [{"name": "web", "port": 8080, "protocol": "TCP"}]))
    assert c.drain().stale_flows == []
