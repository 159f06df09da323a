"""EndpointSlices reduced to endpoints per service port (slice_info, merge_slices), and which of them
serve traffic on this node (categorize, kube-proxy's CategorizeEndpoints).

Each case: the scenario in words, the EndpointSlice(s) or endpoints, the expected result.
"""

from __future__ import annotations

from typing import Any

import pytest

from agent.model.endpoints import EndpointInfo, SliceInfo, merge_slices, slice_info
from agent.model.records import EndpointSlice, from_builtins
from agent.model.serviceport import NamespacedName, ServicePortInfo, ServicePortName
from agent.model.topology import Categorized, categorize

WEB = NamespacedName("shop", "web")
HTTP_KEY = ("http", "TCP")
PORTS = [{"name": "http", "port": 8080, "protocol": "TCP"}]


def endpoint(
    ip: str,
    *,
    ready: bool | None = True,
    serving: bool | None = None,
    terminating: bool | None = None,
    node: str | None = None,
    hints: list[str] | None = None,
) -> dict[str, Any]:
    conditions = {k: v for k, v in (("ready", ready), ("serving", serving), ("terminating", terminating))
                  if v is not None}
    ep: dict[str, Any] = {"addresses": [ip], "conditions": conditions}
    if node is not None:
        ep["nodeName"] = node
    if hints is not None:
        ep["hints"] = {"forZones": [{"name": z} for z in hints]}
    return ep


def endpoint_slice(
    endpoints: list[dict[str, Any]] | None,
    ports: list[dict[str, Any]] | None = None,
    *,
    name: str = "web-abc",
    service: str | None = "web",
    address_type: str = "IPv4",
    annotations: dict[str, str] | None = None,
) -> EndpointSlice:
    labels = {"kubernetes.io/service-name": service} if service is not None else {}
    obj = {
        "kind": "EndpointSlice",
        "metadata": {"namespace": "shop", "name": name, "labels": labels, "annotations": annotations or {}},
        "addressType": address_type,
        "endpoints": endpoints,
        "ports": PORTS if ports is None else ports,
    }
    es = from_builtins("EndpointSlice", obj)
    assert isinstance(es, EndpointSlice)
    return es


def info_of(es: EndpointSlice) -> SliceInfo:
    info, problems = slice_info(es)
    assert problems == []
    assert info is not None
    return info


def endpoints_of(info: SliceInfo, key: tuple[str, str] = HTTP_KEY) -> tuple[EndpointInfo, ...]:
    return dict(info.ports)[key]


# -- slice_info ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("conditions", "expected"),
    [
        pytest.param({}, (True, True, False), id="all-nil-means-ready"),
        pytest.param({"ready": True}, (True, True, False), id="ready"),
        pytest.param({"ready": False}, (False, False, False), id="not-ready-serving-nil-follows-ready"),
        pytest.param({"ready": False, "serving": True, "terminating": True}, (False, True, True),
                     id="terminating-still-serving"),
        pytest.param({"ready": False, "serving": False, "terminating": True}, (False, False, True),
                     id="terminating-not-serving"),
        pytest.param({"serving": False}, (True, False, False), id="ready-nil-serving-false"),
    ],
)
def test_endpoint_conditions(conditions: dict[str, bool], expected: tuple[bool, bool, bool]) -> None:
    """EndpointConditions: a nil `ready` is read as ready; a nil `serving` defers to `ready`; a nil
    `terminating` is false (the EndpointSlice API reference)."""
    ep = {"addresses": ["10.244.1.5"], "conditions": conditions}
    (got,) = endpoints_of(info_of(endpoint_slice([ep])))
    assert (got.ready, got.serving, got.terminating) == expected


def test_slice_info_reads_service_family_ports_nodes_and_hints() -> None:
    """A slice named web-abc labelled for Service web: endpoints keyed by (port name, protocol),
    with the port number from the slice, the node name and zone hints."""
    es = endpoint_slice(
        [endpoint("10.244.1.5", node="node-a", hints=["zone-a"]), endpoint("10.244.2.6", node="node-b")],
        annotations={"endpoints.kubernetes.io/last-change-trigger-time": "2024-05-01T10:00:00Z"},
    )
    info = info_of(es)
    assert info.service == WEB  # from the label, not the slice's own name
    assert info.family == 4
    assert info.trigger_time == "2024-05-01T10:00:00Z"
    assert endpoints_of(info) == (
        EndpointInfo("10.244.1.5", 8080, node_name="node-a", zone_hints=frozenset({"zone-a"})),
        EndpointInfo("10.244.2.6", 8080, node_name="node-b"),
    )


def test_only_the_first_address_of_an_endpoint_is_used() -> None:
    """An endpoint may list several addresses; kube-proxy uses the first one only."""
    es = endpoint_slice([{"addresses": ["10.244.1.5", "10.244.1.6"]}])
    assert [e.ip for e in endpoints_of(info_of(es))] == ["10.244.1.5"]


def test_endpoint_without_addresses_is_skipped_quietly() -> None:
    es = endpoint_slice([{"addresses": []}, endpoint("10.244.1.5")])
    assert [e.ip for e in endpoints_of(info_of(es))] == ["10.244.1.5"]


@pytest.mark.parametrize(
    ("address_type", "bad", "good"),
    [
        pytest.param("IPv4", "fd00:244::5", "10.244.1.5", id="IPv6-address-in-IPv4-slice"),
        pytest.param("IPv6", "10.244.1.5", "fd00:244::5", id="IPv4-address-in-IPv6-slice"),
        pytest.param("IPv4", "10.244.1.999", "10.244.1.5", id="not-an-IP"),
        pytest.param("IPv4", "pod.example.com", "10.244.1.5", id="hostname"),
    ],
)
def test_wrong_family_or_invalid_address_is_skipped_with_a_problem(address_type: str, bad: str, good: str) -> None:
    es = endpoint_slice([endpoint(bad), endpoint(good)], address_type=address_type)
    info, problems = slice_info(es)
    assert info is not None
    assert [e.ip for e in endpoints_of(info)] == [good]
    assert [(p.kind, p.object, p.reason) for p in problems] == [("EndpointSlice", "shop/web-abc", "invalid_ip")]


def test_ipv6_addresses_are_normalised() -> None:
    es = endpoint_slice([endpoint("FD00:244:0::0005")], address_type="IPv6")
    info = info_of(es)
    assert info.family == 6
    (ep,) = endpoints_of(info)
    assert ep.ip == "fd00:244::5"
    assert ep.address == "[fd00:244::5]:8080"


@pytest.mark.parametrize(
    ("ports", "keys", "reasons"),
    [
        pytest.param([{"name": "http", "port": 8080, "protocol": "TCP"}], [("http", "TCP")], [], id="named"),
        pytest.param([{"port": 8080}], [("", "TCP")], [], id="unnamed-default-TCP"),
        pytest.param([{"name": None, "port": 8080, "protocol": None}], [("", "TCP")], [], id="explicit-nulls"),
        pytest.param([{"name": "dns", "port": 53, "protocol": "udp"}], [("dns", "UDP")], [], id="lowercase-UDP"),
        pytest.param([{"name": "dns", "port": 53, "protocol": "UDP"}, {"name": "dns", "port": 53, "protocol": "TCP"}],
                     [("dns", "UDP"), ("dns", "TCP")], [], id="same-name-two-protocols"),
        pytest.param([{"name": "x", "port": 1, "protocol": "ICMP"}, {"name": "ok", "port": 80}], [("ok", "TCP")],
                     ["unknown_protocol"], id="unknown-protocol"),
        pytest.param([{"name": "x"}, {"name": "ok", "port": 80}], [("ok", "TCP")], ["invalid_port"],
                     id="port-missing"),
        pytest.param([{"name": "x", "port": 70000}], [], ["invalid_port"], id="port-out-of-range"),
    ],
)
def test_ports_are_keyed_by_name_and_protocol(ports: list[dict[str, Any]], keys: list[tuple[str, str]],
                                              reasons: list[str]) -> None:
    """A slice port matches the Service port with the same name and protocol."""
    info, problems = slice_info(endpoint_slice([endpoint("10.244.1.5")], ports))
    assert info is not None
    assert [k for k, _ in info.ports] == keys
    assert [p.reason for p in problems] == reasons


def test_fqdn_slice_is_ignored_without_a_problem() -> None:
    """addressType FQDN is legal but kube-proxy does not proxy it."""
    assert slice_info(endpoint_slice([{"addresses": ["db.example.com"]}], address_type="FQDN")) == (None, [])


def test_slice_without_service_name_label_is_a_problem() -> None:
    info, problems = slice_info(endpoint_slice([endpoint("10.244.1.5")], service=None))
    assert info is None
    assert [(p.object, p.reason) for p in problems] == [("shop/web-abc", "no_service_label")]


def test_empty_slice() -> None:
    """The API serves a slice with no endpoints as `endpoints: null`: ports with no endpoints."""
    info = info_of(endpoint_slice(None))
    assert info.ports == ((HTTP_KEY, ()),)


def test_too_many_endpoints_skips_the_slice() -> None:
    es = endpoint_slice([endpoint(f"10.244.{i // 250}.{i % 250 + 1}") for i in range(1001)])
    info, problems = slice_info(es)
    assert info is None
    assert [p.reason for p in problems] == ["too_many_endpoints"]


# -- merge_slices ----------------------------------------------------------------------------


def test_merge_two_slices_of_one_service() -> None:
    """A Service with endpoints spread over two slices: one sorted list per (family, port)."""
    a = info_of(endpoint_slice([endpoint("10.244.2.6")], name="web-a"))
    b = info_of(endpoint_slice([endpoint("10.244.1.5")], name="web-b"))
    merged, dups = merge_slices([a, b])
    assert dups == []
    assert merged == {(4, HTTP_KEY): (EndpointInfo("10.244.1.5", 8080), EndpointInfo("10.244.2.6", 8080))}


def test_merge_keeps_families_and_ports_apart() -> None:
    v4 = info_of(endpoint_slice([endpoint("10.244.1.5")], [{"name": "http", "port": 8080},
                                                          {"name": "dns", "port": 53, "protocol": "UDP"}]))
    v6 = info_of(endpoint_slice([endpoint("fd00:244::5")], address_type="IPv6", name="web-v6"))
    merged, _ = merge_slices([v4, v6])
    assert sorted(merged) == [(4, ("dns", "UDP")), (4, HTTP_KEY), (6, HTTP_KEY)]
    assert merged[(6, HTTP_KEY)] == (EndpointInfo("fd00:244::5", 8080),)


@pytest.mark.parametrize("order", ["unready-first", "ready-first"])
def test_duplicate_endpoint_keeps_the_readiest_and_is_reported(order: str) -> None:
    """During a rollout the same pod IP can appear in two slices with different state: the readiest
    copy wins whatever the order, and the duplicate is reported."""
    unready = info_of(endpoint_slice([endpoint("10.244.1.5", ready=False)], name="web-a"))
    ready = info_of(endpoint_slice([endpoint("10.244.1.5", ready=True)], name="web-b"))
    slices = [unready, ready] if order == "unready-first" else [ready, unready]
    merged, dups = merge_slices(slices)
    assert merged == {(4, HTTP_KEY): (EndpointInfo("10.244.1.5", 8080, ready=True, serving=True),)}
    assert dups == ["10.244.1.5:8080 (port http/TCP)"]


def test_identical_duplicate_is_not_reported() -> None:
    a = info_of(endpoint_slice([endpoint("10.244.1.5")], name="web-a"))
    b = info_of(endpoint_slice([endpoint("10.244.1.5")], name="web-b"))
    merged, dups = merge_slices([a, b])
    assert merged == {(4, HTTP_KEY): (EndpointInfo("10.244.1.5", 8080),)}
    assert dups == []


def test_serving_beats_not_serving_between_unready_duplicates() -> None:
    a = info_of(endpoint_slice([endpoint("10.244.1.5", ready=False, serving=False, terminating=True)], name="a"))
    b = info_of(endpoint_slice([endpoint("10.244.1.5", ready=False, serving=True, terminating=True)], name="b"))
    merged, dups = merge_slices([a, b])
    assert merged[(4, HTTP_KEY)][0].serving
    assert len(dups) == 1


# -- categorize ------------------------------------------------------------------------------

NODE = "node-a"
ZONE = "zone-a"


def port(
    *,
    node_port: int = 0,
    etp_local: bool = False,
    itp_local: bool = False,
) -> ServicePortInfo:
    return ServicePortInfo(
        name=ServicePortName("shop", "web", "http", "TCP"),
        family=4,
        protocol="TCP",
        port=80,
        cluster_ip="10.96.0.10",
        node_port=node_port,
        external_policy_local=etp_local,
        internal_policy_local=itp_local,
    )


def ep(
    ip: str,
    *,
    ready: bool = True,
    serving: bool | None = None,
    terminating: bool = False,
    node: str = "node-b",
    hints: set[str] | None = None,
) -> EndpointInfo:
    return EndpointInfo(ip, 8080, ready, ready if serving is None else serving, terminating, node,
                        None if hints is None else frozenset(hints))


def ips(eps: tuple[EndpointInfo, ...]) -> list[str]:
    return [e.ip for e in eps]


READY_A = ep("10.0.0.1")
READY_B = ep("10.0.0.2")
UNREADY = ep("10.0.0.3", ready=False)
TERM_SERVING = ep("10.0.0.4", ready=False, serving=True, terminating=True)
TERM_GONE = ep("10.0.0.5", ready=False, serving=False, terminating=True)


@pytest.mark.parametrize(
    ("endpoints", "cluster", "has_any"),
    [
        pytest.param([READY_A, READY_B, UNREADY], ["10.0.0.1", "10.0.0.2"], True, id="ready-only"),
        pytest.param([READY_A, TERM_SERVING], ["10.0.0.1"], True, id="ready-beats-terminating"),
        pytest.param([UNREADY, TERM_SERVING, TERM_GONE], ["10.0.0.4"], True, id="fallback-to-terminating-serving"),
        pytest.param([UNREADY, TERM_GONE], [], False, id="nothing-serves"),
        pytest.param([], [], False, id="no-endpoints"),
    ],
)
def test_cluster_endpoints(endpoints: list[EndpointInfo], cluster: list[str], has_any: bool) -> None:
    """Traffic policy Cluster: every ready endpoint; if none is ready, the terminating endpoints that
    still serve (graceful termination); never a not-ready, not-serving one."""
    got = categorize(port(), endpoints, NODE, ZONE)
    assert ips(got.cluster) == cluster
    assert got.local == ()
    assert got.has_any is has_any


LOCAL_READY = ep("10.0.1.1", node=NODE)
LOCAL_TERM = ep("10.0.1.2", ready=False, serving=True, terminating=True, node=NODE)
LOCAL_UNREADY = ep("10.0.1.3", ready=False, node=NODE)


@pytest.mark.parametrize(
    ("endpoints", "cluster", "local", "has_any"),
    [
        pytest.param([LOCAL_READY, READY_A], ["10.0.1.1", "10.0.0.1"], ["10.0.1.1"], True, id="local-and-remote"),
        pytest.param([READY_A], ["10.0.0.1"], [], True, id="remote-only-has-any"),
        pytest.param([LOCAL_TERM, LOCAL_UNREADY, READY_A], ["10.0.0.1"], ["10.0.1.2"], True,
                     id="local-terminating-fallback"),
        pytest.param([LOCAL_TERM, LOCAL_READY], ["10.0.1.1"], ["10.0.1.1"], True, id="local-ready-beats-terminating"),
        pytest.param([LOCAL_UNREADY, UNREADY], [], [], False, id="nothing-serves"),
    ],
)
def test_external_traffic_policy_local(endpoints: list[EndpointInfo], cluster: list[str], local: list[str],
                                       has_any: bool) -> None:
    """externalTrafficPolicy Local on a NodePort Service: external traffic uses endpoints on this node
    (ready, else terminating-and-serving); pods still get cluster endpoints; has_any tells "drop"
    (endpoints exist elsewhere) from "reject" (none anywhere)."""
    got = categorize(port(node_port=30080, etp_local=True), endpoints, NODE, ZONE)
    assert ips(got.cluster) == cluster
    assert ips(got.local) == local
    assert got.has_any is has_any


@pytest.mark.parametrize(
    ("endpoints", "local", "has_any"),
    [
        pytest.param([LOCAL_READY, READY_A], ["10.0.1.1"], True, id="local-and-remote"),
        pytest.param([READY_A], [], True, id="remote-only"),
        pytest.param([TERM_SERVING], [], True, id="remote-terminating-counts-for-has-any"),
        pytest.param([UNREADY], [], False, id="none"),
    ],
)
def test_internal_traffic_policy_local(endpoints: list[EndpointInfo], local: list[str], has_any: bool) -> None:
    """internalTrafficPolicy Local on a ClusterIP Service: only endpoints on this node; cluster-wide
    endpoints are not even computed."""
    got = categorize(port(itp_local=True), endpoints, NODE, ZONE)
    assert got.cluster == ()
    assert ips(got.local) == local
    assert got.has_any is has_any


def test_local_endpoints_are_not_narrowed_by_zone_hints() -> None:
    local = ep("10.0.1.1", node=NODE, hints={"zone-b"})
    here = ep("10.0.0.1", hints={ZONE})
    got = categorize(port(node_port=30080, etp_local=True), [local, here], NODE, ZONE)
    assert ips(got.cluster) == ["10.0.0.1"]
    assert ips(got.local) == ["10.0.1.1"]


@pytest.mark.parametrize(
    ("endpoints", "zone", "cluster", "why"),
    [
        pytest.param([ep("10.0.0.1", hints={"zone-a"}), ep("10.0.0.2", hints={"zone-b"})], ZONE,
                     ["10.0.0.1"], "", id="hints-used"),
        pytest.param([ep("10.0.0.1", hints={"zone-a", "zone-b"}), ep("10.0.0.2", hints={"zone-b"})], ZONE,
                     ["10.0.0.1"], "", id="endpoint-hinted-for-two-zones"),
        pytest.param([ep("10.0.0.1", hints={"zone-a"}), ep("10.0.0.2", ready=False)], ZONE,
                     ["10.0.0.1"], "", id="unready-without-hints-does-not-count"),
        pytest.param([ep("10.0.0.1", hints={"zone-a"}), ep("10.0.0.2")], ZONE,
                     ["10.0.0.1", "10.0.0.2"], "", id="one-ready-endpoint-without-hints"),
        pytest.param([ep("10.0.0.1", hints={"zone-b"}), ep("10.0.0.2", hints={"zone-c"})], ZONE,
                     ["10.0.0.1", "10.0.0.2"], "no endpoint has a hint for zone zone-a", id="no-hint-for-this-zone"),
        pytest.param([ep("10.0.0.1", hints={"zone-a"}), ep("10.0.0.2", hints={"zone-b"})], "",
                     ["10.0.0.1", "10.0.0.2"], "node has no topology.kubernetes.io/zone label",
                     id="node-without-zone"),
    ],
)
def test_topology_aware_hints(endpoints: list[EndpointInfo], zone: str, cluster: list[str], why: str) -> None:
    """Topology Aware Routing: hints narrow the cluster endpoints to this node's zone, but only when
    every ready endpoint carries hints and at least one names this zone; otherwise all are used."""
    got = categorize(port(), endpoints, NODE, zone)
    assert ips(got.cluster) == cluster
    assert got.hints_ignored == why


def test_categorized_is_a_plain_value() -> None:
    assert categorize(port(), [], NODE, ZONE) == Categorized((), (), False, "")
