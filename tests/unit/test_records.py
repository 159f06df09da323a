"""Records: Services, EndpointSlices and Nodes decoded from what the API serves (JSON) or what a
--source file holds (YAML loaded to dicts). Only the fields the agent reads; anything else is ignored;
a wrong type fails that one object with a DecodeError that says which object and which field.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from agent.model.records import (
    DecodeError,
    EndpointSlice,
    Node,
    Service,
    from_builtins,
    from_json,
)

# A Service as `kubectl get svc web -o json` shows it, with fields the agent never reads.
API_SERVICE: dict[str, Any] = {
    "apiVersion": "v1",
    "kind": "Service",
    "metadata": {
        "name": "web",
        "namespace": "shop",
        "uid": "0b6c1d1e-0000-4000-8000-000000000001",
        "resourceVersion": "4242",
        "creationTimestamp": "2024-05-01T10:00:00Z",
        "labels": {"app": "web"},
        "annotations": {"note": "x"},
        "managedFields": [{"manager": "kubectl", "operation": "Update"}],
    },
    "spec": {
        "type": "LoadBalancer",
        "selector": {"app": "web"},
        "clusterIP": "10.96.0.10",
        "clusterIPs": ["10.96.0.10", "fd00:96::a"],
        "ipFamilies": ["IPv4", "IPv6"],
        "ipFamilyPolicy": "PreferDualStack",
        "ports": [
            {"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP", "nodePort": 30080,
             "appProtocol": "http"},
            {"name": "dns", "port": 53, "targetPort": 5353, "protocol": "UDP", "nodePort": 30053},
        ],
        "externalIPs": ["192.0.2.10"],
        "sessionAffinity": "ClientIP",
        "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 600}},
        "externalTrafficPolicy": "Local",
        "internalTrafficPolicy": "Local",
        "healthCheckNodePort": 32000,
        "loadBalancerSourceRanges": ["203.0.113.0/24"],
        "allocateLoadBalancerNodePorts": True,
    },
    "status": {
        "loadBalancer": {"ingress": [{"ip": "198.51.100.7", "ipMode": "VIP", "ports": []}]},
        "conditions": [],
    },
}

API_SLICE: dict[str, Any] = {
    "apiVersion": "discovery.k8s.io/v1",
    "kind": "EndpointSlice",
    "metadata": {
        "name": "web-x7k2p",
        "namespace": "shop",
        "labels": {"kubernetes.io/service-name": "web", "endpointslice.kubernetes.io/managed-by": "x"},
        "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": "2024-05-01T10:00:01Z"},
        "ownerReferences": [{"kind": "Service", "name": "web"}],
    },
    "addressType": "IPv4",
    "endpoints": [
        {
            "addresses": ["10.244.1.5"],
            "conditions": {"ready": False, "serving": True, "terminating": True},
            "nodeName": "node-a",
            "zone": "zone-a",
            "hints": {"forZones": [{"name": "zone-a"}]},
            "targetRef": {"kind": "Pod", "name": "web-1"},
        }
    ],
    "ports": [{"name": "http", "port": 8080, "protocol": "TCP", "appProtocol": "http"}],
}

API_NODE: dict[str, Any] = {
    "apiVersion": "v1",
    "kind": "Node",
    "metadata": {
        "name": "node-a",
        "labels": {"topology.kubernetes.io/zone": "zone-a"},
        "deletionTimestamp": "2024-05-01T11:00:00Z",
    },
    "spec": {"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24", "fd00:244:1::/64"]},
    "status": {
        "addresses": [{"type": "InternalIP", "address": "192.168.1.10"}, {"type": "Hostname", "address": "node-a"}],
        "capacity": {"cpu": "4"},
    },
}


def check_service(svc: Service) -> None:
    assert svc.metadata.namespace == "shop"
    assert svc.metadata.name == "web"
    assert svc.metadata.labels == {"app": "web"}
    assert svc.metadata.resource_version == "4242"
    spec = svc.spec
    assert spec.type == "LoadBalancer"
    assert spec.cluster_ip == "10.96.0.10"
    assert spec.cluster_ips == ["10.96.0.10", "fd00:96::a"]
    assert spec.external_ips == ["192.0.2.10"]
    assert [(p.name, p.port, p.protocol, p.target_port, p.node_port) for p in spec.ports] == [
        ("http", 80, "TCP", "http", 30080),
        ("dns", 53, "UDP", 5353, 30053),
    ]
    assert spec.session_affinity == "ClientIP"
    assert spec.session_affinity_config is not None
    assert spec.session_affinity_config.client_ip is not None
    assert spec.session_affinity_config.client_ip.timeout_seconds == 600
    assert spec.external_traffic_policy == "Local"
    assert spec.internal_traffic_policy == "Local"
    assert spec.health_check_node_port == 32000
    assert spec.load_balancer_source_ranges == ["203.0.113.0/24"]
    ingress = svc.status.load_balancer.ingress
    assert [(i.ip, i.ip_mode) for i in ingress] == [("198.51.100.7", "VIP")]


def check_slice(es: EndpointSlice) -> None:
    assert es.metadata.labels["kubernetes.io/service-name"] == "web"
    assert es.address_type == "IPv4"
    assert es.endpoints is not None
    (ep,) = es.endpoints
    assert ep.addresses == ["10.244.1.5"]
    assert (ep.conditions.ready, ep.conditions.serving, ep.conditions.terminating) == (False, True, True)
    assert ep.node_name == "node-a"
    assert ep.zone == "zone-a"
    assert ep.hints is not None
    assert [z.name for z in ep.hints.for_zones] == ["zone-a"]
    assert es.ports is not None
    assert [(p.name, p.port, p.protocol) for p in es.ports] == [("http", 8080, "TCP")]


def check_node(node: Node) -> None:
    assert node.metadata.name == "node-a"
    assert node.metadata.labels["topology.kubernetes.io/zone"] == "zone-a"
    assert node.metadata.deletion_timestamp == "2024-05-01T11:00:00Z"
    assert node.spec.pod_cidrs == ["10.244.1.0/24", "fd00:244:1::/64"]
    assert [(a.type, a.address) for a in node.status.addresses] == [
        ("InternalIP", "192.168.1.10"),
        ("Hostname", "node-a"),
    ]


def test_service_from_a_yaml_dict_reads_every_field_the_agent_uses() -> None:
    """A dual-stack LoadBalancer Service with every field kube-proxy reads: the camel-case API
    names (clusterIPs, externalIPs, clientIP, ipMode ...) land in the right record fields."""
    svc = from_builtins("Service", API_SERVICE)
    assert isinstance(svc, Service)
    check_service(svc)


def test_service_from_api_json_reads_the_same() -> None:
    """The watch path decodes raw JSON bytes to the same record as the file path."""
    svc = from_json("Service", json.dumps(API_SERVICE).encode())
    assert svc == from_builtins("Service", API_SERVICE)


@pytest.mark.parametrize("decode", ["builtins", "json"])
def test_endpointslice_fields(decode: str) -> None:
    """An EndpointSlice with one terminating-but-serving endpoint, a zone hint and a named port."""
    es = (from_builtins("EndpointSlice", API_SLICE) if decode == "builtins"
          else from_json("EndpointSlice", json.dumps(API_SLICE).encode()))
    assert isinstance(es, EndpointSlice)
    check_slice(es)


@pytest.mark.parametrize("decode", ["builtins", "json"])
def test_node_fields(decode: str) -> None:
    """A Node being deleted, in zone-a, with dual-stack pod CIDRs."""
    node = (from_builtins("Node", API_NODE) if decode == "builtins"
            else from_json("Node", json.dumps(API_NODE).encode()))
    assert isinstance(node, Node)
    check_node(node)


def test_minimal_service_gets_kubernetes_defaults() -> None:
    """Fields left out take the API defaults: type ClusterIP, protocol TCP, no affinity, policies Cluster."""
    svc = from_builtins("Service", {"metadata": {"name": "web", "namespace": "shop"},
                                    "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}})
    assert isinstance(svc, Service)
    assert svc.spec.type == "ClusterIP"
    assert svc.spec.cluster_ips == []
    assert svc.spec.ports[0].protocol == "TCP"
    assert svc.spec.ports[0].name == ""
    assert svc.spec.ports[0].node_port == 0
    assert svc.spec.session_affinity == "None"
    assert svc.spec.session_affinity_config is None
    assert svc.spec.external_traffic_policy == "Cluster"
    assert svc.spec.internal_traffic_policy == "Cluster"
    assert svc.status.load_balancer.ingress == []


def test_endpointslice_with_null_endpoints_and_ports() -> None:
    """The API serializes an empty slice as `endpoints: null` (the field is not omitempty)."""
    es = from_json("EndpointSlice", b'{"metadata":{"name":"e"},"addressType":"IPv4","endpoints":null,"ports":null}')
    assert isinstance(es, EndpointSlice)
    assert es.endpoints is None
    assert es.ports is None


def test_unknown_fields_are_ignored_at_every_level() -> None:
    """New API fields (or typos) anywhere in the object never fail the decode."""
    obj = {
        "kind": "Service",
        "future": {"x": 1},
        "metadata": {"name": "web", "namespace": "shop", "generateName": "w-"},
        "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80, "unknownPortField": [1, 2]}],
                 "newSpecField": True},
        "status": {"loadBalancer": {"ingress": [{"ip": "198.51.100.7", "unknown": "y"}]}},
    }
    svc = from_builtins("Service", obj)
    assert isinstance(svc, Service)
    assert svc.spec.ports[0].port == 80
    assert svc.status.load_balancer.ingress[0].ip == "198.51.100.7"


def test_numbers_written_as_strings_are_accepted() -> None:
    """Decoding is lax: a port quoted in YAML ("80") still reads as the number 80."""
    svc = from_builtins("Service", {"spec": {"ports": [{"port": "80", "nodePort": "30080"}]}})
    assert isinstance(svc, Service)
    assert (svc.spec.ports[0].port, svc.spec.ports[0].node_port) == (80, 30080)


@pytest.mark.parametrize(
    ("kind", "obj", "field"),
    [
        pytest.param("Service", {"spec": {"ports": "80"}}, "$.spec.ports", id="ports-not-a-list"),
        pytest.param("Service", {"spec": {"ports": [{"port": "eighty"}]}}, "$.spec.ports[0].port",
                     id="port-not-a-number"),
        pytest.param("Service", {"spec": {"externalIPs": "192.0.2.1"}}, "$.spec.externalIPs",
                     id="externalIPs-not-a-list"),
        pytest.param("EndpointSlice", {"endpoints": [{"addresses": "10.0.0.1"}]}, "$.endpoints[0].addresses",
                     id="addresses-not-a-list"),
        pytest.param("EndpointSlice", {"endpoints": [{"conditions": {"ready": "maybe"}}]},
                     "$.endpoints[0].conditions.ready", id="ready-not-a-bool"),
        pytest.param("Node", {"metadata": {"labels": ["zone-a"]}}, "$.metadata.labels", id="labels-not-a-map"),
    ],
)
def test_wrong_type_raises_decode_error_naming_object_and_field(kind: str, obj: dict[str, Any], field: str) -> None:
    """One bad object: DecodeError (a ValueError), whose message says which object and which field."""
    full = {"kind": kind, "metadata": {"namespace": "shop", "name": "web"}, **obj}
    if "metadata" in obj:
        full["metadata"] = {"namespace": "shop", "name": "web", **obj["metadata"]}
    with pytest.raises(DecodeError) as exc:
        from_builtins(kind, full)
    message = str(exc.value)
    assert f"{kind} shop/web" in message
    assert field in message
    assert isinstance(exc.value, ValueError)


def test_unsupported_kind_raises_decode_error() -> None:
    with pytest.raises(DecodeError, match="unsupported kind 'Pod'"):
        from_builtins("Pod", {"kind": "Pod", "metadata": {"name": "p"}})
    with pytest.raises(DecodeError, match="unsupported kind 'Pod'"):
        from_json("Pod", b"{}")


def test_malformed_json_raises_decode_error() -> None:
    with pytest.raises(DecodeError, match="malformed JSON"):
        from_json("Service", b'{"metadata": ')


def test_json_wrong_type_names_the_field() -> None:
    with pytest.raises(DecodeError, match=r"\$\.spec\.ports"):
        from_json("Service", b'{"metadata":{"namespace":"shop","name":"web"},"spec":{"ports":"80"}}')


def test_json_wrong_type_names_the_object() -> None:
    """The same bad Service through the API path: the message should say shop/web, as from_builtins does."""
    with pytest.raises(DecodeError) as exc:
        from_json("Service", b'{"metadata":{"namespace":"shop","name":"web"},"spec":{"ports":"80"}}')
    assert "shop/web" in str(exc.value)
