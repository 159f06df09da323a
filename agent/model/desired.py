"""DesiredState: what one IP family of this node should look like, independent of any proxy mode.

A ServicePlan is one service port's frontends (cluster IP, node port, external and load-balancer
IPs) with the endpoints chosen for each kind of traffic. Modes turn plans into kernel state.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from agent.model.endpoints import EndpointInfo
from agent.model.serviceport import ServicePortInfo, ServicePortName

ChangedPorts = frozenset[ServicePortName]


@dataclass(frozen=True, slots=True)
class NodeContext:
    """Node-wide settings for one family; a change here means a full sync."""

    family: int
    node_name: str = ""
    zone: str = ""
    cluster_cidrs: tuple[str, ...] = ()
    masquerade_all: bool = False
    # None: every local address takes NodePorts; otherwise exactly these addresses.
    nodeport_ips: tuple[str, ...] | None = None

    @property
    def loopback(self) -> str:
        return "127.0.0.0/8" if self.family == 4 else "::1/128"


@dataclass(frozen=True, slots=True)
class ServicePlan:
    info: ServicePortInfo
    cluster: tuple[EndpointInfo, ...] = ()
    local: tuple[EndpointInfo, ...] = ()
    has_any: bool = False
    # Addresses of every endpoint that can serve (ready, or serving while terminating), whatever
    # the traffic policy or topology: UDP flows to these are kept, flows to any other are stale.
    serving: frozenset[str] = frozenset()

    @property
    def name(self) -> ServicePortName:
        return self.info.name

    @property
    def internal_endpoints(self) -> tuple[EndpointInfo, ...]:
        """Endpoints for traffic to the cluster IP."""
        return self.local if self.info.internal_policy_local else self.cluster

    @property
    def external_endpoints(self) -> tuple[EndpointInfo, ...]:
        """Endpoints for traffic to node ports, external and load-balancer IPs."""
        return self.local if self.info.external_policy_local else self.cluster

    @property
    def all_endpoints(self) -> frozenset[EndpointInfo]:
        return frozenset(self.cluster) | frozenset(self.local)


@dataclass(slots=True)
class DesiredState:
    """Every service port of one family; mutated in place by the model, read by backends."""

    node: NodeContext
    services: dict[ServicePortName, ServicePlan] = field(default_factory=dict)

    @property
    def family(self) -> int:
        return self.node.family

    def table(self) -> str:
        """A human-readable dump: one frontend per line with its endpoints."""
        lines = [f"# IPv{self.family} node={self.node.node_name or '-'} services={len(self.services)}"]
        for spn in sorted(self.services):
            plan = self.services[spn]
            i = plan.info
            fronts = [f"{i.cluster_ip}:{i.port}/{i.protocol}"]
            if i.node_port:
                fronts.append(f"nodePort {i.node_port}")
            fronts += [f"externalIP {ip}:{i.port}" for ip in i.external_ips]
            fronts += [f"lb {ip}:{i.port}" for ip in i.load_balancer_ips]
            eps = ",".join(e.address for e in plan.internal_endpoints) or "-"
            flags = []
            if i.affinity_seconds:
                flags.append(f"affinity={i.affinity_seconds}s")
            if i.external_policy_local:
                flags.append(f"etp=Local local={len(plan.local)}")
            if i.internal_policy_local:
                flags.append("itp=Local")
            lines.append(f"{spn} {' '.join(fronts)} -> {eps} {' '.join(flags)}".rstrip())
        return "\n".join(lines) + "\n"


def in_cidrs(ip: str, cidrs: tuple[str, ...]) -> bool:
    addr = ipaddress.ip_address(ip)
    return any(addr in ipaddress.ip_network(c, strict=False) for c in cidrs)

