"""ServicePortName and the per-family facts the node needs about one Service port.

`service_ports()` turns a Service record into ServicePortInfo values, one per (port, IP family),
validating as it goes: anything wrong is reported as a Problem and that part is skipped.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from agent.model.records import HEADLESS_LABEL, SERVICE_PROXY_NAME_LABEL, Service

PROTOCOLS = ("TCP", "UDP", "SCTP")
# kube-apiserver sets no limit on a Service's ports (kube-proxy programs them all); its 1.5 MB object
# limit allows about 20,000. Beyond that the object cannot have come from the API (a --source file):
# skipped, so one absurd file entry cannot balloon the ruleset.
MAX_PORTS_PER_SERVICE = 20_000
DEFAULT_AFFINITY_SECONDS = 10800
MAX_AFFINITY_SECONDS = 86400


@dataclass(frozen=True, slots=True, order=True)
class NamespacedName:
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True, order=True)
class ServicePortName:
    """ns/name:port-name plus protocol: the key of everything the agent programs."""

    namespace: str
    name: str
    port: str
    protocol: str

    @property
    def service(self) -> NamespacedName:
        return NamespacedName(self.namespace, self.name)

    def __str__(self) -> str:
        base = f"{self.namespace}/{self.name}"
        return f"{base}:{self.port}" if self.port else base


@dataclass(frozen=True, slots=True)
class Problem:
    """Why (part of) an object was skipped; `reason` is a short metric label."""

    kind: str
    object: str
    reason: str
    detail: str

    def __str__(self) -> str:
        return f"{self.kind} {self.object}: {self.detail}"


@dataclass(frozen=True, slots=True)
class ServicePortInfo:
    """What one Service port asks of the node, for one IP family (4 or 6)."""

    name: ServicePortName
    family: int
    protocol: str
    port: int
    cluster_ip: str
    node_port: int = 0
    external_ips: tuple[str, ...] = ()
    load_balancer_ips: tuple[str, ...] = ()
    load_balancer_source_ranges: tuple[str, ...] = ()
    affinity_seconds: int = 0
    external_policy_local: bool = False
    internal_policy_local: bool = False
    health_check_node_port: int = 0

    @property
    def externally_accessible(self) -> bool:
        return self.node_port != 0 or bool(self.external_ips) or bool(self.load_balancer_ips)

    @property
    def uses_cluster_endpoints(self) -> bool:
        # Even with externalTrafficPolicy Local, pods and the node itself reach the
        # service through cluster endpoints (kube-proxy's "short circuit").
        return not self.internal_policy_local or self.externally_accessible

    @property
    def uses_local_endpoints(self) -> bool:
        return self.internal_policy_local or self.external_policy_local


def ip_family(address: str) -> int | None:
    try:
        return ipaddress.ip_address(address).version
    except ValueError:
        return None


def cidr_family(cidr: str) -> int | None:
    try:
        return ipaddress.ip_network(cidr.strip(), strict=False).version
    except ValueError:
        return None


def is_proxied(svc: Service) -> tuple[bool, str]:
    """Whether kube-proxy would program this Service at all, and why not."""
    labels = svc.metadata.labels
    if SERVICE_PROXY_NAME_LABEL in labels:
        return False, "labelled for another proxy"
    if HEADLESS_LABEL in labels:
        return False, "headless"
    if svc.spec.type == "ExternalName":
        return False, "ExternalName"
    if not svc.spec.cluster_ip or svc.spec.cluster_ip == "None":
        return False, "headless"
    return True, ""


def service_ports(svc: Service) -> tuple[list[ServicePortInfo], list[Problem]]:
    """Every (port, family) the Service asks for, and what was wrong with the rest."""
    meta = svc.metadata
    obj = f"{meta.namespace}/{meta.name}"
    problems: list[Problem] = []

    def bad(reason: str, detail: str) -> None:
        problems.append(Problem("Service", obj, reason, detail))

    spec = svc.spec
    if len(spec.ports) > MAX_PORTS_PER_SERVICE:
        bad("too_many_ports", f"{len(spec.ports)} ports, more than {MAX_PORTS_PER_SERVICE}; service skipped")
        return [], problems

    cluster_ips = list(spec.cluster_ips) or [spec.cluster_ip]
    by_family: dict[int, str] = {}
    for cip in cluster_ips:
        fam = ip_family(cip)
        if fam is None:
            bad("invalid_ip", f"clusterIP {cip!r} is not an IP address; that address skipped")
        elif fam not in by_family:
            by_family[fam] = str(ipaddress.ip_address(cip))

    def valid_ips(field: str, values: list[str]) -> dict[int, list[str]]:
        out: dict[int, list[str]] = {4: [], 6: []}
        for v in values:
            fam = ip_family(v)
            if fam is None:
                bad("invalid_ip", f"{field} {v!r} is not an IP address; skipped")
            else:
                out[fam].append(str(ipaddress.ip_address(v)))
        return out

    external = valid_ips("externalIPs", spec.external_ips)
    lb_values = [i.ip for i in svc.status.load_balancer.ingress if i.ip and i.ip_mode != "Proxy"]
    lbs = valid_ips("status.loadBalancer.ingress.ip", lb_values) if spec.type == "LoadBalancer" else {4: [], 6: []}
    ranges: dict[int, list[str]] = {4: [], 6: []}
    for r in spec.load_balancer_source_ranges:
        fam = cidr_family(r)
        if fam is None:
            bad("invalid_cidr", f"loadBalancerSourceRanges {r!r} is not a CIDR; skipped")
        else:
            ranges[fam].append(str(ipaddress.ip_network(r.strip(), strict=False)))

    affinity = 0
    if spec.session_affinity == "ClientIP":
        cfg = spec.session_affinity_config
        affinity = DEFAULT_AFFINITY_SECONDS
        if cfg is not None and cfg.client_ip is not None:
            affinity = cfg.client_ip.timeout_seconds
        if not 0 < affinity <= MAX_AFFINITY_SECONDS:
            bad("invalid_affinity", f"sessionAffinity timeout {affinity}s out of 1..{MAX_AFFINITY_SECONDS}; "
                "using the default")
            affinity = DEFAULT_AFFINITY_SECONDS
    node_port_type = spec.type in ("NodePort", "LoadBalancer")
    ext_local = spec.external_traffic_policy == "Local"
    int_local = spec.internal_traffic_policy == "Local"

    out: list[ServicePortInfo] = []
    seen: set[tuple[str, str]] = set()
    for p in spec.ports:
        proto = (p.protocol or "TCP").upper()
        if proto not in PROTOCOLS:
            bad("unknown_protocol", f"port {p.name or p.port}: protocol {p.protocol!r} is not TCP, UDP or SCTP; "
                "port skipped")
            continue
        if not 1 <= p.port <= 65535:
            bad("invalid_port", f"port {p.name!r}: {p.port} is out of 1..65535; port skipped")
            continue
        node_port = p.node_port if node_port_type else 0
        if node_port and not 1 <= node_port <= 65535:
            bad("invalid_port", f"port {p.name!r}: nodePort {node_port} is out of 1..65535; nodePort ignored")
            node_port = 0
        if (p.name, proto) in seen:
            bad("duplicate_port", f"port name {p.name!r}/{proto} appears twice; second skipped")
            continue
        seen.add((p.name, proto))
        spn = ServicePortName(meta.namespace, meta.name, p.name, proto)
        for fam, cip in sorted(by_family.items()):
            ext_ok = node_port != 0 or bool(external[fam]) or bool(lbs[fam])
            out.append(
                ServicePortInfo(
                    name=spn,
                    family=fam,
                    protocol=proto,
                    port=p.port,
                    cluster_ip=cip,
                    node_port=node_port,
                    external_ips=tuple(external[fam]),
                    load_balancer_ips=tuple(lbs[fam]),
                    load_balancer_source_ranges=tuple(ranges[fam]) if lbs[fam] else (),
                    affinity_seconds=affinity,
                    external_policy_local=ext_local and ext_ok,
                    internal_policy_local=int_local,
                    health_check_node_port=(spec.health_check_node_port
                                            if ext_local and (ext_ok or spec.type == "LoadBalancer") else 0),
                )
            )
    return out, problems
