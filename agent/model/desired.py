"""DesiredState: what one IP family of this node should look like, independent of any proxy mode.

A ServicePlan is one service port's frontends (cluster IP, node port, external and load-balancer
IPs) with the endpoints chosen for each kind of traffic. Modes turn plans into kernel state.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Literal

from agent.model.endpoints import EndpointInfo
from agent.model.frontends import FrontendKey, FrontendTable, Unserved
from agent.model.serviceport import ServicePortInfo, ServicePortName

ChangedPorts = frozenset[ServicePortName]

__all__ = ["ChangedPorts", "Changes", "DesiredState", "ExternalStep", "NodeContext", "ServicePlan", "StaleFlow",
           "Unserved"]

# The steps of the chain that external traffic (node ports, external and load-balancer IPs)
# enters, for modes that match by chain (ExternalStep).
ExternalStep = Literal[
    "pods-to-cluster",  # from a cluster CIDR: cluster endpoints, no masquerade (ETP Local short circuit)
    "node-to-cluster",  # from the node itself: masquerade, then cluster endpoints (ETP Local)
    "masquerade-to-cluster",  # everyone: masquerade, then cluster endpoints (ETP Cluster)
    "to-local",  # everyone else: local endpoints, client address kept (ETP Local)
]


@dataclass(frozen=True, slots=True)
class StaleFlow:
    """Conntrack entries to delete after a sync: to `frontend` (ip or None for any local address,
    with `port`), those DNATed to `endpoint_ip` (an endpoint that went away) or, without one, those
    never DNATed (sent while the service had no endpoint, or before the proxy knew it).

    UDP (kube-proxy's cleanup) and TCP, where only connection attempts nobody answered
    (SYN_SENT, never DNATed) go: conntrack keeps such an entry for 120 s and a client that retries
    from the same source port, as Linux picks it again after a failed connect, would keep meeting
    it, not the new rules."""

    family: int
    frontend: str | None
    port: int
    endpoint_ip: str | None = None
    service: str = field(default="", compare=False)  # namespace/name, for `explain`'s history
    protocol: str = "UDP"  # or "TCP" (never-DNATed only)


@dataclass(frozen=True, slots=True)
class Changes:
    """What changed in one family since the last sync that a mode wrote: the service ports whose
    plan changed, the frontends (keys) added, removed or changed, and the UDP flows those changes
    left pointing nowhere (a mode cleans them after writing, in its own way)."""

    ports: ChangedPorts = frozenset()
    frontends: frozenset[FrontendKey] = frozenset()
    stale: tuple[StaleFlow, ...] = ()


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
    # the cluster's service CIDRs in this family (ServiceCIDR objects); empty: not known
    service_cidrs: tuple[str, ...] = ()

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
    # one of this node's addresses lies in the Service's loadBalancerSourceRanges (see source_ranges)
    node_in_source_ranges: bool = False

    @property
    def name(self) -> ServicePortName:
        return self.info.name

    @property
    def source_ranges(self) -> tuple[str, ...]:
        """loadBalancerSourceRanges as this node applies them (load-balancer IP traffic from any
        other source is dropped; empty: every source): the ranges, plus the Service's own
        load-balancer IPs when one of this node's addresses lies in a range, as kube-proxy does: a
        VIP-like load balancer whose IP is on the node loops the node's requests back with the LB IP
        as their source."""
        ranges = self.info.load_balancer_source_ranges
        if not self.node_in_source_ranges:
            return ranges
        host = "/32" if self.info.family == 4 else "/128"
        return ranges + tuple(ip + host for ip in self.info.load_balancer_ips if ip + host not in ranges)

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

    def hairpin_endpoints(self, node_name: str) -> frozenset[EndpointInfo]:
        """The endpoints a connection DNATed here may come from unmasqueraded, so it needs the
        hairpin masquerade (else the endpoint answers itself directly and drops the reply): this
        node's endpoints, and those naming no node, through any frontend; another node's only when
        that node's pods reach this node's cluster chain unmasqueraded, which the pods-to-cluster
        step of externalTrafficPolicy Local does. Cluster IP traffic is DNATed on the client's own
        node, and any other way in from another node (externalTrafficPolicy Cluster, the node
        short circuit) is masqueraded already."""
        if "pods-to-cluster" in self.external_steps:
            return self.all_endpoints
        return frozenset(ep for ep in self.all_endpoints if not ep.node_name or ep.node_name == node_name)

    def _unserved(self, endpoints: tuple[EndpointInfo, ...]) -> Unserved | None:
        if endpoints:
            return None
        # Endpoints exist elsewhere but not for this traffic (a Local policy): drop, as kube-proxy
        # does, so the client retries another node; no endpoint at all: reject, so it fails fast.
        return "drop" if self.has_any else "reject"

    @property
    def internal_unserved(self) -> Unserved | None:
        """What happens to traffic for the cluster IP when no endpoint takes it."""
        return self._unserved(self.internal_endpoints)

    @property
    def external_unserved(self) -> Unserved | None:
        """What happens to external traffic that the external chain does not send anywhere."""
        return self._unserved(self.external_endpoints)

    @property
    def unserved_reason(self) -> str:
        return "no local endpoints" if self.has_any else "no endpoints"

    @property
    def external_steps(self) -> tuple[ExternalStep, ...]:
        """The external chain, in order (empty: there is no external chain)."""
        if not self.info.externally_accessible:
            return ()
        if not self.info.external_policy_local:
            return ("masquerade-to-cluster",) if self.cluster else ()
        steps: list[ExternalStep] = ["pods-to-cluster", "node-to-cluster"] if self.cluster else []
        if self.local:
            steps.append("to-local")
        return tuple(steps)


@dataclass(slots=True)
class DesiredState:
    """Every service port of one family; mutated in place by the model, read by backends."""

    node: NodeContext
    services: dict[ServicePortName, ServicePlan] = field(default_factory=dict)
    # every address:port/protocol the node serves in this family, kept in step with `services`
    frontends: FrontendTable = field(default_factory=FrontendTable)

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

