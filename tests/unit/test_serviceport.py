"""service_ports(): what one Service asks of the node, per port and IP family, as the Kubernetes
Service docs describe it; is_proxied(): which Services kube-proxy leaves alone.

Each case: the scenario in words, the Service (as the API would serve it), the expected facts.
Anything invalid becomes a Problem with a short reason, and the rest of the Service still works.
"""

from __future__ import annotations

from typing import Any

import pytest

from agent.model.records import Service, from_builtins
from agent.model.serviceport import (
    ServicePortInfo,
    ServicePortName,
    is_proxied,
    service_ports,
)

HTTP = {"name": "http", "port": 80, "protocol": "TCP"}


def service(
    spec: dict[str, Any],
    *,
    status: dict[str, Any] | None = None,
    labels: dict[str, str] | None = None,
) -> Service:
    obj: dict[str, Any] = {
        "kind": "Service",
        "metadata": {"namespace": "shop", "name": "web", "labels": labels or {}},
        "spec": {"clusterIP": "10.96.0.10", "ports": [HTTP], **spec},
    }
    if status is not None:
        obj["status"] = status
    svc = from_builtins("Service", obj)
    assert isinstance(svc, Service)
    return svc


def lb_status(*ingress: dict[str, str]) -> dict[str, Any]:
    return {"loadBalancer": {"ingress": list(ingress)}}


def only(infos: list[ServicePortInfo]) -> ServicePortInfo:
    assert len(infos) == 1, infos
    return infos[0]


def reasons(svc: Service) -> list[str]:
    return [p.reason for p in service_ports(svc)[1]]


# -- names -----------------------------------------------------------------------------------


def test_service_port_name_prints_like_kube_proxy() -> None:
    assert str(ServicePortName("shop", "web", "http", "TCP")) == "shop/web:http"
    assert str(ServicePortName("shop", "web", "", "TCP")) == "shop/web"  # a single unnamed port


# -- the types -------------------------------------------------------------------------------


def test_cluster_ip_service() -> None:
    """type ClusterIP, one TCP port 80: reachable on the cluster IP only."""
    infos, problems = service_ports(service({}))
    assert problems == []
    assert only(infos) == ServicePortInfo(
        name=ServicePortName("shop", "web", "http", "TCP"),
        family=4,
        protocol="TCP",
        port=80,
        cluster_ip="10.96.0.10",
    )
    assert not infos[0].externally_accessible


def test_cluster_ip_service_ignores_a_leftover_node_port() -> None:
    """A nodePort on a ClusterIP Service (left over from a type change) opens nothing."""
    info = only(service_ports(service({"ports": [{**HTTP, "nodePort": 30080}]}))[0])
    assert info.node_port == 0
    assert not info.externally_accessible


def test_node_port_service() -> None:
    """type NodePort with nodePort 30080: also reachable on every node address at 30080."""
    info = only(service_ports(service({"type": "NodePort", "ports": [{**HTTP, "nodePort": 30080}]}))[0])
    assert (info.port, info.node_port) == (80, 30080)
    assert info.externally_accessible
    assert info.load_balancer_ips == ()


@pytest.mark.parametrize(
    ("ingress", "expected"),
    [
        pytest.param([{"ip": "198.51.100.7"}], ("198.51.100.7",), id="ingress-ip"),
        pytest.param([{"ip": "198.51.100.7", "ipMode": "VIP"}], ("198.51.100.7",), id="ipMode-VIP"),
        pytest.param([{"ip": "198.51.100.7", "ipMode": "Proxy"}], (), id="ipMode-Proxy-ignored"),
        pytest.param([{"hostname": "lb.example.com"}], (), id="hostname-only-ignored"),
        pytest.param([{"ip": "198.51.100.7"}, {"ip": "198.51.100.8", "ipMode": "Proxy"}, {"ip": "198.51.100.9"}],
                     ("198.51.100.7", "198.51.100.9"), id="mixed"),
    ],
)
def test_load_balancer_ingress_ips(ingress: list[dict[str, str]], expected: tuple[str, ...]) -> None:
    """type LoadBalancer: the node accepts traffic for each status.loadBalancer.ingress IP, except
    when ipMode is Proxy (the load balancer itself proxies, so packets arrive for the node IP)."""
    svc = service({"type": "LoadBalancer", "ports": [{**HTTP, "nodePort": 30080}]}, status=lb_status(*ingress))
    info = only(service_ports(svc)[0])
    assert info.load_balancer_ips == expected
    assert info.node_port == 30080


def test_ingress_ip_of_a_non_load_balancer_service_is_ignored() -> None:
    """A Service changed from LoadBalancer to NodePort may keep a stale status: it is ignored."""
    svc = service({"type": "NodePort", "ports": [{**HTTP, "nodePort": 30080}]},
                  status=lb_status({"ip": "198.51.100.7"}))
    assert only(service_ports(svc)[0]).load_balancer_ips == ()


def test_load_balancer_source_ranges_apply_only_with_a_load_balancer_ip() -> None:
    """loadBalancerSourceRanges restrict the LB IP; whitespace is trimmed, host bits dropped; without an
    LB IP of this family there is nothing to restrict."""
    spec = {"type": "LoadBalancer", "ports": [{**HTTP, "nodePort": 30080}],
            "loadBalancerSourceRanges": [" 203.0.113.9/24", "192.0.2.0/25 "]}
    with_ip = only(service_ports(service(spec, status=lb_status({"ip": "198.51.100.7"})))[0])
    assert with_ip.load_balancer_source_ranges == ("203.0.113.0/24", "192.0.2.0/25")
    without_ip = only(service_ports(service(spec))[0])
    assert without_ip.load_balancer_source_ranges == ()


# -- dual stack ------------------------------------------------------------------------------


def test_dual_stack_service_splits_per_family() -> None:
    """clusterIPs [IPv4, IPv6], two ports: one ServicePortInfo per (port, family), IPv4 first, each with
    only the external IPs, LB IPs and source ranges of its own family."""
    svc = service(
        {
            "type": "LoadBalancer",
            "clusterIPs": ["10.96.0.10", "fd00:96::000a"],
            "ports": [{**HTTP, "nodePort": 30080}, {"name": "dns", "port": 53, "protocol": "UDP", "nodePort": 30053}],
            "externalIPs": ["192.0.2.10", "2001:db8::10", "192.0.2.11"],
            "loadBalancerSourceRanges": ["203.0.113.0/24", "2001:db8:1::/48"],
        },
        status=lb_status({"ip": "198.51.100.7"}, {"ip": "2001:db8:2::7"}),
    )
    infos, problems = service_ports(svc)
    assert problems == []
    got = [(str(i.name), i.protocol, i.family, i.cluster_ip, i.external_ips, i.load_balancer_ips,
            i.load_balancer_source_ranges) for i in infos]
    v4 = (("192.0.2.10", "192.0.2.11"), ("198.51.100.7",), ("203.0.113.0/24",))
    v6 = (("2001:db8::10",), ("2001:db8:2::7",), ("2001:db8:1::/48",))
    assert got == [
        ("shop/web:http", "TCP", 4, "10.96.0.10", *v4),
        ("shop/web:http", "TCP", 6, "fd00:96::a", *v6),  # the IPv6 cluster IP in canonical form
        ("shop/web:dns", "UDP", 4, "10.96.0.10", *v4),
        ("shop/web:dns", "UDP", 6, "fd00:96::a", *v6),
    ]


def test_single_stack_service_ignores_addresses_of_the_other_family() -> None:
    """An IPv4-only Service with an IPv6 external IP: no IPv6 port, the IPv6 address is dropped quietly."""
    infos, problems = service_ports(service({"externalIPs": ["2001:db8::10", "192.0.2.10"]}))
    assert problems == []
    assert only(infos).external_ips == ("192.0.2.10",)


def test_cluster_ips_falls_back_to_cluster_ip() -> None:
    """Objects without clusterIPs (old API servers, hand-written files) use clusterIP."""
    assert only(service_ports(service({"clusterIPs": []}))[0]).cluster_ip == "10.96.0.10"


# -- session affinity ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "seconds", "problem"),
    [
        pytest.param({}, 0, [], id="no-affinity"),
        pytest.param({"sessionAffinity": "ClientIP"}, 10800, [], id="ClientIP-default-3h"),
        pytest.param({"sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {}}}, 10800, [],
                     id="ClientIP-empty-config"),
        pytest.param({"sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 600}}},
                     600, [], id="ClientIP-600s"),
        pytest.param({"sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 86400}}},
                     86400, [], id="ClientIP-max-1d"),
        pytest.param({"sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 0}}},
                     10800, ["invalid_affinity"], id="ClientIP-0s-invalid"),
        pytest.param({"sessionAffinity": "ClientIP",
                      "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 86401}}},
                     10800, ["invalid_affinity"], id="ClientIP-over-1d-invalid"),
        pytest.param({"sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 600}}}, 0, [],
                     id="config-without-ClientIP-ignored"),
    ],
)
def test_session_affinity(spec: dict[str, Any], seconds: int, problem: list[str]) -> None:
    """sessionAffinity ClientIP sticks a client to one endpoint, 10800s unless timeoutSeconds says
    otherwise; an out-of-range timeout is reported and the default used."""
    svc = service(spec)
    assert only(service_ports(svc)[0]).affinity_seconds == seconds
    assert reasons(svc) == problem


# -- traffic policies ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "local", "hc_port"),
    [
        pytest.param({"type": "NodePort", "ports": [{**HTTP, "nodePort": 30080}]}, True, 0, id="NodePort"),
        pytest.param({"type": "LoadBalancer", "ports": [{**HTTP, "nodePort": 30080}], "healthCheckNodePort": 32000},
                     True, 32000, id="LoadBalancer-with-healthCheckNodePort"),
        pytest.param({"externalIPs": ["192.0.2.10"]}, True, 0, id="ClusterIP-with-externalIP"),
        pytest.param({}, False, 0, id="ClusterIP-not-externally-accessible"),
        pytest.param({"healthCheckNodePort": 32000}, False, 0, id="ClusterIP-healthCheckNodePort-ignored"),
    ],
)
def test_external_traffic_policy_local(spec: dict[str, Any], local: bool, hc_port: int) -> None:
    """externalTrafficPolicy Local only means something for traffic from outside: it applies when the
    Service is externally accessible (node port, external IP or LB IP), and only then is the
    healthCheckNodePort served."""
    info = only(service_ports(service({"externalTrafficPolicy": "Local", **spec}))[0])
    assert info.external_policy_local is local
    assert info.health_check_node_port == hc_port
    assert info.uses_local_endpoints is local
    assert info.uses_cluster_endpoints  # pods and the node itself still use every endpoint


def test_external_traffic_policy_cluster_serves_no_health_check_port() -> None:
    svc = service({"type": "LoadBalancer", "ports": [{**HTTP, "nodePort": 30080}], "healthCheckNodePort": 32000})
    info = only(service_ports(svc)[0])
    assert not info.external_policy_local
    assert info.health_check_node_port == 0


def test_external_traffic_policy_local_is_decided_per_family() -> None:
    """Dual-stack ClusterIP Service with an IPv4 external IP only: IPv6 has no external traffic."""
    svc = service({"clusterIPs": ["10.96.0.10", "fd00:96::a"], "externalIPs": ["192.0.2.10"],
                   "externalTrafficPolicy": "Local"})
    v4, v6 = service_ports(svc)[0]
    assert (v4.family, v4.external_policy_local) == (4, True)
    assert (v6.family, v6.external_policy_local) == (6, False)


def test_load_balancer_without_node_ports_still_serves_its_health_check_port() -> None:
    """A proxy-mode load balancer (ipMode Proxy), no node ports allocated, ETP Local, healthCheckNodePort
    32000: the load balancer asks each node on 32000 whether it has a local endpoint."""
    svc = service(
        {"type": "LoadBalancer", "allocateLoadBalancerNodePorts": False, "externalTrafficPolicy": "Local",
         "healthCheckNodePort": 32000},
        status=lb_status({"ip": "198.51.100.7", "ipMode": "Proxy"}),
    )
    assert only(service_ports(svc)[0]).health_check_node_port == 32000


@pytest.mark.parametrize(
    ("spec", "uses_cluster"),
    [
        pytest.param({}, False, id="ClusterIP"),
        pytest.param({"type": "NodePort", "ports": [{**HTTP, "nodePort": 30080}]}, True, id="NodePort"),
    ],
)
def test_internal_traffic_policy_local(spec: dict[str, Any], uses_cluster: bool) -> None:
    """internalTrafficPolicy Local: cluster-IP traffic goes to endpoints on this node only; cluster-wide
    endpoints are still needed when the Service is also reached from outside."""
    info = only(service_ports(service({"internalTrafficPolicy": "Local", **spec}))[0])
    assert info.internal_policy_local
    assert info.uses_local_endpoints
    assert info.uses_cluster_endpoints is uses_cluster


# -- invalid parts are reported, the rest still works ----------------------------------------


@pytest.mark.parametrize(
    ("spec", "reason", "ports_left"),
    [
        pytest.param({"ports": [HTTP, {"name": "x", "port": 81, "protocol": "ICMP"}]}, "unknown_protocol", ["http"],
                     id="unknown-protocol"),
        pytest.param({"ports": [HTTP, {"name": "x", "port": 0}]}, "invalid_port", ["http"], id="port-0"),
        pytest.param({"ports": [HTTP, {"name": "x"}]}, "invalid_port", ["http"], id="port-missing"),
        pytest.param({"ports": [HTTP, {"name": "x", "port": 65536}]}, "invalid_port", ["http"], id="port-65536"),
        pytest.param({"ports": [HTTP, {"name": "http", "port": 8080, "protocol": "TCP"}]}, "duplicate_port",
                     ["http"], id="duplicate-name-and-protocol"),
        pytest.param({"externalIPs": ["192.0.2.999", "192.0.2.10"]}, "invalid_ip", ["http"], id="bad-externalIP"),
        pytest.param({"clusterIPs": ["10.96.0.10", "fd00::zz"]}, "invalid_ip", ["http"], id="bad-second-clusterIP"),
        pytest.param({"type": "LoadBalancer", "loadBalancerSourceRanges": ["not-a-cidr"]}, "invalid_cidr", ["http"],
                     id="bad-source-range"),
        pytest.param({"ports": [{"name": f"p{i}", "port": 1 + i % 65535, "protocol": ("TCP", "UDP")[i // 65535]}
                                for i in range(20_001)]}, "too_many_ports", [], id="20001-ports"),
    ],
)
def test_invalid_parts_are_problems_and_the_rest_is_kept(spec: dict[str, Any], reason: str,
                                                          ports_left: list[str]) -> None:
    """The API validates Services, but the agent never trusts it: a bad part is skipped with a
    Problem (its reason is a metric label) and the rest of the Service is still programmed."""
    svc = service(spec)
    infos, problems = service_ports(svc)
    assert [p.reason for p in problems] == [reason]
    assert problems[0].kind == "Service"
    assert problems[0].object == "shop/web"
    assert sorted({i.name.port for i in infos}) == ports_left


def test_same_port_name_with_another_protocol_is_not_a_duplicate() -> None:
    """DNS on 53 over TCP and UDP under one name: two service ports."""
    svc = service({"ports": [{"name": "dns", "port": 53, "protocol": "UDP"},
                             {"name": "dns", "port": 53, "protocol": "TCP"}]})
    infos, problems = service_ports(svc)
    assert problems == []
    assert [(i.name.port, i.protocol) for i in infos] == [("dns", "UDP"), ("dns", "TCP")]


def test_lowercase_protocol_is_accepted() -> None:
    info = only(service_ports(service({"ports": [{"name": "dns", "port": 53, "protocol": "udp"}]}))[0])
    assert info.protocol == "UDP"
    assert info.name.protocol == "UDP"


def test_node_port_out_of_range_is_ignored_but_the_port_kept() -> None:
    svc = service({"type": "NodePort", "ports": [{**HTTP, "nodePort": 70000}]})
    infos, problems = service_ports(svc)
    assert [p.reason for p in problems] == ["invalid_port"]
    assert only(infos).node_port == 0
    assert infos[0].port == 80


def test_no_valid_cluster_ip_yields_nothing() -> None:
    infos, problems = service_ports(service({"clusterIP": "10.96.0.999", "clusterIPs": ["10.96.0.999"]}))
    assert infos == []
    assert [p.reason for p in problems] == ["invalid_ip"]


# -- is_proxied ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "labels", "expected"),
    [
        pytest.param({}, {}, (True, ""), id="ClusterIP"),
        pytest.param({"clusterIP": "None", "clusterIPs": ["None"]}, {}, (False, "headless"), id="clusterIP-None"),
        pytest.param({"clusterIP": ""}, {}, (False, "headless"), id="no-clusterIP"),
        pytest.param({}, {"service.kubernetes.io/headless": ""}, (False, "headless"), id="headless-label"),
        pytest.param({"type": "ExternalName", "externalName": "db.example.com", "clusterIP": ""}, {},
                     (False, "ExternalName"), id="ExternalName"),
        pytest.param({}, {"service.kubernetes.io/service-proxy-name": "other-proxy"},
                     (False, "labelled for another proxy"), id="service-proxy-name-label"),
        pytest.param({}, {"app": "web"}, (True, ""), id="unrelated-label"),
    ],
)
def test_is_proxied(spec: dict[str, Any], labels: dict[str, str], expected: tuple[bool, str]) -> None:
    """kube-proxy skips headless Services, ExternalName Services and Services labelled with
    service.kubernetes.io/service-proxy-name (they belong to another proxy)."""
    assert is_proxied(service(spec, labels=labels)) == expected
