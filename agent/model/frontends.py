"""Frontends: every address, port and protocol this node must serve for one IP family, each with
the endpoints that take its traffic. Pure.

A service port exposes one frontend per cluster IP, external IP and load-balancer IP, and one per
node address for its NodePort. Modes that program per address (IPVS virtual servers, BPF service
map keys) consume this view; modes that match by chain (iptables, nftables) need not.

`FrontendTable` keeps the view of one family up to date incrementally: `set_port` for a changed
service port, `set_node_addresses` when this node's addresses change; both return the keys whose
frontend was added, removed or changed, so a mode writes O(changes).

Two service ports claiming the same address:port/protocol (e.g. the same external IP on two
Services) is legal in the API; the smallest ServicePortName wins, as the first matching rule of
the iptables mode (service ports in sorted order) would.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from agent.model.endpoints import EndpointInfo
from agent.model.serviceport import ServicePortInfo, ServicePortName

if TYPE_CHECKING:
    from agent.model.desired import ServicePlan

FrontendKind = Literal["ClusterIP", "NodePort", "ExternalIP", "LoadBalancerIP"]
# What a mode does with traffic no endpoint can take: drop (endpoints exist, but not for this
# traffic: a Local policy), reject (no endpoint at all, so the client fails fast).
Unserved = Literal["drop", "reject"]


@dataclass(frozen=True, slots=True, order=True)
class FrontendKey:
    """One address:port/protocol the node answers on."""

    address: str
    port: int
    protocol: str  # TCP, UDP or SCTP

    def __str__(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{host}:{self.port}/{self.protocol}"


@dataclass(frozen=True, slots=True)
class Frontend:
    """What one frontend does with a new connection.

    - `endpoints`: who takes traffic arriving at this frontend (for external kinds, from outside the
      node: only this node's endpoints when `preserve_source`).
    - `in_cluster_endpoints`: who takes it when it comes from this node's pods or the node itself.
      Differs from `endpoints` only with externalTrafficPolicy Local, where kube-proxy sends such
      traffic to every cluster endpoint (its "short circuit").
    - `unserved`: the verdict when `endpoints` is empty (None when it is not).
    - `preserve_source`: externalTrafficPolicy Local: the client address must reach the endpoint
      unchanged (no masquerade), so only local endpoints may take it.
    - `affinity_seconds`: ClientIP session affinity timeout (0: none).
    - `source_ranges`: loadBalancerSourceRanges (load-balancer IP frontends only); empty: any source.
    """

    key: FrontendKey
    kind: FrontendKind
    service: ServicePortName
    endpoints: tuple[EndpointInfo, ...]
    in_cluster_endpoints: tuple[EndpointInfo, ...]
    unserved: Unserved | None
    preserve_source: bool = False
    affinity_seconds: int = 0
    source_ranges: tuple[str, ...] = ()

    @property
    def address(self) -> str:
        return self.key.address

    @property
    def port(self) -> int:
        return self.key.port

    @property
    def protocol(self) -> str:
        return self.key.protocol

    def describe(self) -> str:
        """One line: `10.96.0.10:80/TCP ClusterIP shop/web:http -> 10.244.1.5:8080,...`."""
        eps = ",".join(e.address for e in self.endpoints) or (self.unserved or "-")
        flags = []
        if self.preserve_source:
            inner = ",".join(e.address for e in self.in_cluster_endpoints) or "-"
            flags.append(f"preserve-source in-cluster={inner}")
        if self.affinity_seconds:
            flags.append(f"affinity={self.affinity_seconds}s")
        if self.source_ranges:
            flags.append("sources=" + ",".join(self.source_ranges))
        return f"{self.key} {self.kind} {self.service} -> {eps} {' '.join(flags)}".rstrip()


def nodeport_addresses(family: int, local_ips: Iterable[str], cidrs: Iterable[str] = ()) -> tuple[str, ...]:
    """This node's addresses that take NodePorts in `family`: every address but loopback and IPv6
    link-local (as kube-proxy's IPVS mode), narrowed to `cidrs` (--nodeport-addresses) when any of
    them is of this family."""
    nets = [n for n in (ipaddress.ip_network(c, strict=False) for c in cidrs) if n.version == family]
    out: set[str] = set()
    for ip in local_ips:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            continue
        if addr.version != family or addr.is_loopback or (family == 6 and addr.is_link_local):
            continue
        if nets and not any(addr in n for n in nets):
            continue
        out.add(str(addr))
    return tuple(sorted(out, key=ipaddress.ip_address))


def frontend_addresses(info: ServicePortInfo) -> list[tuple[str | None, int]]:
    """(address, port) of every frontend of a service port; a NodePort is (None, nodePort): any of
    the node's addresses. For conntrack cleanup, which matches a node port on every address."""
    out: list[tuple[str | None, int]] = [(info.cluster_ip, info.port)]
    out += [(ip, info.port) for ip in info.external_ips + info.load_balancer_ips]
    if info.node_port:
        out.append((None, info.node_port))
    return out


def frontends_of(plan: ServicePlan, node_addresses: Iterable[str]) -> list[Frontend]:
    """Every frontend of one service port; NodePorts on each of `node_addresses`."""
    info = plan.info
    proto = info.protocol
    out = [Frontend(
        key=FrontendKey(info.cluster_ip, info.port, proto),
        kind="ClusterIP",
        service=info.name,
        endpoints=plan.internal_endpoints,
        in_cluster_endpoints=plan.internal_endpoints,
        unserved=plan.internal_unserved,
        affinity_seconds=info.affinity_seconds,
    )]
    if not info.externally_accessible:
        return out
    external = plan.external_endpoints
    local = info.external_policy_local

    def ext(kind: FrontendKind, address: str, port: int, ranges: tuple[str, ...] = ()) -> Frontend:
        return Frontend(
            key=FrontendKey(address, port, proto),
            kind=kind,
            service=info.name,
            endpoints=external,
            in_cluster_endpoints=plan.cluster if local else external,
            unserved=plan.external_unserved,
            preserve_source=local,
            affinity_seconds=info.affinity_seconds,
            source_ranges=ranges,
        )

    out += [ext("ExternalIP", ip, info.port) for ip in info.external_ips]
    out += [ext("LoadBalancerIP", ip, info.port, plan.source_ranges)
            for ip in info.load_balancer_ips]
    if info.node_port:
        out += [ext("NodePort", ip, info.node_port) for ip in node_addresses]
    return out


class FrontendTable:
    """The frontends of one family, kept up to date one service port at a time."""

    def __init__(self) -> None:
        self._winner: dict[FrontendKey, Frontend] = {}
        # key -> every service port claiming it (almost always one)
        self._claims: dict[FrontendKey, dict[ServicePortName, Frontend]] = {}
        self._by_port: dict[ServicePortName, tuple[FrontendKey, ...]] = {}
        self._plans: dict[ServicePortName, ServicePlan] = {}  # ports with a node port, for address changes
        self.node_addresses: tuple[str, ...] = ()

    # -- reading ----------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._winner)

    def __iter__(self) -> Iterator[FrontendKey]:
        return iter(self._winner)

    def __contains__(self, key: object) -> bool:
        return key in self._winner

    def get(self, key: FrontendKey) -> Frontend | None:
        """The frontend that serves `key` (the winning claim), or None."""
        return self._winner.get(key)

    def values(self) -> Iterable[Frontend]:
        return self._winner.values()

    def of_port(self, spn: ServicePortName) -> list[Frontend]:
        """The frontends a service port wins (a lost claim is not listed)."""
        return [f for k in self._by_port.get(spn, ()) if (f := self._winner.get(k)) is not None
                and f.service == spn]

    def conflicts(self) -> list[tuple[FrontendKey, list[ServicePortName]]]:
        """Keys claimed by more than one service port, with the claimants (winner first)."""
        return [(k, sorted(c)) for k, c in self._claims.items() if len(c) > 1]

    def table(self) -> str:
        return "".join(self._winner[k].describe() + "\n" for k in sorted(self._winner))

    # -- updating ---------------------------------------------------------------------------

    def set_port(self, spn: ServicePortName, plan: ServicePlan | None) -> set[FrontendKey]:
        """Replace one service port's frontends (None: it is gone); returns the keys whose serving
        frontend changed."""
        new: dict[FrontendKey, Frontend] = {}
        if plan is not None:
            for f in frontends_of(plan, self.node_addresses):
                new.setdefault(f.key, f)  # e.g. an external IP listed twice: its first use
        if plan is not None and plan.info.node_port:
            self._plans[spn] = plan
        else:
            self._plans.pop(spn, None)
        changed: set[FrontendKey] = set()
        new_keys = tuple(new)
        for key in set(self._by_port.get(spn, ())) - new.keys():
            claims = self._claims[key]
            del claims[spn]
            if not claims:
                del self._claims[key]
            self._elect(key, changed)
        for key, f in new.items():
            claims = self._claims.setdefault(key, {})
            if claims.get(spn) != f:
                claims[spn] = f
                self._elect(key, changed)
        if new_keys:
            self._by_port[spn] = new_keys
        else:
            self._by_port.pop(spn, None)
        return changed

    def set_node_addresses(self, addresses: Iterable[str]) -> set[FrontendKey]:
        """This node's NodePort addresses changed: re-expand every port that has a node port."""
        new = tuple(addresses)
        if new == self.node_addresses:
            return set()
        self.node_addresses = new
        changed: set[FrontendKey] = set()
        for spn, plan in list(self._plans.items()):
            changed |= self.set_port(spn, plan)
        return changed

    def _elect(self, key: FrontendKey, changed: set[FrontendKey]) -> None:
        claims = self._claims.get(key)
        old = self._winner.get(key)
        new = claims[min(claims)] if claims else None
        if new is None:
            if old is not None:
                del self._winner[key]
                changed.add(key)
        elif old != new:
            self._winner[key] = new
            changed.add(key)
