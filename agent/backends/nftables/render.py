"""DesiredState -> nft transaction text (the `nft -f` statement language). Pure: no I/O, no kernel.

Layout of `table ip kube-proxy-agent` (and `ip6`, identical but for addresses):

  maps   service-ips            daddr . proto . port : jump svc-/svl-/ext- chain
         service-nodeports      proto . port : goto ext- chain
         no-endpoint-services   cluster IPs with nothing to DNAT to : goto reject-chain | drop
         no-endpoint-external   external / load-balancer IPs likewise
         no-endpoint-nodeports  node ports likewise
         firewall-ips           load-balancer IP . proto . port : goto fw- chain
  sets   hairpin                endpoint . endpoint, for every endpoint address
         nodeport-ips           (only with --nodeport-addresses) addresses that take node ports
         cluster-cidrs          (only with several cluster CIDRs in the family)
  chains nat-prerouting, nat-output -> services: one vmap lookup, then the node-port lookup
         nat-postrouting -> masquerading: masquerade fully-random what carries mark 0x4000
         firewall-prerouting, firewall-output (filter, -110, before DNAT): firewall-ips
         filter-input, filter-forward, filter-output (filter, 0, after DNAT): ct state new
           lookups in the no-endpoint maps, (forward, output) cluster-ips-check, the hairpin mark,
           then (forward) accept marked and established traffic
         cluster-ips-check: still addressed to a cluster IP after DNAT (a port the Service does
           not have): reject; to an unallocated address of the service CIDRs: drop
  maps   endpoints-00..63       number : endpoint address, the DNAT targets: each svc-/svl-
                                chain holds a block of numbers (a slot) in one shard
  per service port: svc-H (cluster endpoints), svl-H (local endpoints): masquerade mark, then one
         `dnat to numgen random mod N offset SLOT map @endpoints-NN : PORT` rule, so that changing the
         endpoints only changes map elements; ext-H (external traffic), fw-H
         (loadBalancerSourceRanges). With sessionAffinity (a dynamic set aff-E-<seconds> per
         endpoint), or endpoints on different ports, a numgen cascade of per-endpoint DNAT rules.

Each service port renders to a `ServiceNft` (its sets, chains and map elements), cached between
syncs. A full render rewrites the table in one transaction (flush table, flush maps, declare
everything, delete leftovers). A partial render diffs the changed ports' old and new `ServiceNft`
and emits only their statements, so its cost is that of the ports that changed.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from agent.backends.nftables import names as N
from agent.model.desired import DesiredState, NodeContext, ServicePlan
from agent.model.endpoints import EndpointInfo
from agent.model.serviceport import ServicePortName

VERDICT = {"drop": "drop", "reject": f"goto {N.REJECT}"}
ENDPOINT_MAPS = frozenset(N.ENDPOINT_MAPS)
MAX_COMMENT = 120
_UNSAFE = re.compile(r'[^A-Za-z0-9 ._/:@+=,()-]')

# (map, key, verdict, comment)
Element = tuple[str, str, str, str]
ElemValue = tuple[str, str]  # (verdict, comment)
Owners = tuple[tuple[ServicePortName, ElemValue], ...]
NO_VALUE: ElemValue = ("", "")  # a set element's (one object for all of them)
ElementChange = tuple[bool, str, str, str]  # (add, map or set, key, value: an address or "")
ELEMENT_ONLY = ENDPOINT_MAPS | {N.HAIRPIN}  # elements without verdicts or comments: see RenderResult


@dataclass(frozen=True, slots=True)
class ServiceNft:
    """What one service port puts in its family's table."""

    plan: ServicePlan
    node: NodeContext
    sets: tuple[tuple[str, str], ...]  # (name, declaration), e.g. "{ typeof ip saddr ; ... }"
    chains: tuple[tuple[str, tuple[str, ...]], ...]  # (name, rules), each chain after those it uses
    elements: tuple[Element, ...]  # unique (map, key)
    slots: tuple[str, ...] = ()  # chains holding a block of endpoint map numbers

    @property
    def rule_count(self) -> int:
        return sum(len(rules) for _, rules in self.chains)


@dataclass(frozen=True, slots=True)
class Existing:
    """Our table's chain and set names as listed from the kernel (for a full sync after a restart
    or a failure, when the renderer's memory of the kernel cannot be trusted)."""

    chains: frozenset[str] = frozenset()
    sets: frozenset[str] = frozenset()
    maps: frozenset[str] = frozenset()


@dataclass(slots=True)
class RenderResult:
    text: str
    full: bool
    written: dict[str, int] = field(default_factory=dict)  # statements per map, chains, rules
    totals: dict[str, int] = field(default_factory=dict)  # elements per map, chains, rules after it
    # a periodic check: what it found missing in the kernel (table objects by name) and how many
    # service ports it re-asserted
    missing: tuple[str, ...] = ()
    reasserted: int = 0
    # a partial sync that changes endpoint map and hairpin set elements only: those changes,
    # (add, map or set, key, value) in `text`'s order, values of sets empty; None otherwise
    elements: tuple[ElementChange, ...] | None = None


def _comment(text: str) -> str:
    return f'comment "{_UNSAFE.sub("_", text)[:MAX_COMMENT]}"'


def _addr_type(family: int) -> str:
    return "ipv4_addr" if family == 4 else "ipv6_addr"


def collapse(cidrs: Iterable[str]) -> list[str]:
    """Prefixes merged where they overlap or touch (nft refuses overlapping intervals)."""
    nets = [ipaddress.ip_network(c, strict=False) for c in cidrs]
    v4 = ipaddress.collapse_addresses(n for n in nets if isinstance(n, ipaddress.IPv4Network))
    v6 = ipaddress.collapse_addresses(n for n in nets if isinstance(n, ipaddress.IPv6Network))
    return [str(n) for n in (*v4, *v6)]


def _cidrs(cidrs: Iterable[str]) -> str:
    """One prefix, or an anonymous set of them."""
    out = collapse(cidrs)
    return out[0] if len(out) == 1 else "{ " + ", ".join(out) + " }"


def cluster_cidrs_match(node: NodeContext) -> str:
    """How rules name the cluster CIDRs: one prefix inline, several through the named set (an
    anonymous set in every service chain would cost a kernel set each), nothing when none."""
    out = collapse(node.cluster_cidrs)
    if len(out) > 1:
        return f"@{N.CLUSTER_CIDRS}"
    return out[0] if out else ""


def _key(ip: str, proto: str, port: int) -> str:
    return f"{ip} . {proto} . {port}"


class Slots:
    """Blocks of endpoint map numbers, one per svc-/svl- chain that DNATs through a map. A block
    holds a power of two numbers (at least MIN); a chain keeps its block while its endpoints fit, so
    an endpoint change rewrites elements only, and moves to a bigger block when they outgrow it
    (its rule changes then anyway: the modulus is in it)."""

    MIN = 4

    def __init__(self) -> None:
        self._held: dict[str, tuple[int, int]] = {}  # chain -> (first number, size)
        self._free: dict[int, list[int]] = {}  # size -> first numbers of released blocks
        self._next = 0

    def place(self, chain: str, n: int) -> int:
        """The first number of `chain`'s block, for `n` endpoints."""
        held = self._held.get(chain)
        if held is not None and n <= held[1]:
            return held[0]
        if held is not None:
            self.release((chain,))
        size = max(self.MIN, 1 << (n - 1).bit_length())
        free = self._free.get(size)
        if free:
            base = free.pop()
        else:
            base, self._next = self._next, self._next + size
        self._held[chain] = (base, size)
        return base

    def release(self, chains: Iterable[str]) -> None:
        for chain in chains:
            held = self._held.pop(chain, None)
            if held is not None:
                self._free.setdefault(held[1], []).append(held[0])

    def __len__(self) -> int:
        return len(self._held)


def render_service(plan: ServicePlan, node: NodeContext, slots: Slots | None = None) -> ServiceNft:
    """The sets, chains and map elements of one service port: the same decisions as iptables
    render_service, expressed as chains reached from verdict maps. `slots` places the endpoint map
    numbers of its chains (the renderer's, which remembers them; a fresh one when rendering alone)."""
    slots = slots if slots is not None else Slots()
    slotted: list[str] = []
    info = plan.info
    fam = info.family
    ip = N.family_keyword(fam)
    spn = str(info.name)
    proto = info.protocol.lower()
    svc_chain = N.service_chain("svc", spn, info.protocol)
    svl_chain = N.service_chain("svl", spn, info.protocol)
    ext_chain = N.service_chain("ext", spn, info.protocol)
    fw_chain = N.service_chain("fw", spn, info.protocol)
    sets: list[tuple[str, str]] = []
    chains: list[tuple[str, tuple[str, ...]]] = []
    elements: dict[tuple[str, str], ElemValue] = {}

    def element(mapname: str, key: str, verdict: str, comment: str) -> None:
        elements.setdefault((mapname, key), (verdict, comment))  # a repeated IP keeps its first use

    # What choosing an endpoint does, shared by the cluster (svc) and local (svl) chains: refresh
    # the client's affinity, DNAT. Endpoints get no chain of their own: every chain in the table
    # costs each later transaction (nft 1.0 dumps all chains before adding a rule or element, and
    # the kernel revalidates every reachable rule), and 100k endpoint chains made a one-endpoint
    # sync take 700 ms at 10k services. Hairpin traffic is marked by the `hairpin` set instead.
    # Without affinity, the DNAT is one rule and the endpoints are elements of an endpoint map.
    endpoints: dict[str, EndpointInfo] = {}
    hairpin = plan.hairpin_endpoints(node.node_name)
    for ep in sorted(plan.all_endpoints, key=lambda e: (e.ip, e.port)):
        endpoints.setdefault(ep.address, ep)
    actions: dict[str, str] = {}
    aff_names: dict[str, str] = {}
    for address, ep in endpoints.items():
        update = ""
        if info.affinity_seconds:
            aff = N.affinity_set(spn, info.protocol, address, info.affinity_seconds)
            aff_names[address] = aff
            sets.append(
                (aff, f"{{ typeof {ip} saddr ; flags dynamic,timeout ; timeout {info.affinity_seconds}s ; }}")
            )
            update = f" update @{aff} {{ {ip} saddr }}"
        actions[address] = f"meta l4proto {proto}{update} dnat to {address}"
        # An endpoint that may reach itself through this node unmasqueraded (see the plan)
        if ep in hairpin:
            element(N.HAIRPIN, f"{ep.ip} . {ep.ip}", "", "")

    pods = cluster_cidrs_match(node)

    # Cluster IP clients from outside the pod network are masqueraded by one rule of the
    # `services` chain for every cluster IP (base_chains), not by a rule in each service chain:
    # 10k such rules were a fifth of the full transaction's memory in libnftables.
    def spread(chain: str, eps: tuple[EndpointInfo, ...]) -> tuple[str, ...]:
        rules: list[str] = []
        ports = {e.port for e in eps}
        if not info.affinity_seconds and len(ports) == 1:
            # A uniform choice among n numbers of the chain's block, each mapped to an endpoint
            # address; the port is in the rule (nft 1.0 cannot reload a map whose data is an
            # address . port concatenation usable by both TCP and UDP rules, so endpoints that
            # differ in port, rare, take the cascade below).
            base = slots.place(chain, len(eps))
            emap = N.endpoint_map(chain)
            for i, e in enumerate(eps):
                element(emap, str(base + i), e.ip, "")
            slotted.append(chain)
            rules.append(f"meta l4proto {proto} dnat {ip} to numgen random mod {len(eps)} offset {base} "
                         f"map @{emap} : {ports.pop()}")
            return tuple(rules)
        if info.affinity_seconds:
            rules += [f"{ip} saddr @{aff_names[e.address]} {actions[e.address]}" for e in eps]
        # Otherwise a uniform choice as a cascade (like iptables' statistic rules): endpoint i is
        # taken with probability 1/(n-i) among those left, each rule refreshing its affinity set.
        n = len(eps)
        for i, e in enumerate(eps[:-1]):
            rules.append(f"numgen random mod {n - i} == 0 {actions[e.address]}")
        rules.append(actions[eps[-1].address])
        return tuple(rules)

    if plan.cluster:
        chains.append((svc_chain, spread(svc_chain, plan.cluster)))
    if plan.local:
        chains.append((svl_chain, spread(svl_chain, plan.local)))

    # Cluster IP.
    cip_key = _key(info.cluster_ip, proto, info.port)
    element(N.CLUSTER_IPS, info.cluster_ip, "", "")
    if plan.internal_endpoints:
        internal_chain = svl_chain if info.internal_policy_local else svc_chain
        element(N.SERVICE_IPS, cip_key, f"jump {internal_chain}", f"{spn} cluster IP")
    else:
        verdict = VERDICT[plan.internal_unserved or "reject"]
        element(N.NO_ENDPOINT_SERVICES, cip_key, verdict, f"{spn} has no endpoints")

    # External traffic: node ports, external IPs, load-balancer IPs all enter the ext chain.
    if info.externally_accessible:
        ext_rules: list[str] = []
        for step in plan.external_steps:
            if step == "pods-to-cluster":
                if pods:
                    ext_rules.append(f"{ip} saddr {pods} goto {svc_chain}")
            elif step == "node-to-cluster":
                ext_rules.append(f"fib saddr type local jump {N.MARK_MASQ}")
                ext_rules.append(f"fib saddr type local goto {svc_chain}")
            elif step == "masquerade-to-cluster":
                ext_rules.append(f"jump {N.MARK_MASQ}")
                ext_rules.append(f"goto {svc_chain}")
            else:
                ext_rules.append(f"goto {svl_chain}")
        has_ext = bool(ext_rules)
        if has_ext:
            chains.append((ext_chain, tuple(ext_rules)))
        unserved = plan.external_unserved
        ext_verdict = VERDICT[unserved] if unserved else ""
        ext_reason = plan.unserved_reason
        fronts = [(a, "external IP") for a in info.external_ips]
        fronts += [(a, "load balancer IP") for a in info.load_balancer_ips]
        for addr, what in fronts:
            key = _key(addr, proto, info.port)
            # jump, not goto: an ext chain that does not DNAT returns to `services`, which goes on
            # to the node-port lookup, as the iptables rules fall through.
            if has_ext:
                element(N.SERVICE_IPS, key, f"jump {ext_chain}", f"{spn} {what}")
            if ext_verdict:
                element(N.NO_ENDPOINT_EXTERNAL, key, ext_verdict, f"{spn} has {ext_reason}")
        if info.node_port:
            key = f"{proto} . {info.node_port}"
            if has_ext:
                element(N.SERVICE_NODEPORTS, key, f"goto {ext_chain}", f"{spn} node port")
            if ext_verdict:
                element(N.NO_ENDPOINT_NODEPORTS, key, ext_verdict, f"{spn} has {ext_reason}")
        if plan.source_ranges and info.load_balancer_ips:
            drop = _comment(f"{spn} source not in loadBalancerSourceRanges")
            chains.append(
                (fw_chain, (f"{ip} saddr != {_cidrs(plan.source_ranges)} drop {drop}",))
            )
            for addr in info.load_balancer_ips:
                element(N.FIREWALL_IPS, _key(addr, proto, info.port), f"goto {fw_chain}", f"{spn}")

    return ServiceNft(
        plan=plan,
        node=node,
        sets=tuple(sets),
        chains=tuple(chains),
        elements=tuple((m, k, v, c) for (m, k), (v, c) in elements.items()),
        slots=tuple(slotted),
    )


def base_chains(node: NodeContext) -> tuple[tuple[str, str, tuple[str, ...]], ...]:
    """The fixed chains: (name, declaration suffix, rules), regular chains before base chains."""
    fam = node.family
    ip = N.family_keyword(fam)
    lookup = f"{ip} daddr . meta l4proto . th dport vmap"
    ports = "meta l4proto . th dport vmap"
    if node.nodeport_ips is None:
        nodeports = f"{ip} daddr != {node.loopback} fib daddr type local {ports} @{N.SERVICE_NODEPORTS}"
    else:
        nodeports = f"{ip} daddr @{N.NODEPORT_IPS} {ports} @{N.SERVICE_NODEPORTS}"
    # node ports without endpoints: refused on the addresses that take node ports, and only there
    np_addrs = "fib daddr type local" if node.nodeport_ips is None else f"{ip} daddr @{N.NODEPORT_IPS}"
    no_ep_external = (
        f"ct state new {lookup} @{N.NO_ENDPOINT_EXTERNAL}",
        f"ct state new {np_addrs} {ports} @{N.NO_ENDPOINT_NODEPORTS}",
    )
    no_ep_services = f"ct state new {lookup} @{N.NO_ENDPOINT_SERVICES}"
    cluster_ips_check = f"ct state new jump {N.CLUSTER_IPS_CHECK}"
    check = [f"{ip} daddr @{N.CLUSTER_IPS} reject {_comment('no such port on this cluster IP')}"]
    if node.service_cidrs:
        check.append(f"{ip} daddr {_cidrs(node.service_cidrs)} drop {_comment('no Service holds this address')}")
    # An endpoint that reached itself through a service: masquerade it (iptables marks this in
    # the endpoint chain; here the DNATed addresses are checked after nat, before forward/output).
    hairpin = f"ct state new ct status dnat {ip} saddr . {ip} daddr @{N.HAIRPIN} jump {N.MARK_MASQ}"
    # Traffic to a cluster IP from outside the pod network (the node itself, other hosts), or
    # from anyone with --masquerade-all, is marked for masquerading, as kube-proxy's service
    # chains do per port. Marking a cluster IP port that has no Service port or no endpoints is
    # harmless: such packets are rejected or dropped in the filter chains, never DNATed or sent.
    pods = cluster_cidrs_match(node)
    to_cluster_ip = f"{ip} daddr @{N.CLUSTER_IPS}"
    masquerade_clients: tuple[str, ...] = (
        (f"{to_cluster_ip} jump {N.MARK_MASQ}",) if node.masquerade_all
        else (f"{to_cluster_ip} {ip} saddr != {pods} jump {N.MARK_MASQ}",) if pods else ()
    )
    rules: dict[str, tuple[str, ...]] = {
        N.MARK_MASQ: (f"meta mark set meta mark | {N.MASQ_MARK}",),
        N.MASQUERADING: (
            f"meta mark & {N.MASQ_MARK} == 0 return",
            f"meta mark set meta mark ^ {N.MASQ_MARK}",
            "masquerade fully-random",
        ),
        N.REJECT: ("reject",),
        N.CLUSTER_IPS_CHECK: tuple(check),
        N.SERVICES: (*masquerade_clients, f"{lookup} @{N.SERVICE_IPS}", nodeports),
        N.NAT_PREROUTING: (f"jump {N.SERVICES}",),
        N.NAT_OUTPUT: (f"jump {N.SERVICES}",),
        N.NAT_POSTROUTING: (f"jump {N.MASQUERADING}",),
        N.FIREWALL_PREROUTING: (f"{lookup} @{N.FIREWALL_IPS}",),
        N.FIREWALL_OUTPUT: (f"{lookup} @{N.FIREWALL_IPS}",),
        N.FILTER_INPUT: no_ep_external,
        N.FILTER_FORWARD: (
            *no_ep_external,
            no_ep_services,
            cluster_ips_check,
            hairpin,
            f"meta mark & {N.MASQ_MARK} == {N.MASQ_MARK} accept",
            "ct state established,related accept",
        ),
        N.FILTER_OUTPUT: (no_ep_services, cluster_ips_check, hairpin),
    }
    out: list[tuple[str, str, tuple[str, ...]]] = [
        (name, "", rules[name]) for name in (N.MARK_MASQ, N.MASQUERADING, N.REJECT, N.CLUSTER_IPS_CHECK, N.SERVICES)
    ]
    for name, typ, hook, prio in N.BASE_CHAINS:
        out.append((name, f" {{ type {typ} hook {hook} priority {prio} ; }}", rules[name]))
    return tuple(out)


BASE_CHAIN_COUNT = len(N.FIXED_CHAINS)


def node_sets(node: NodeContext) -> tuple[tuple[str, str, tuple[str, ...]], ...]:
    """Node-wide named sets this node needs: (name, extra flags, members)."""
    out: list[tuple[str, str, tuple[str, ...]]] = []
    if node.nodeport_ips is not None:
        # never loopback: a DNAT from 127.0.0.1 is black-holed (route_localnet off), and kube-proxy's
        # nftables mode serves no localhost NodePorts either
        out.append((N.NODEPORT_IPS, "", tuple(ip for ip in node.nodeport_ips
                                               if not ipaddress.ip_address(ip).is_loopback)))
    cidrs = collapse(node.cluster_cidrs)
    if len(cidrs) > 1:
        out.append((N.CLUSTER_CIDRS, " flags interval ;", tuple(cidrs)))
    return tuple(out)


def _element_block(verb: str, t: str, mapname: str, items: list[str]) -> list[str]:
    if not items:
        return []
    return [f"{verb} element {t} {mapname} {{", *(f"\t{i}," for i in items), "}"]


def _add_item(key: str, value: ElemValue) -> str:
    verdict, comment = value
    if not verdict:
        return key
    return f"{key} {_comment(comment)} : {verdict}" if comment else f"{key} : {verdict}"


def _map_type(family: int, key: str, is_map: bool) -> str:
    """A map's or set's type declaration."""
    addr = _addr_type(family)
    if key == "endpoint":
        return f"typeof numgen random mod 1 : {N.family_keyword(family)} daddr"
    keytype = {
        "addr.proto.port": f"{addr} . inet_proto . inet_service",
        "proto.port": "inet_proto . inet_service",
        "addr.addr": f"{addr} . {addr}",
        "addr": addr,
    }[key]
    return f"type {keytype} : verdict" if is_map else f"type {keytype}"


def _by_label(counts: dict[str, int]) -> dict[str, int]:
    """Per-map counts with the endpoint shards summed under one name."""
    out: dict[str, int] = {}
    for name, n in counts.items():
        label = N.map_label(name)
        out[label] = out.get(label, 0) + n
    return out


def _chain_lines(t: str, name: str, rules: tuple[str, ...]) -> list[str]:
    return [f"add rule {t} {name} {r}" for r in rules]


def _chain_block(t: str, name: str, rules: tuple[str, ...], decl: str = "", flush: bool = False) -> list[str]:
    """Declare a chain (`flush`: and empty it, when it may hold rules already), then its rules."""
    head = [f"add chain {t} {name}{decl}"] + ([f"flush chain {t} {name}"] if flush else [])
    return head + _chain_lines(t, name, rules)


def _maps_and_node_sets(family: int, t: str, node: NodeContext, flush_maps: bool, flush_sets: bool) -> list[str]:
    """The table's maps declared (emptied when `flush_maps`) and this node's sets refilled."""
    lines = []
    for mapname, key, is_map in N.MAPS:
        kind = "map" if is_map else "set"
        lines.append(f"add {kind} {t} {mapname} {{ {_map_type(family, key, is_map)} ; }}")
        if flush_maps:
            lines.append(f"flush {kind} {t} {mapname}")
    for name, flags, members in node_sets(node):
        lines.append(f"add set {t} {name} {{ type {_addr_type(family)} ;{flags} }}")
        if flush_sets:
            lines.append(f"flush set {t} {name}")
        if members:
            lines.append(f"add element {t} {name} {{ {', '.join(members)} }}")
    return lines


class NftRenderer:
    """Renders one family's table and remembers what it last rendered, to diff partial syncs.

    `known` says the kernel holds what this renderer last rendered; the writer clears it when a
    transaction fails (`reset`), which makes the next render full."""

    # A periodic check re-asserts every service port at least once per this many checks (at the
    # default 30 s sync period: once an hour, as often as kube-proxy rewrites everything), and at
    # least SWEEP_MIN ports per check (so a small table is re-asserted whole every time).
    SWEEP_CHECKS = 120
    SWEEP_MIN = 64

    def __init__(self, family: int) -> None:
        self.family = family
        self._sweep: list[ServicePortName] = []  # ports still to re-assert in this round
        self.table = N.table_ref(family)
        self._memo: dict[ServicePortName, ServiceNft] = {}
        # (map, key) -> ((service port, value), ...) sorted by port (nearly always one: a tuple,
        # not a dict, saves ~10 MB at 10k Services); the kernel holds the first port's value, as
        # the iptables mode's first matching rule (services in sorted order) would win.
        self._owners: dict[tuple[str, str], Owners] = {}
        self._kernel: dict[str, dict[str, ElemValue]] = {m: {} for m, _, _ in N.MAPS}
        # Endpoint map elements are one chain's each (its block of numbers): written straight from
        # the rendered ports, with no owner bookkeeping; only their count is kept.
        self._endpoint_elements = 0
        self._node: NodeContext | None = None
        self._slots = Slots()
        self._chains = 0  # chains and rules owned by service ports
        self._rules = 0
        self.known = False
        self.recreate = False

    # -- state ------------------------------------------------------------------------------

    def reset(self, *, full: bool) -> None:
        """Forget what the kernel holds (a transaction failed). After a failed full sync the next
        one deletes and recreates the table instead of flushing it."""
        self.known = False
        if full:
            self.recreate = True

    def rendered(self, spn: ServicePortName) -> ServiceNft | None:
        """What this renderer last rendered for a port (its endpoint map numbers are the ones
        written)."""
        return self._memo.get(spn)

    def needs_full(self, desired: DesiredState) -> bool:
        return not self.known or desired.node != self._node

    def _totals(self) -> dict[str, int]:
        totals = _by_label({m: len(elems) for m, elems in self._kernel.items()})
        totals[N.ENDPOINTS] = self._endpoint_elements
        totals["chains"] = BASE_CHAIN_COUNT + self._chains
        totals["rules"] = self._base_rules + self._rules
        return totals

    @property
    def _base_rules(self) -> int:
        return sum(len(r) for _, _, r in base_chains(self._node)) if self._node else 0

    # -- rendering --------------------------------------------------------------------------

    def render(
        self,
        desired: DesiredState,
        changed: Iterable[ServicePortName],
        *,
        full: bool,
        existing: Existing | None = None,
    ) -> RenderResult:
        """One transaction for this family. Partial when allowed (`full` False, the kernel's state
        known, the node unchanged), else full; `existing` (names listed from the kernel) lets a
        full sync delete leftovers it has no memory of."""
        if desired.family != self.family:
            raise ValueError(f"renderer for IPv{self.family} given IPv{desired.family} state")
        if full and not self.needs_full(desired) and existing is not None:
            missing = self._missing_fixed(existing)
            if not missing:
                return self._periodic(desired, changed, existing)
            self.known = False  # the table, a map or a fixed chain is gone: rewrite it whole
            out = self._full(desired, existing)
            out.missing = missing
            return out
        if full or self.needs_full(desired):
            return self._full(desired, existing)
        return self._partial(desired, changed)

    def _missing_fixed(self, existing: Existing) -> tuple[str, ...]:
        """Fixed objects of the table the kernel lacks (any of them: the whole table is rewritten)."""
        have = existing.sets | existing.maps
        gone = [c for c in sorted(N.FIXED_CHAINS) if c not in existing.chains]
        gone += [m for m, _, _ in N.MAPS if m not in have]
        if self._node is not None:
            gone += [name for name, _, _ in node_sets(self._node) if name not in have]
        return tuple(gone)

    def _periodic(self, desired: DesiredState, changed: Iterable[ServicePortName], existing: Existing) -> RenderResult:
        """The periodic check while the kernel holds what was rendered: instead of rewriting the
        whole table (seconds at 10k Services, with every change waiting behind it), one small
        transaction: this sync's changes; the fixed chains and node sets rewritten (a handful of
        rules); the ports whose chains or sets the kernel lacks; and the next slice of all ports
        re-asserted (chains flushed and refilled, map elements added: a no-op where present), so
        that every port is rewritten within SWEEP_CHECKS checks."""
        out = self._partial(desired, changed)
        node = desired.node
        t = self.table
        lines = [out.text.rstrip("\n")] if out.text else []
        lines.append(f"add table {t}")
        lines += _maps_and_node_sets(self.family, t, node, flush_maps=False, flush_sets=True)
        n_rules = 0
        for name, decl, rules in base_chains(node):
            lines += _chain_block(t, name, rules, decl, flush=True)
            n_rules += len(rules)

        have = existing.sets | existing.maps
        broken: list[ServicePortName] = []
        missing: set[str] = set()
        for spn, memo in self._memo.items():
            gone = [c for c, _ in memo.chains if c not in existing.chains] + [n for n, _ in memo.sets if n not in have]
            if gone:
                broken.append(spn)
                missing.update(gone)
        if not self._sweep:
            self._sweep = sorted(self._memo, reverse=True)  # popped from the end: sorted order
        take = max(self.SWEEP_MIN, -(-len(self._memo) // self.SWEEP_CHECKS))
        todo = dict.fromkeys(broken)
        while self._sweep and len(todo) < take + len(broken):
            todo[self._sweep.pop()] = None
        adds: dict[str, list[str]] = {m: [] for m, _, _ in N.MAPS}
        chains = 0
        for spn in todo:
            s = self._memo.get(spn)
            if s is None:
                continue
            lines += [f"add set {t} {name} {decl}" for name, decl in s.sets]
            for name, rules in s.chains:
                lines += _chain_block(t, name, rules, flush=True)
                n_rules += len(rules)
                chains += 1
            for mapname, key, value_, comment in s.elements:
                if mapname in ENDPOINT_MAPS:
                    adds[mapname].append(_add_item(key, (value_, comment)))
                    continue
                value = self._kernel[mapname].get(key)
                owners = self._owners.get((mapname, key), ())
                if value is not None and owners and owners[0][0] == spn:
                    adds[mapname].append(_add_item(key, value))
        for mapname, items in adds.items():
            lines += _element_block("add", t, mapname, items)
            label = N.map_label(mapname)
            out.written[label] = out.written.get(label, 0) + len(items)
        out.written["chains"] = out.written.get("chains", 0) + BASE_CHAIN_COUNT + chains
        out.written["rules"] = out.written.get("rules", 0) + n_rules
        out.text = "\n".join(lines) + "\n"
        out.elements = None  # more than element changes now
        out.missing = tuple(sorted(missing))
        out.reasserted = len(todo)
        return out

    def _full(self, desired: DesiredState, existing: Existing | None) -> RenderResult:
        node = desired.node
        t = self.table
        old_memo, old_node = self._memo, self._node
        memo: dict[ServicePortName, ServiceNft] = {}
        for spn in sorted(desired.services):
            plan = desired.services[spn]
            old = old_memo.get(spn)
            memo[spn] = old if old is not None and old.node == node and old.plan == plan else (
                render_service(plan, node, self._slots)
            )
        for spn, old in old_memo.items():
            kept = memo.get(spn)
            self._slots.release(c for c in old.slots if kept is None or c not in kept.slots)

        wanted_chains = set(N.FIXED_CHAINS)
        wanted_sets = {m for m, _, _ in N.MAPS} | {name for name, _, _ in node_sets(node)}
        for s in memo.values():
            wanted_chains.update(name for name, _ in s.chains)
            wanted_sets.update(name for name, _ in s.sets)
        stale_chains: set[str] = set()
        stale_sets: set[str] = set()
        stale_maps: set[str] = set()
        if self.recreate:
            pass
        elif existing is not None:
            stale_chains = set(existing.chains) - wanted_chains
            stale_sets = set(existing.sets) - wanted_sets
            stale_maps = set(existing.maps) - wanted_sets
        elif self.known:
            for s in old_memo.values():
                stale_chains.update(name for name, _ in s.chains)
                stale_sets.update(name for name, _ in s.sets)
            if old_node is not None:
                stale_sets.update(name for name, _, _ in node_sets(old_node))
            stale_chains -= wanted_chains
            stale_sets -= wanted_sets

        lines = [f"add table {t}"]
        if self.recreate:
            lines += [f"delete table {t}", f"add table {t}"]
        else:
            lines.append(f"flush table {t}")
        lines += _maps_and_node_sets(self.family, t, node, flush_maps=not self.recreate, flush_sets=not self.recreate)
        # Nothing references leftovers any more: the flushes above removed every rule and element
        # (leftover maps go first: their elements may point at leftover chains).
        lines += [f"delete map {t} {m}" for m in sorted(stale_maps)]
        lines += [f"delete chain {t} {c}" for c in sorted(stale_chains)]
        lines += [f"delete set {t} {s}" for s in sorted(stale_sets)]

        written: dict[str, int] = {}
        n_rules = 0
        for name, decl, rules in base_chains(node):
            lines += _chain_block(t, name, rules, decl)
            n_rules += len(rules)

        self._owners = {}
        self._kernel = {m: {} for m, _, _ in N.MAPS}
        self._endpoint_elements = 0
        endpoint_items: dict[str, list[str]] = {m: [] for m in N.ENDPOINT_MAPS}
        self._chains = self._rules = 0
        for spn, s in memo.items():
            lines += [f"add set {t} {name} {decl}" for name, decl in s.sets]
            for name, rules in s.chains:
                lines += _chain_block(t, name, rules)
            self._chains += len(s.chains)
            self._rules += s.rule_count
            for mapname, key, verdict, comment in s.elements:
                if mapname in ENDPOINT_MAPS:
                    endpoint_items[mapname].append(_add_item(key, (verdict, comment)))
                    self._endpoint_elements += 1
                    continue
                value = (verdict, comment) if verdict or comment else NO_VALUE
                mk = (mapname, key)
                had = self._owners.get(mk)
                # ports come in sorted order: a later owner never takes the kernel's value
                self._owners[mk] = ((spn, value),) if had is None else (*had, (spn, value))
                self._kernel[mapname].setdefault(key, value)
        for mapname, _, _ in N.MAPS:
            items = endpoint_items[mapname] if mapname in ENDPOINT_MAPS else [
                _add_item(k, v) for k, v in self._kernel[mapname].items()]
            lines += _element_block("add", t, mapname, items)
            written[mapname] = len(items)
        written = _by_label(written)

        written["chains"] = BASE_CHAIN_COUNT + self._chains + len(stale_chains)
        written["rules"] = n_rules + self._rules
        self._memo = memo
        self._node = node
        self.known = True
        self.recreate = False
        return RenderResult("\n".join(lines) + "\n", True, written, self._totals())

    def _partial(self, desired: DesiredState, changed: Iterable[ServicePortName]) -> RenderResult:
        node = desired.node
        t = self.table
        add_sets: list[str] = []
        del_sets: list[str] = []
        declare: list[str] = []
        flush: list[str] = []
        body: list[str] = []
        remove: list[str] = []
        original: dict[tuple[str, str], ElemValue | None] = {}  # kernel value before this sync
        deletes: dict[str, list[str]] = {m: [] for m, _, _ in N.MAPS}
        adds: dict[str, list[tuple[str, ElemValue]]] = {m: [] for m, _, _ in N.MAPS}

        for spn in sorted(set(changed)):
            old = self._memo.get(spn)
            plan = desired.services.get(spn)
            if old is not None and plan is not None and old.plan == plan and old.node == node:
                continue
            if old is None and plan is None:
                continue
            new = render_service(plan, node, self._slots) if plan is not None else None
            if new is None:
                del self._memo[spn]
            else:
                self._memo[spn] = new
            if old is not None:
                self._slots.release(c for c in old.slots if new is None or c not in new.slots)

            old_sets = dict(old.sets) if old else {}
            new_sets = dict(new.sets) if new else {}
            add_sets += [f"add set {t} {n} {d}" for n, d in new_sets.items() if n not in old_sets]
            del_sets += [f"delete set {t} {n}" for n in old_sets if n not in new_sets]

            old_chains = dict(old.chains) if old else {}
            new_chains = dict(new.chains) if new else {}
            for name, rules in new_chains.items():
                prev = old_chains.get(name)
                if prev is None:
                    declare.append(name)
                elif prev != rules:
                    flush.append(name)
                else:
                    continue
                body += _chain_lines(t, name, rules)
            remove += [name for name in old_chains if name not in new_chains]
            self._chains += len(new_chains) - len(old_chains)
            self._rules += (new.rule_count if new else 0) - (old.rule_count if old else 0)

            old_elems = {(m, k): (v, c) for m, k, v, c in old.elements} if old else {}
            new_elems = {(m, k): (v, c) for m, k, v, c in new.elements} if new else {}
            for mk in [*old_elems, *(k for k in new_elems if k not in old_elems)]:  # in a stable order
                value = new_elems.get(mk)
                if old_elems.get(mk) == value:
                    continue
                mapname, key = mk
                if mapname in ENDPOINT_MAPS:  # this chain's own number: no other port holds it now
                    if mk in old_elems:
                        deletes[mapname].append(key)
                        self._endpoint_elements -= 1
                    if value is not None:
                        adds[mapname].append((key, value))
                        self._endpoint_elements += 1
                    continue
                if mk not in original:
                    original[mk] = self._kernel[mapname].get(key)
                owners = dict(self._owners.get(mk, ()))
                if value is None:
                    owners.pop(spn, None)
                else:
                    owners[spn] = value
                if owners:
                    self._owners[mk] = tuple(sorted(owners.items()))
                    self._kernel[mapname][key] = self._owners[mk][0][1]
                else:
                    self._owners.pop(mk, None)
                    self._kernel[mapname].pop(key, None)

        for (mapname, key), before in sorted(original.items()):
            after = self._kernel[mapname].get(key)
            if before == after:
                continue
            if before is not None:
                deletes[mapname].append(key)
            if after is not None:
                adds[mapname].append((key, after))

        lines = list(add_sets)
        lines += [f"add chain {t} {c}" for c in declare]
        for mapname, _, _ in N.MAPS:
            lines += _element_block("delete", t, mapname, deletes[mapname])
        lines += [f"flush chain {t} {c}" for c in flush]
        lines += body
        for mapname, _, _ in N.MAPS:
            lines += _element_block("add", t, mapname, [_add_item(k, v) for k, v in adds[mapname]])
        lines += [f"flush chain {t} {c}" for c in remove]
        lines += [f"delete chain {t} {c}" for c in remove]
        lines += del_sets

        written = _by_label({m: len(deletes[m]) + len(adds[m]) for m, _, _ in N.MAPS})
        written["chains"] = len(declare) + len(flush) + len(remove)
        written["rules"] = len(body)
        text = "\n".join(lines) + "\n" if lines else ""
        elements: tuple[ElementChange, ...] | None = None
        if lines and not (add_sets or del_sets or declare or flush or body or remove) and all(
                m in ELEMENT_ONLY for m, items in [*deletes.items(), *adds.items()] if items):
            # endpoints changed, nothing else: the same transaction as element changes alone, for
            # a writer that can apply them without nft's statement language (deletes first)
            elements = tuple([(False, m, k, "") for m, keys in deletes.items() for k in keys]
                             + [(True, m, k, v[0]) for m, items in adds.items() for k, v in items])
        return RenderResult(text, False, written, self._totals(), elements=elements)
