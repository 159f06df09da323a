"""DesiredState -> iptables-restore input. Pure: no I/O, no kernel.

Each service port renders to a `ServiceRules` (its own chains plus the lines it contributes to the
shared dispatch chains), cached between syncs. A partial sync re-renders only changed ports and
writes only their chains, plus any shared chain whose text changed; a full sync writes everything
and deletes every chain of ours that is no longer wanted.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from operator import itemgetter

from agent.backends.iptables import chains as C
from agent.model.desired import DesiredState, NodeContext, ServicePlan
from agent.model.endpoints import EndpointInfo
from agent.model.serviceport import ServicePortName

# Shared chains whose content is the concatenation of every service port's lines.
# ICMP port unreachable for reject: the client sees "connection refused" at once.
VERDICT = {"drop": "-j DROP", "reject": "-j REJECT"}

DISPATCH: tuple[tuple[str, str], ...] = (
    ("nat", C.SERVICES),
    ("nat", C.NODEPORTS),
    ("filter", C.SERVICES),
    ("filter", C.EXTERNAL_SERVICES),
    ("filter", C.HEALTH_CHECKS),
    ("mangle", C.FIREWALL),
)


@dataclass(frozen=True, slots=True)
class ServiceRules:
    """What one service port puts in the kernel."""

    # table -> ((chain, rule lines), ...) for chains owned by this port alone
    chains: Mapping[str, tuple[tuple[str, tuple[str, ...]], ...]]
    # (table, dispatch chain) -> lines this port adds there
    dispatch: Mapping[tuple[str, str], tuple[str, ...]]
    endpoints: int = 0

    def chain_names(self) -> set[tuple[str, str]]:
        return {(t, name) for t, cs in self.chains.items() for name, _ in cs}

    def kept(self) -> KeptRules:
        return KeptRules({t: tuple((name, len(rules)) for name, rules in cs) for t, cs in self.chains.items()},
                         self.dispatch)


@dataclass(frozen=True, slots=True)
class KeptRules:
    """What the renderer keeps of a service port once rendered: its chains' names and rule counts
    (their lines are written and not needed again: at 10k Services they held ~100 MB) and its
    lines in the shared chains (rebuilt from every port's)."""

    chains: Mapping[str, tuple[tuple[str, int], ...]]  # table -> ((chain, rule count), ...)
    dispatch: Mapping[tuple[str, str], tuple[str, ...]]

    def rule_count(self, table: str) -> int:
        return sum(n for _, n in self.chains.get(table, ())) + sum(
            len(v) for (t, _), v in self.dispatch.items() if t == table
        )

    def chain_names(self) -> set[tuple[str, str]]:
        return {(t, name) for t, cs in self.chains.items() for name, _ in cs}


@dataclass(slots=True)
class RenderResult:
    batches: list[str]  # restore inputs, applied in order; each one is atomic
    rules: int  # rule lines written, per family
    chains: int
    deleted_chains: int
    per_table: dict[str, int] = field(default_factory=dict)  # rules written per table
    totals: dict[str, int] = field(default_factory=dict)  # rules in each table after the write
    # the service ports each batch writes (parallel to `batches`): when one is refused, those of
    # it and of every later batch are what the kernel may lack
    batch_ports: list[frozenset[ServicePortName]] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(self.batches)


def _proto(p: str) -> str:
    return p.lower()


def _match(proto: str, port: int) -> str:
    pr = _proto(proto)
    return f"-p {pr} -m {pr} --dport {port}"


def _host(ip: str, family: int) -> str:
    return f"{ip}/32" if family == 4 else f"{ip}/128"


def _mask(family: int) -> str:
    return "255.255.255.255" if family == 4 else "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"


def _comment(text: str) -> str:
    return f'-m comment --comment "{text}"'


def render_service(plan: ServicePlan, node: NodeContext) -> ServiceRules:
    info = plan.info
    fam = info.family
    spn = str(info.name)
    proto = info.protocol
    svc_chain = C.service_chain("SVC", spn, proto)
    svl_chain = C.service_chain("SVL", spn, proto)
    ext_chain = C.service_chain("EXT", spn, proto)
    fw_chain = C.service_chain("FW", spn, proto)
    nat: list[tuple[str, tuple[str, ...]]] = []
    mangle: list[tuple[str, tuple[str, ...]]] = []
    d: dict[tuple[str, str], list[str]] = {k: [] for k in DISPATCH}
    match = _match(proto, info.port)
    cip = _host(info.cluster_ip, fam)

    # What choosing an endpoint does, shared by the cluster (SVC) and local (SVL) chains. An
    # endpoint gets a chain of its own (KPA-SEP-) when something must happen besides the DNAT: the
    # hairpin mark, for an endpoint that may reach itself through this node unmasqueraded
    # (ServicePlan.hairpin_endpoints), or the ClientIP affinity record. Any other endpoint is a
    # DNAT rule in the service chain itself: every chain costs each restore (iptables-restore
    # looks each one up by name in a 512-bucket hash; the kernel table carries a head and a tail
    # entry per chain), and at 10k Services x 10 endpoints spread over many nodes nearly all
    # endpoints are of that kind.
    # The DNAT needs the protocol (-p) for its port, and no `-m tcp` match: that one matched
    # nothing more and cost every restore a match lookup per rule (kernel and iptables-save alike;
    # 10% of a legacy one-Service restore at 10k).
    dnat = f"-p {_proto(proto)}"
    pick: dict[EndpointInfo, str] = {}
    hairpin = plan.hairpin_endpoints(node.node_name)
    for ep in sorted(plan.all_endpoints):
        if not (info.affinity_seconds or ep in hairpin):
            pick[ep] = f"{dnat} -j DNAT --to-destination {ep.address}"
            continue
        name = C.endpoint_chain(spn, proto, ep.address)
        pick[ep] = f"-j {name}"
        rules = [f"-A {name} -s {_host(ep.ip, fam)} -j {C.MARK_MASQ}"]
        aff = f" -m recent --name {name} --mask {_mask(fam)} --rsource --set" if info.affinity_seconds else ""
        rules.append(f"-A {name} {dnat}{aff} -j DNAT --to-destination {ep.address}")
        nat.append((name, tuple(rules)))

    def spread(chain: str, eps: tuple[EndpointInfo, ...]) -> tuple[str, ...]:
        rules: list[str] = []
        if node.masquerade_all:
            rules.append(f"-A {chain} -d {cip} {match} -j {C.MARK_MASQ}")
        elif len(node.cluster_cidrs) == 1:
            rules.append(f"-A {chain} ! -s {node.cluster_cidrs[0]} -d {cip} {match} -j {C.MARK_MASQ}")
        elif node.cluster_cidrs:  # outside every pod CIDR: one chain returns for each of them
            rules.append(f"-A {chain} -d {cip} {match} -j {C.MASQ_NOT_PODS}")
        if info.affinity_seconds:
            mask = _mask(fam)
            for ep in eps:
                sep = C.endpoint_chain(spn, proto, ep.address)
                rules.append(
                    f"-A {chain} -m recent --name {sep} --mask {mask} --rsource --rcheck "
                    f"--seconds {info.affinity_seconds} --reap -j {sep}"
                )
        n = len(eps)
        for i, ep in enumerate(eps):
            if i < n - 1:
                rules.append(
                    f"-A {chain} -m statistic --mode random --probability {1.0 / (n - i):.10f} {pick[ep]}"
                )
            else:
                rules.append(f"-A {chain} {pick[ep]}")
        return tuple(rules)

    if plan.cluster:
        nat.append((svc_chain, spread(svc_chain, plan.cluster)))
    if plan.local:
        nat.append((svl_chain, spread(svl_chain, plan.local)))

    # Cluster IP.
    internal_chain = svl_chain if info.internal_policy_local else svc_chain
    if plan.internal_endpoints:
        d[("nat", C.SERVICES)].append(
            f"-A {C.SERVICES} -d {cip} {match} {_comment(f'{spn} cluster IP')} -j {internal_chain}"
        )
    else:
        verdict = VERDICT[plan.internal_unserved or "reject"]
        d[("filter", C.SERVICES)].append(
            f"-A {C.SERVICES} -d {cip} {match} {_comment(f'{spn} has no endpoints')} {verdict}"
        )

    # External traffic: node ports, external IPs, load-balancer IPs all enter the EXT chain.
    if info.externally_accessible:
        ext_rules: list[str] = []
        for step in plan.external_steps:
            if step == "pods-to-cluster":
                ext_rules += [f"-A {ext_chain} -s {cidr} -j {svc_chain}" for cidr in node.cluster_cidrs]
            elif step == "node-to-cluster":
                ext_rules.append(f"-A {ext_chain} -m addrtype --src-type LOCAL -j {C.MARK_MASQ}")
                ext_rules.append(f"-A {ext_chain} -m addrtype --src-type LOCAL -j {svc_chain}")
            elif step == "masquerade-to-cluster":
                ext_rules.append(f"-A {ext_chain} -j {C.MARK_MASQ}")
                ext_rules.append(f"-A {ext_chain} -j {svc_chain}")
            else:
                ext_rules.append(f"-A {ext_chain} -j {svl_chain}")
        has_ext = bool(ext_rules)
        if has_ext:
            nat.append((ext_chain, tuple(ext_rules)))
        unserved = plan.external_unserved
        ext_verdict = VERDICT[unserved] if unserved else ""
        ext_reason = plan.unserved_reason
        for ip, what in [(i, "external IP") for i in info.external_ips] + [
            (i, "load balancer IP") for i in info.load_balancer_ips
        ]:
            if has_ext:
                d[("nat", C.SERVICES)].append(
                    f"-A {C.SERVICES} -d {_host(ip, fam)} {match} {_comment(f'{spn} {what}')} -j {ext_chain}"
                )
            if ext_verdict:
                d[("filter", C.EXTERNAL_SERVICES)].append(
                    f"-A {C.EXTERNAL_SERVICES} -d {_host(ip, fam)} {match} "
                    f"{_comment(f'{spn} has {ext_reason}')} {ext_verdict}"
                )
        if info.node_port:
            np_match = _match(proto, info.node_port)
            if has_ext:
                d[("nat", C.NODEPORTS)].append(
                    f"-A {C.NODEPORTS} {np_match} {_comment(f'{spn} node port')} -j {ext_chain}"
                )
            if ext_verdict:
                d[("filter", C.EXTERNAL_SERVICES)].append(
                    f"-A {C.EXTERNAL_SERVICES} -m addrtype --dst-type LOCAL {np_match} "
                    f"{_comment(f'{spn} has {ext_reason}')} {ext_verdict}"
                )
        if plan.source_ranges:
            fw = [f"-A {fw_chain} -s {cidr} -j RETURN" for cidr in plan.source_ranges]
            fw.append(f"-A {fw_chain} {_comment(f'{spn} source not in loadBalancerSourceRanges')} -j DROP")
            mangle.append((fw_chain, tuple(fw)))
            for ip in info.load_balancer_ips:
                d[("mangle", C.FIREWALL)].append(f"-A {C.FIREWALL} -d {_host(ip, fam)} {match} -j {fw_chain}")

    if info.health_check_node_port:
        # Like kube-proxy: load balancers' health checks get through a host firewall that drops
        # unknown ports (INPUT policy DROP, or a later rule).
        d[("filter", C.HEALTH_CHECKS)].append(
            f"-A {C.HEALTH_CHECKS} {_comment(f'{spn} health check node port')} "
            f"{_match('tcp', info.health_check_node_port)} -j ACCEPT")

    chains_by_table: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {}
    if nat:
        chains_by_table["nat"] = tuple(nat)
    if mangle:
        chains_by_table["mangle"] = tuple(mangle)
    return ServiceRules(
        chains=chains_by_table,
        dispatch={k: tuple(v) for k, v in d.items() if v},
        endpoints=len(plan.all_endpoints),
    )


def localhost_nodeports(node: NodeContext, allowed: bool) -> bool:
    """Whether NodePorts are served on 127.0.0.1 in this family: IPv4 only (IPv6 cannot route
    ::1), when --iptables-localhost-nodeports allows it and --nodeport-addresses takes loopback (all
    addresses, or a CIDR holding 127.0.0.1), as kube-proxy decides. Needs route_localnet=1."""
    if node.family != 4 or not allowed:
        return False
    return node.nodeport_ips is None or any(ipaddress.ip_address(ip).is_loopback for ip in node.nodeport_ips)


def base_rules(node: NodeContext, localhost: bool = False) -> dict[tuple[str, str], tuple[str, ...]]:
    """Rules of the fixed chains (not per service). `localhost`: NodePorts on 127.0.0.1 too (see
    localhost_nodeports); otherwise loopback destinations never enter the node-port chain, where
    their DNAT would be black-holed (route_localnet off)."""
    loop = node.loopback
    comment = _comment("node ports")
    if node.nodeport_ips is None:
        not_loop = "" if localhost else f"! -d {loop} "
        np_jump = [f"-A {C.SERVICES} {not_loop}-m addrtype --dst-type LOCAL {comment} -j {C.NODEPORTS}"]
    else:
        np_jump = [
            f"-A {C.SERVICES} -d {_host(ip, node.family)} {comment} -j {C.NODEPORTS}"
            for ip in node.nodeport_ips if localhost or not ipaddress.ip_address(ip).is_loopback
        ]
    # route_localnet=1 would let any neighbour reach what listens on 127.0.0.1 (CVE-2020-8558):
    # new traffic to 127.0.0.0/8 that did not come from it, and is not a NodePort's DNAT, is dropped
    localnet = (f"-A {C.LOCALNET} -d {loop} ! -s {loop} {_comment('block incoming localnet connections')} "
                "-m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP",) if localhost else ()
    return {
        ("nat", C.MARK_MASQ): (f"-A {C.MARK_MASQ} -j MARK --or-mark {C.MASQ_MARK}",),
        ("nat", C.MASQ_NOT_PODS): (
            *(f"-A {C.MASQ_NOT_PODS} -s {cidr} -j RETURN" for cidr in node.cluster_cidrs),
            f"-A {C.MASQ_NOT_PODS} -j {C.MARK_MASQ}",
        ),
        ("nat", C.POSTROUTING): (
            f"-A {C.POSTROUTING} -m mark ! --mark {C.MASQ_MARK}/{C.MASQ_MARK} -j RETURN",
            f"-A {C.POSTROUTING} -j MARK --xor-mark {C.MASQ_MARK}",
            f"-A {C.POSTROUTING} {_comment('kube-proxy-agent service traffic requiring SNAT')} "
            "-j MASQUERADE --random-fully",
        ),
        ("filter", C.FORWARD): (
            f"-A {C.FORWARD} -m mark --mark {C.MASQ_MARK}/{C.MASQ_MARK} -j ACCEPT",
            f"-A {C.FORWARD} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        ),
        ("filter", C.LOCALNET): localnet,
        ("nat", C.SERVICES + "#tail"): tuple(np_jump),
    }


# A table's section of a restore input: chain declarations (which flush), each chain's rules
# (name, lines), chains to delete.
Section = tuple[list[str], list[tuple[str, Sequence[str]]], list[str]]


def _emit(sections: Mapping[str, Section]) -> str:
    """One restore input: per table, declarations (which flush), rules, then deletions.
    Chains are declared and filled in name order: iptables-legacy-restore finds a chain by name
    faster when the names come in order (10k Services: 7.6 s -> 5.3 s for the same rules)."""
    out: list[str] = []
    for table in C.TABLES:
        decl, body, gone = sections.get(table, ([], [], []))
        if not decl and not body and not gone:
            continue
        out.append(f"*{table}")
        out.extend(sorted([*decl, *(f":{c} - [0:0]" for c in gone)]))
        for _, lines in sorted(body, key=itemgetter(0)):  # stable: a chain's rules keep their order
            out.extend(lines)
        out.extend(f"-X {c}" for c in gone)
        out.append("COMMIT")
    return "\n".join(out) + "\n" if out else ""


class IptablesRenderer:
    """Keeps each service port's rendered rules and what was last written, per family."""

    def __init__(self, localhost_nodeports: bool = False) -> None:
        # --iptables-localhost-nodeports (and route_localnet=1 set by the mode)
        self.localhost_nodeports = localhost_nodeports
        self._rules: dict[ServicePortName, KeptRules] = {}
        # Kept up to date as ports are rendered, so a partial sync costs what changed, not a walk
        # of every port (at 10k Services that walk was ~300 ms of each one-endpoint change):
        self._order: list[ServicePortName] | None = None  # sorted(self._rules), None when stale
        self._port_rules: dict[str, int] = {t: 0 for t in C.TABLES}  # every port's rules per table
        self._dispatch_text: dict[tuple[str, str], str] = {}
        self._dispatch_count: dict[tuple[str, str], int] = {}
        self._dispatch_tail: tuple[str, ...] | None = None  # the node-port lines ending nat KPA-SERVICES
        self.shared_drifted: list[str] = []  # "table/chain" shared by all ports, changed (last drift())
        # True once a full render has been written and nothing failed since: the kernel should
        # hold exactly what this renderer last produced, so drift can be found by comparison.
        self.in_sync = False
        self._node: NodeContext | None = None
        # Each service port's chains as the kernel printed them at the last check (one digest per
        # port), and the ports written since then, which get theirs at the next check: a rule
        # edited in place (same count) in a port with a digest is drift.
        self._digests: dict[ServicePortName, int] = {}
        self._unchecked: set[ServicePortName] = set()
        # unchecked ports rewritten by a check because someone else had committed since they were
        # written: the next read-back takes their digest whoever committed since (else, on a node
        # where others commit between most checks, they would be rewritten at every check)
        self._reasserted: set[ServicePortName] = set()
        # ports a refused restore left unwritten: rewritten by the next sync, whatever it is
        self._unwritten: set[ServicePortName] = set()

    def reset(self) -> None:
        """Forget what was written (after a failed restore): the next render must be full."""
        self._dispatch_text.clear()
        self._dispatch_count.clear()
        self._digests.clear()
        self._unchecked.clear()
        self._reasserted.clear()
        self._unwritten.clear()
        self.in_sync = False

    def forget_digests(self) -> None:
        """The digests came from another reader and do not compare: every port takes its digest
        anew at the next read-back."""
        self._unchecked.update(self._digests)
        self._reasserted.update(self._digests)  # taken as read whoever committed since: not rewritten
        self._digests.clear()

    @property
    def as_written(self) -> bool:
        """In sync, and no refused restore left ports unwritten: the kernel holds what this
        renderer produced unless someone else changed it."""
        return self.in_sync and not self._unwritten

    @property
    def unchecked(self) -> frozenset[ServicePortName]:
        """Ports written since a check last saw them (they have no digest yet)."""
        return frozenset(self._unchecked)

    @property
    def reasserted(self) -> frozenset[ServicePortName]:
        return frozenset(self._reasserted)

    def mark_reasserted(self, ports: Iterable[ServicePortName]) -> None:
        """`ports` were just rewritten by a check (not for a change): see `_reasserted`."""
        self._reasserted.update(p for p in ports if p in self._unchecked)

    def refused(self, ports: Iterable[ServicePortName]) -> None:
        """A restore of a sync was refused after the earlier ones of that sync went in. When the
        kernel held what was written before this sync, only `ports` (those of the refused restore
        and later ones) and the shared chains are in doubt: the next sync rewrites just those, and
        its check against what the kernel holds finds anything else. Otherwise: reset()."""
        if not self.in_sync:
            self.reset()
            return
        self._unwritten.update(ports)
        self._dispatch_text.clear()
        for spn in self._unwritten:
            self._digests.pop(spn, None)
            self._unchecked.discard(spn)
            self._reasserted.discard(spn)

    def _base(self, node: NodeContext) -> dict[tuple[str, str], tuple[str, ...]]:
        return base_rules(node, localhost_nodeports(node, self.localhost_nodeports))

    def drift(self, rule_counts: Mapping[tuple[str, str], int],
              digests: Mapping[tuple[str, str], int] | None = None,
              digest_unchecked: bool = True) -> set[ServicePortName] | None:
        """Compare what was written with what the kernel holds (rules per chain of ours, from
        the read-back; a missing chain counts as different; a service chain whose rules changed
        since the last check, count unchanged, too). Returns the service ports whose chains differ
        (a shared chain that differs is rewritten with them), or None when a base chain differs or
        nothing was written yet: then only a full rewrite will do. Ports written since the last
        check take what the kernel shows as their digest, unless `digest_unchecked` is False
        (someone else committed since they were written: the caller rewrites them instead)."""
        self.shared_drifted = []
        if not self.in_sync or self._node is None:
            return None
        for (table, chain), rules in self._base(self._node).items():
            if not chain.endswith("#tail") and (table, chain) not in DISPATCH \
                    and rule_counts.get((table, chain)) != len(rules):
                self.shared_drifted = [f"{table}/{chain}"]
                return None
        self.shared_drifted = [f"{t}/{c}" for (t, c), n in self._dispatch_count.items()
                               if rule_counts.get((t, c)) != n]
        if self.shared_drifted:
            self._dispatch_text.clear()
        drifted: set[ServicePortName] = set()
        for spn, r in self._rules.items():
            if any(rule_counts.get((t, name)) != n for t, cs in r.chains.items() for name, n in cs):
                drifted.add(spn)
            elif digests is not None:
                seen = hash(tuple(digests.get((t, name)) for t, cs in r.chains.items() for name, _ in cs))
                if spn in self._unchecked:
                    if digest_unchecked or spn in self._reasserted:
                        self._digests[spn] = seen  # as the kernel printed what was written
                        self._unchecked.discard(spn)
                        self._reasserted.discard(spn)
                elif self._digests.get(spn, seen) != seen:
                    drifted.add(spn)
        for spn in drifted:
            self._digests.pop(spn, None)
        return drifted | (self._unwritten & self._rules.keys())

    def _keep(self, spn: ServicePortName, kept: KeptRules | None) -> KeptRules | None:
        """Record what `spn` now puts in the kernel (None: nothing, it is gone); the previous record."""
        old = self._rules.pop(spn, None) if kept is None else self._rules.get(spn)
        if kept is not None:
            self._rules[spn] = kept
        if (old is None) != (kept is None):
            self._order = None
        for t in C.TABLES:
            self._port_rules[t] += (kept.rule_count(t) if kept else 0) - (old.rule_count(t) if old else 0)
        return old

    def _sorted_ports(self) -> list[ServicePortName]:
        if self._order is None:
            self._order = sorted(self._rules)
        return self._order

    def render(
        self,
        desired: DesiredState,
        changed: Iterable[ServicePortName],
        *,
        full: bool,
        existing_chains: Mapping[str, set[str]] | None = None,
        batch_chains: int = 0,
    ) -> RenderResult:
        """Restore input for one family. `existing_chains` (table -> our chains in the kernel)
        lets a sync delete leftovers; otherwise it deletes what it knows it replaced.
        `batch_chains` > 0 splits service chains into restores of about that many chains (iptables-nft
        slows down quadratically with the chains in one restore); 0 writes one restore."""
        node = desired.node
        self._node = node
        to_write: set[ServicePortName] = set(desired.services) if full else set(changed) | self._unwritten
        self._unwritten.clear()
        deleted: set[tuple[str, str]] = set()  # deleted after the shared chains stop jumping there
        dropped: dict[ServicePortName, set[tuple[str, str]]] = {}  # deleted with their service's chains
        fresh: dict[ServicePortName, ServiceRules] = {}  # the ports rendered now, with their lines
        # shared chains a port's lines changed in (a full sync rewrites them all)
        touched: set[tuple[str, str]] = set()
        for spn in to_write:
            old = self._rules.get(spn)
            plan = desired.services.get(spn)
            if plan is None:
                self._keep(spn, None)
                if old is not None:
                    deleted |= old.chain_names()
                    touched |= old.dispatch.keys()
                continue
            new = render_service(plan, node)
            touched |= {k for k in new.dispatch.keys() | (old.dispatch.keys() if old else set())
                        if old is None or old.dispatch.get(k) != new.dispatch.get(k)}
            if old is not None:
                unused = old.chain_names() - new.chain_names()
                # Endpoint chains are jumped to only from this port's own chains, rewritten in the
                # same batch; the others (SVC, SVL, EXT, FW) are jumped to from the shared chains,
                # rewritten last, so they can only be deleted after that.
                mine = {(t, c) for t, c in unused if c.startswith(C.PREFIX + "SEP-")}
                if mine:
                    dropped[spn] = mine
                deleted |= unused - mine
            self._keep(spn, new.kept())
            fresh[spn] = new
        if full:
            for spn in set(self._rules) - set(desired.services):
                if (gone_port := self._keep(spn, None)) is not None:
                    deleted |= gone_port.chain_names()

        base = self._base(node)
        order = self._sorted_ports()
        dispatch_out: dict[tuple[str, str], list[str]] = {}
        tail = base[("nat", C.SERVICES + "#tail")]
        for key in DISPATCH:
            # Only a shared chain some port's lines changed in is put together again (or one not
            # known to be in the kernel as written, or the node-port tail's text changed).
            if not (full or key in touched or key not in self._dispatch_text
                    or (key == ("nat", C.SERVICES) and self._dispatch_tail != tail)):
                continue
            lines: list[str] = []
            for spn in order:
                lines.extend(self._rules[spn].dispatch.get(key, ()))
            if key == ("nat", C.SERVICES):
                lines.extend(tail)
                self._dispatch_tail = tail
            text = "\n".join(lines)
            if full or self._dispatch_text.get(key) != text:
                dispatch_out[key] = lines
                self._dispatch_text[key] = text
                self._dispatch_count[key] = len(lines)

        # Our chains still wanted: a chain named for one port is never another's, so a sync that
        # is not told the kernel's chains only needs those of the ports it rendered.
        wanted: dict[str, set[str]] = {t: set(C.BASE_CHAINS[t]) for t in C.TABLES}
        for spn in order if existing_chains is not None else to_write:
            if (kept_rules := self._rules.get(spn)) is not None:
                for t, name in kept_rules.chain_names():
                    wanted[t].add(name)
        if existing_chains is not None:
            for t in C.TABLES:
                deleted |= {(t, c) for c in existing_chains.get(t, set()) - wanted[t]}
        deleted = {(t, c) for t, c in deleted if c not in wanted[t]}
        for spn, chains in dropped.items():
            dropped[spn] = {(t, c) for t, c in chains if c not in wanted[t]}
            # deleted with its port's chains, never a second time (a second -X in one input is
            # refused: "No chain/target/match by that name"; in a later batch it would recreate it)
            deleted -= dropped[spn]
        for spn in to_write:  # rewritten ports get their digest at the next check
            self._digests.pop(spn, None)
            self._reasserted.discard(spn)
            if spn in self._rules:
                self._unchecked.add(spn)
            else:
                self._unchecked.discard(spn)
        if full:
            self._unchecked &= self._rules.keys()
            self._reasserted &= self._unchecked
            for removed in self._digests.keys() - self._rules.keys():
                del self._digests[removed]
        if batch_chains and sum(len(self._rules[s].chain_names()) for s in to_write if s in self._rules) \
                <= batch_chains:
            batch_chains = 0  # small enough for one restore: the whole sync stays atomic

        # Service chains first, in batches (each batch is one restore: atomic per service port);
        # then the shared chains that jump to them, base chains, hooks and deletions.
        per_table: dict[str, int] = {}
        batches: list[str] = []
        batch_ports: list[frozenset[ServicePortName]] = []
        n_rules = n_chains = 0
        pending: dict[str, Section] = {}
        pending_chains = 0
        pending_ports: set[ServicePortName] = set()

        def flush_batch() -> None:
            nonlocal pending, pending_chains, pending_ports
            text = _emit(pending)
            if text:
                batches.append(text)
                batch_ports.append(frozenset(pending_ports))
            pending, pending_chains, pending_ports = {}, 0, set()

        dispatch_chains = {chain for _, chain in DISPATCH}
        if full:
            # Chains every service jumps to (masquerade mark, postrouting, forward) come first.
            for (table, chain), rules in base.items():
                if chain not in dispatch_chains and not chain.endswith("#tail"):
                    decl, body, _ = pending.setdefault(table, ([], [], []))
                    decl.append(f":{chain} - [0:0]")
                    body.append((chain, rules))
                    per_table[table] = per_table.get(table, 0) + len(rules)
        for spn in sorted(to_write):
            r = fresh.get(spn)
            if r is None:
                continue
            pending_ports.add(spn)
            for table, name in dropped.get(spn, ()):
                pending.setdefault(table, ([], [], []))[2].append(name)
            for table, owned in r.chains.items():
                decl, body, _ = pending.setdefault(table, ([], [], []))
                for cname, crules in owned:
                    decl.append(f":{cname} - [0:0]")
                    body.append((cname, crules))
                    n_rules += len(crules)
                    per_table[table] = per_table.get(table, 0) + len(crules)
                    n_chains += 1
                    pending_chains += 1
            if batch_chains and pending_chains >= batch_chains:
                flush_batch()
        if batch_chains:
            flush_batch()

        last: dict[str, Section] = {}
        for table in C.TABLES:
            decl, body, gone = pending.pop(table, ([], [], []))  # service chains, when not batched
            shared: list[tuple[str, Sequence[str]]] = []
            if full:
                decl += [f":{c} - [0:0]" for c in C.BASE_CHAINS[table] if c in dispatch_chains]
            for (t, chain), lines in dispatch_out.items():
                if t == table:
                    if not full:
                        decl.append(f":{chain} - [0:0]")
                    shared.append((chain, lines))
            if shared:
                per_table[table] = per_table.get(table, 0) + sum(len(lines) for _, lines in shared)
            last[table] = (decl, body + shared, sorted(gone + [c for t, c in deleted if t == table]))
        final = _emit(last)
        if final:
            batches.append(final)
            batch_ports.append(frozenset(pending_ports))
        n_rules = sum(per_table.values())
        totals = {t: sum(len(v) for (tt, c), v in base.items() if tt == t) + self._port_rules[t]
                  for t in C.TABLES}
        return RenderResult(
            totals=totals,
            batches=batches,
            rules=n_rules,
            chains=n_chains,
            deleted_chains=len(deleted) + sum(len(v) for v in dropped.values()),
            per_table=per_table,
            batch_ports=batch_ports,
        )
