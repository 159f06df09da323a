"""ClusterModel: records in, DesiredState per family out, recomputing only what changed."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field

from agent.model.desired import ChangedPorts, Changes, DesiredState, NodeContext, ServicePlan, StaleFlow
from agent.model.endpoints import SliceInfo, merge_slices, slice_info
from agent.model.frontends import FrontendKey, frontend_addresses, nodeport_addresses
from agent.model.records import ZONE_LABEL, EndpointSlice, Node, Service, ServiceCIDR
from agent.model.serviceport import (
    NamespacedName,
    Problem,
    ServicePortInfo,
    ServicePortName,
    is_proxied,
    service_ports,
)
from agent.model.topology import categorize
from agent.model.tracker import ChangeTracker

FAMILIES = (4, 6)
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

# --nodeport-addresses primary: the node's primary IPs (from its Node object)
PRIMARY = "primary"

__all__ = ["FAMILIES", "PRIMARY", "ClusterModel", "NodeInfo", "ServiceFacts", "SkipNote", "StaleFlow", "Update"]


@dataclass(slots=True)
class Update:
    """What one drain of the trackers produced."""

    changed: dict[int, ChangedPorts] = field(default_factory=dict)  # service ports whose plan changed
    frontends: dict[int, frozenset[FrontendKey]] = field(default_factory=dict)  # frontends that changed
    full: bool = False
    trigger_times: list[str] = field(default_factory=list)
    stale_flows: list[StaleFlow] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    services_changed: int = 0
    endpoints_changed: int = 0

    def changes(self, family: int, stale: tuple[StaleFlow, ...] | None = None) -> Changes:
        """This drain's changes in one family, for a mode; `stale` replaces its own stale flows
        (the sync loop adds those a failed sync left)."""
        flows = tuple(f for f in self.stale_flows if f.family == family) if stale is None else stale
        return Changes(self.changed.get(family, frozenset()), self.frontends.get(family, frozenset()), flows)


@dataclass(frozen=True, slots=True)
class SkipNote:
    """Why a Service is not proxied (`unproxied`: headless, ExternalName, another proxy's), or what
    was wrong with it (`problems`)."""

    unproxied: str = ""
    problems: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ServiceFacts:
    """One Service as this node sees it, for `explain`."""

    key: NamespacedName
    ports: tuple[ServicePortInfo, ...]
    skipped: SkipNote | None
    slices: dict[str, SliceInfo]  # its EndpointSlices by namespace/name
    plans: dict[int, dict[ServicePortName, ServicePlan]]  # family -> its service ports' plans
    node_name: str
    zone: str
    unlabelled_slices: tuple[str, ...]  # slices in its namespace skipped for lacking the label


@dataclass(frozen=True, slots=True)
class NodeInfo:
    zone: str = ""
    deleting: bool = False
    # the node's primary IP per family (its first InternalIP, else ExternalIP, of that family), kept
    # only with --nodeport-addresses primary
    primary_ips: tuple[str, ...] = ()


class ClusterModel:
    """The node's view of the cluster. Pure: fed records, asked for desired state."""

    def __init__(
        self,
        node_name: str,
        cluster_cidrs: Iterable[str] = (),
        masquerade_all: bool = False,
        nodeport_cidrs: Iterable[str] = (),
        frontends: bool = True,
    ) -> None:
        self.node_name = node_name
        # keep DesiredState.frontends up to date (modes that program per address need it; the
        # chain-based ones do not, and skip its cost: about 70 µs and 500 bytes per service port)
        self.with_frontends = frontends
        self._cidrs = tuple(cluster_cidrs)
        self._masquerade_all = masquerade_all
        # --nodeport-addresses: CIDRs, or "primary" (the node's primary IPs, from its Node object)
        self._nodeport_primary = PRIMARY in tuple(nodeport_cidrs)
        self._nodeport_cidrs = tuple(c for c in nodeport_cidrs if c != PRIMARY)
        self._local_ips: tuple[str, ...] = ()
        # this node's addresses per family, but loopback: a load-balancer source range holding one
        # lets the Service's own load-balancer IPs through as sources (ServicePlan.source_ranges)
        self._node_addrs: dict[int, tuple[Address, ...]] = {f: () for f in FAMILIES}
        self._addrs_dirty = False
        self._service_cidrs: tuple[str, ...] = ()
        self._cidr_objects: dict[NamespacedName, tuple[str, ...]] = {}  # ServiceCIDR -> its valid CIDRs
        self.services: ChangeTracker[NamespacedName, tuple[ServicePortInfo, ...]] = ChangeTracker()
        self.slices: ChangeTracker[NamespacedName, SliceInfo] = ChangeTracker()
        self._slices_by_service: dict[NamespacedName, set[NamespacedName]] = {}
        # Services not proxied (headless, ExternalName, another proxy's: their slices are fine) or
        # partly invalid, and why (for `explain`)
        self._skipped: dict[NamespacedName, SkipNote] = {}
        self._unlabelled: dict[str, set[str]] = {}  # namespace -> slices without a service label
        self._node = NodeInfo()
        self._node_dirty = True
        self.desired: dict[int, DesiredState] = {f: DesiredState(self._context(f)) for f in FAMILIES}
        # family -> service -> its ports in desired[family].services: a drain touches only the
        # services that changed, never a scan of all of them
        self._ports_by_service: dict[int, dict[NamespacedName, set[ServicePortName]]] = {f: {} for f in FAMILIES}

    # -- inputs ---------------------------------------------------------------------------

    def on_service(self, key: NamespacedName, svc: Service | None) -> list[Problem]:
        problems: list[Problem] = []
        ports: tuple[ServicePortInfo, ...] | None = None
        self._skipped.pop(key, None)
        if svc is not None:
            ok, why = is_proxied(svc)
            if ok:
                infos, problems = service_ports(svc)
                ports = tuple(infos) or None
            if not ok or problems:
                self._skipped[key] = SkipNote(why, tuple(p.detail for p in problems))
        self.services.update(key, ports)
        return problems

    def on_slice(self, key: NamespacedName, es: EndpointSlice | None) -> list[Problem]:
        problems: list[Problem] = []
        info: SliceInfo | None = None
        if es is not None:
            info, problems = slice_info(es)
        unlabelled = self._unlabelled.setdefault(key.namespace, set())
        if any(p.reason == "no_service_label" for p in problems):
            unlabelled.add(key.name)
        else:
            unlabelled.discard(key.name)
        if not unlabelled:
            del self._unlabelled[key.namespace]
        self.slices.update(key, info)
        return problems

    def _unproxied(self, key: NamespacedName) -> bool:
        note = self._skipped.get(key)
        return note is not None and bool(note.unproxied)

    @property
    def skipped_services(self) -> int:
        """Services not proxied (headless, ExternalName, another proxy's) or partly invalid."""
        return len(self._skipped)

    def facts(self, key: NamespacedName) -> ServiceFacts:
        """Everything this node knows about one Service, for `explain` (as of the last drain)."""
        slices = {str(k): self.slices.committed[k] for k in sorted(self._slices_by_service.get(key, ()))
                  if k in self.slices.committed}
        plans = {fam: {spn: p for spn, p in self.desired[fam].services.items() if spn.service == key}
                 for fam in FAMILIES}
        return ServiceFacts(
            key=key,
            ports=tuple(self.services.committed.get(key, ())),
            skipped=self._skipped.get(key),
            slices=slices,
            plans=plans,
            node_name=self.node_name,
            zone=self._node.zone,
            unlabelled_slices=tuple(sorted(self._unlabelled.get(key.namespace, ()))),
        )

    def on_node(self, node: Node | None) -> None:
        info = NodeInfo()
        if node is not None:
            info = NodeInfo(node.metadata.labels.get(ZONE_LABEL, ""), node.metadata.deletion_timestamp is not None,
                            _primary_ips(node) if self._nodeport_primary else ())
        if info != self._node:
            self._node = info
            self._node_dirty = True

    def set_local_ips(self, ips: Iterable[str]) -> None:
        """This node's own addresses (read from the kernel): NodePort frontends are on them, and
        --nodeport-addresses narrows the chain-based modes to them (a node-wide change there)."""
        new = tuple(sorted(ips))
        if new != self._local_ips:
            self._local_ips = new
            if self._nodeport_cidrs or self._nodeport_primary:
                self._node_dirty = True
            addrs = [a for a in (_address(ip) for ip in new) if a is not None and not a.is_loopback]
            by_family = {f: tuple(a for a in addrs if a.version == f) for f in FAMILIES}
            if by_family != self._node_addrs:
                self._node_addrs = by_family
                self._addrs_dirty = True

    def on_service_cidr(self, key: NamespacedName, obj: ServiceCIDR | None) -> list[Problem]:
        """A ServiceCIDR object: the cluster's service CIDRs are the union of theirs. A mode may
        drop traffic to an address in them that no Service holds. A node-wide change."""
        problems: list[Problem] = []
        if obj is None:
            self._cidr_objects.pop(key, None)
        else:
            valid: list[str] = []
            for c in obj.spec.cidrs:
                try:
                    valid.append(str(ipaddress.ip_network(c, strict=False)))
                except ValueError:
                    problems.append(Problem("ServiceCIDR", str(key), "invalid_cidr",
                                            f"spec.cidrs entry {c!r} is not a CIDR; ignored"))
            self._cidr_objects[key] = tuple(valid)
        new = tuple(sorted({c for cidrs in self._cidr_objects.values() for c in cidrs}))
        if new != self._service_cidrs:
            self._service_cidrs = new
            self._node_dirty = True
        return problems

    @property
    def node_deleting(self) -> bool:
        return self._node.deleting

    @property
    def pending(self) -> tuple[int, int]:
        return self.services.pending, self.slices.pending

    # -- outputs --------------------------------------------------------------------------

    def _nodeport_nets(self) -> tuple[str, ...]:
        """--nodeport-addresses as CIDRs: "primary" is the node's primary IPs (a family without
        one takes NodePorts on every address, as kube-proxy)."""
        if self._nodeport_primary:
            return tuple(f"{ip}/{32 if ':' not in ip else 128}" for ip in self._node.primary_ips)
        return self._nodeport_cidrs

    def _context(self, family: int) -> NodeContext:
        fam_cidrs = tuple(c for c in self._cidrs if ipaddress.ip_network(c, strict=False).version == family)
        nodeport_ips: tuple[str, ...] | None = None
        nets = [n for n in (ipaddress.ip_network(c, strict=False) for c in self._nodeport_nets())
                if n.version == family]
        if nets:  # a family without CIDRs of its own keeps NodePorts on every address (kube-proxy)
            nodeport_ips = tuple(
                ip for ip in self._local_ips
                if ipaddress.ip_address(ip).version == family
                and any(ipaddress.ip_address(ip) in n for n in nets)
            )
        return NodeContext(
            family=family,
            node_name=self.node_name,
            zone=self._node.zone,
            cluster_cidrs=fam_cidrs,
            masquerade_all=self._masquerade_all,
            nodeport_ips=nodeport_ips,
            service_cidrs=tuple(c for c in self._service_cidrs
                                if ipaddress.ip_network(c, strict=False).version == family),
        )

    def drain(self) -> Update:
        """Commit pending changes and recompute the plans they touch."""
        update = Update()
        svc_changes = self.services.drain()
        slice_changes = self.slices.drain()
        update.services_changed = len(svc_changes)
        update.endpoints_changed = len(slice_changes)
        touched: set[NamespacedName] = set(svc_changes)
        for key, (prev, cur) in slice_changes.items():
            for s in (prev, cur):
                if s is not None:
                    touched.add(s.service)
            if prev is not None and (cur is None or cur.service != prev.service):
                self._slices_by_service.get(prev.service, set()).discard(key)
            if cur is not None:
                self._slices_by_service.setdefault(cur.service, set()).add(key)
                if cur.service not in self.services.committed and not self._unproxied(cur.service):
                    update.problems.append(Problem(
                        "EndpointSlice", str(key), "unknown_service",
                        f"belongs to Service {cur.service}, which does not exist (yet); ignored until it does"))
                if cur.trigger_time:
                    update.trigger_times.append(cur.trigger_time)
        if self._node_dirty:
            self._node_dirty = False
            update.full = True
            for fam in FAMILIES:
                self.desired[fam].node = self._context(fam)
            planned = {svc for fam in FAMILIES for svc in self._ports_by_service[fam]}
            touched = set(self.services.committed) | planned
        elif self._addrs_dirty:  # only Services with source ranges depend on the node's addresses
            touched |= {svc for svc, ports in self.services.committed.items()
                        if any(p.load_balancer_source_ranges for p in ports)}
        self._addrs_dirty = False
        for fam in FAMILIES:
            changed = self._recompute(fam, touched, update)
            update.changed[fam] = changed
            if not self.with_frontends:
                continue
            state = self.desired[fam]
            fronts = state.frontends.set_node_addresses(
                nodeport_addresses(fam, self._local_ips, self._nodeport_nets()))
            for spn in changed:
                fronts |= state.frontends.set_port(spn, state.services.get(spn))
            update.frontends[fam] = frozenset(fronts)
        return update

    def _recompute(self, family: int, touched: set[NamespacedName], update: Update) -> ChangedPorts:
        stale = update.stale_flows
        state = self.desired[family]
        ctx = state.node
        changed: set[ServicePortName] = set()
        by_service = self._ports_by_service[family]  # kept in step with state.services below
        for svc in touched:
            ports = [p for p in self.services.committed.get(svc, ()) if p.family == family]
            # in name order: when slices disagree about an endpoint, the same objects give the same
            # plan whatever order their events came in (and after a restart)
            slices = [self.slices.committed[k] for k in sorted(self._slices_by_service.get(svc, ()))
                      if k in self.slices.committed]
            merged, dups = merge_slices(s for s in slices if s.family == family)
            for d in dups:
                update.problems.append(Problem("EndpointSlice", str(svc), "duplicate_endpoint",
                                               f"endpoint {d} listed twice with different state; "
                                               "using the readiest"))
            new_plans: dict[ServicePortName, ServicePlan] = {}
            for info in ports:
                eps = merged.get((family, (info.name.port, info.protocol)), ())
                cat = categorize(info, eps, ctx.node_name, ctx.zone)
                serving = frozenset(e.ip for e in eps if e.ready or e.serving)
                new_plans[info.name] = ServicePlan(info, cat.cluster, cat.local, cat.has_any, serving,
                                                   self._node_in_ranges(info))
            for spn in by_service.get(svc, set()) - new_plans.keys():
                old = state.services.pop(spn)
                changed.add(spn)
                _stale_for(old, None, stale)
            for spn, plan in new_plans.items():
                old_plan = state.services.get(spn)
                if old_plan != plan:
                    state.services[spn] = plan
                    changed.add(spn)
                    _stale_for(old_plan, plan, stale)
            if new_plans:
                by_service[svc] = set(new_plans)
            else:
                by_service.pop(svc, None)
        return frozenset(changed)


    def _node_in_ranges(self, info: ServicePortInfo) -> bool:
        if not info.load_balancer_source_ranges or not info.load_balancer_ips:
            return False
        nets = [ipaddress.ip_network(c, strict=False) for c in info.load_balancer_source_ranges]
        return any(a in n for a in self._node_addrs[info.family] for n in nets if n.version == a.version)


def _primary_ips(node: Node) -> tuple[str, ...]:
    """The node's primary IP per family as kube-proxy picks it: the first InternalIP of the family,
    else the first ExternalIP; never loopback."""
    out: dict[int, str] = {}
    for kind in ("InternalIP", "ExternalIP"):
        for a in node.status.addresses:
            addr = _address(a.address) if a.type == kind else None
            if addr is not None and not addr.is_loopback and addr.version not in out:
                out[addr.version] = str(addr)
    return tuple(out[f] for f in sorted(out))


def _address(ip: str) -> Address | None:
    try:
        return ipaddress.ip_address(ip)
    except ValueError:
        return None


def unanswered_tcp_flows(plan: ServicePlan) -> list[StaleFlow]:
    """The TCP attempts to `plan`'s frontends that nothing DNATed (SYN_SENT): left by a time the
    port had no endpoint, the proxy did not know it yet, or its rules were gone (drift repaired).
    None for a UDP/SCTP port or one without a serving endpoint."""
    info = plan.info
    if info.protocol != "TCP" or not plan.serving:
        return []
    return [StaleFlow(info.family, front, port, None, str(info.name.service), "TCP")
            for front, port in frontend_addresses(info)]


def _stale_for(old: ServicePlan | None, new: ServicePlan | None, out: list[StaleFlow]) -> None:
    """Flows that a plan change leaves pointing nowhere useful: UDP as kube-proxy's conntrack
    cleanup; TCP only the attempts made while the port had no endpoint (or was not yet known)."""
    either = new or old
    if either is None or either.info.protocol not in ("UDP", "TCP"):
        return
    info = either.info
    if info.protocol == "TCP":
        if new is not None and new.serving and not (old.serving if old else ()):
            out += unanswered_tcp_flows(new)
        return
    old_ips = old.serving if old else frozenset()
    new_ips = new.serving if new else frozenset()
    if old is not None:
        for ip in sorted(old_ips - new_ips):
            for front, port in frontend_addresses(old.info):
                out.append(StaleFlow(info.family, front, port, ip, str(info.name.service)))
    if new is not None and new_ips and not old_ips:
        # Packets sent while there was no endpoint created conntrack entries that go nowhere.
        for front, port in frontend_addresses(new.info):
            out.append(StaleFlow(info.family, front, port, None, str(info.name.service)))
