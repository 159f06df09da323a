"""The iptables mode: renders with render.py and writes with iptables-restore --noflush."""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from typing import ClassVar

from prometheus_client import CollectorRegistry

from agent.backends.base import Programmed, SyncError, SyncResult, UnsupportedMode
from agent.backends.iptables import chains as C
from agent.backends.iptables.metrics import IptablesMetrics
from agent.backends.iptables.render import DISPATCH, IptablesRenderer, RenderResult, localhost_nodeports, render_service
from agent.kernel import conntrack, nfgen, sysctl, xtinfo
from agent.kernel.commands import CommandError, have, run
from agent.kernel.xtables import (
    RestoreFailed,
    SavedTables,
    Tools,
    cleanup_prefix,
    detect_variant,
    missing_hooks,
    parse_save,
    read_nft,
    restore,
    with_hooks,
)
from agent.model.desired import Changes, DesiredState, NodeContext, ServicePlan
from agent.model.serviceport import ServicePortName
from agent.model.state import unanswered_tcp_flows

log = logging.getLogger("agent.iptables")


class IptablesBackend:
    name: ClassVar[str] = "iptables"
    BATCH_CHAINS = 2000

    ROUTE_LOCALNET = "net.ipv4.conf.all.route_localnet"

    def __init__(self, tools: Tools | None = None, families: tuple[int, ...] = (4, 6),
                 registry: CollectorRegistry | None = None, localhost_nodeports: bool = True) -> None:
        self._tools = tools
        self.families = families
        self._localhost = localhost_nodeports
        self._renderers = {f: IptablesRenderer(localhost_nodeports) for f in families}
        self._route_localnet = False  # set to 1 by this run
        self.metrics = IptablesMetrics(registry)
        self.conntrack = conntrack.Cleaner()
        self._untouched: nfgen.Untouched | None = None
        self._netlink_reads = True  # the nft variant reads its chains back over netlink (nftrules)

    @property
    def tools(self) -> Tools:
        if self._tools is None:
            self._tools, why = detect_variant()
            log.info("iptables variant chosen variant=%s reason=%r", self._tools.variant or "plain", why)
        return self._tools

    @property
    def untouched(self) -> nfgen.Untouched:
        """Whether anyone changed the tables since our last write: the nf_tables generation for
        the nft variant; the tables' sizes for legacy (weaker: a same-size edit goes unseen until
        a verifying check, see xtinfo)."""
        if self._untouched is None:
            probe = functools.partial(xtinfo.state, self.families, C.TABLES) if self.tools.variant == "legacy" else None
            self._untouched = nfgen.Untouched(probe=probe)
        return self._untouched

    def check_supported(self) -> None:
        missing = [b for b in (self.tools.binary(4, "restore"), self.tools.binary(4, "save"), self.tools.binary(4, ""))
                   if not have(b)]
        if missing:
            raise UnsupportedMode(
                f"iptables mode needs {', '.join(missing)}: install the iptables package "
                "(apt-get install iptables), or use --proxy-mode nftables"
            )
        try:  # one built-in chain: iptables-save -t nat ran a 250 MB child at 10k Services
            run([self.tools.binary(4, ""), "-t", "nat", "-S", "POSTROUTING"], timeout=30)
        except CommandError as exc:
            raise UnsupportedMode(
                f"iptables mode cannot read the nat table ({exc.stderr}); the kernel lacks "
                "iptables NAT support (or the agent lacks CAP_NET_ADMIN); try --proxy-mode nftables"
            ) from exc

    def start(self) -> None:
        """Nothing to load: the first sync is full, reads what a previous run left (_saved)
        and rewrites it in place, atomically per table, deleting only leftover KPA- chains."""
        log.info("iptables mode starting variant=%s; the first sync adopts existing KPA- chains",
                 self.tools.variant or "plain")

    def close(self, timeout: float) -> None:
        """Rules stay in the kernel; only the conntrack cleanup still queued is waited for."""
        self.conntrack.idle(timeout)

    def _saved(self, family: int) -> SavedTables:
        """Our chains as the kernel holds them. The nft variant reads them over netlink (no
        iptables-nft-save child holding the whole table: 250 MB at 10k Services); when that fails,
        iptables-save from then on."""
        if self.tools.variant == "nft" and self._netlink_reads:
            builtins = [(table, builtin) for table, builtin, _, _ in C.HOOKS]
            saved = read_nft(self.tools, family, C.PREFIX, C.TABLES, builtins)
            if saved is not None:
                return saved
            self._netlink_reads = False
            log.warning("cannot read nf_tables over netlink; reading rules back with %s from now on",
                        self.tools.binary(family, "save"))
            for renderer in self._renderers.values():
                renderer.forget_digests()
        return parse_save(run([self.tools.binary(family, "save")], timeout=120), C.PREFIX)

    def sync(self, desired: Mapping[int, DesiredState], changes: Mapping[int, Changes], *, full: bool) -> SyncResult:
        result = SyncResult()
        # A periodic check while nobody has committed to nf_tables since our last restore (the nft
        # variant's ruleset generation is unchanged; on legacy, no table changed size) has no drift
        # to find: no read-back, only the pending changes. Ports written since the last check
        # that read back wait for one (every `verify_every`-th check reads back anyway) to record
        # their chains' digests; when someone else has committed since, those ports are rewritten
        # instead, as their chains may not be what was written.
        digest_unchecked = True
        if full and all(r.as_written for r in self._renderers.values()):
            if self.untouched.holds():
                full = False
                result.detail = "unchanged"
            else:
                digest_unchecked = not self.untouched.moved
        for fam in self.families:
            state = desired[fam]
            renderer = self._renderers[fam]
            if localhost_nodeports(state.node, renderer.localhost_nodeports) and not self._route_localnet:
                self._enable_route_localnet(renderer)
            changed = changes[fam].ports if fam in changes else frozenset()
            # iptables-nft-restore slows down quadratically with the chains in one input, so the
            # nft variant gets service chains in batches; legacy rewrites its whole table per
            # call, so it gets one input.
            batch = 0 if self.tools.variant == "legacy" else self.BATCH_CHAINS
            if full:
                # A periodic full sync first compares the kernel with what was written and rewrites
                # only what differs (a chain flushed or deleted by hand, a missing jump); a complete
                # rewrite happens at start-up, after a failure, or when a base chain drifted.
                saved = self._saved(fam)
                drifted = renderer.drift(saved.rules, saved.digests, digest_unchecked)
                saved.digests.clear()  # not needed past the check: free it before rendering
                if renderer.shared_drifted:
                    result.repaired += len(renderer.shared_drifted)
                    log.warning("rules drifted from what was written; repairing family=IPv%d chains=%s%s", fam,
                                ",".join(renderer.shared_drifted), " (complete rewrite)" if drifted is None else "")
                if drifted is None:
                    result.detail = "complete"
                    out = renderer.render(state, (), full=True, existing_chains=saved.chains,
                                          batch_chains=batch)
                else:
                    result.detail = f"checked(repaired={len(drifted)})"
                    result.repaired += len(drifted)
                    reassert = set() if digest_unchecked else renderer.unchecked - renderer.reasserted
                    todo = drifted | set(changed) | reassert
                    if drifted:
                        log.warning("rules drifted from what was written; repairing family=IPv%d "
                                    "service_ports=%d", fam, len(drifted))
                    out = renderer.render(state, todo, full=False, existing_chains=saved.chains,
                                          batch_chains=batch)
                    renderer.mark_reasserted(reassert - drifted - set(changed))
                hooks = missing_hooks(saved, C.HOOKS)
                last = out.batches.pop() if out.batches else ""
                out.batches.append(with_hooks(last, hooks))
            else:
                out = renderer.render(state, changed, full=False, batch_chains=batch)
            for i, text in enumerate(out.batches):
                if text:
                    self._restore(fam, text, renderer, partial=not full,
                                  unwritten=frozenset().union(*out.batch_ports[i:]))
            if full:
                renderer.in_sync = True
            _count(result, fam, out)
        self.metrics.written(result.written, result.totals)
        # UDP flows the changes left pointing nowhere, now that the new rules are in
        self.conntrack.submit([f for c in changes.values() for f in c.stale])
        if result.repaired:  # attempts made while the rules were gone would keep retrying clients out
            self.conntrack.submit([f for state in desired.values() for plan in state.services.values()
                                   for f in unanswered_tcp_flows(plan)])
        return result

    def _enable_route_localnet(self, renderer: IptablesRenderer) -> None:
        """NodePorts on 127.0.0.1 need route_localnet=1 (as kube-proxy sets it); when it cannot be
        set, loopback is left out of the node ports instead of DNATed into a black hole."""
        try:
            sysctl.ensure(self.ROUTE_LOCALNET, "1")
            self._route_localnet = True
            log.info("set %s=1 to serve NodePorts on 127.0.0.1; to avoid it pass "
                     "--iptables-localhost-nodeports=false or --nodeport-addresses without loopback",
                     self.ROUTE_LOCALNET)
        except OSError as exc:
            renderer.localhost_nodeports = False
            log.error("cannot set %s=1 error=%r; NodePorts are not served on 127.0.0.1 (grant a writable "
                      "/proc/sys or pass --iptables-localhost-nodeports=false)", self.ROUTE_LOCALNET, str(exc))

    def _restore(self, fam: int, text: str, renderer: IptablesRenderer, partial: bool,
                 unwritten: frozenset[ServicePortName]) -> None:
        try:
            self.untouched.before_write()
            restore(self.tools, fam, text)
            self.untouched.wrote()  # after each write, and only then: a foreign commit since stays visible
        except RestoreFailed as exc:
            # Earlier restores of this sync went in. When the kernel held what was written before,
            # the next sync rewrites only this restore's service ports and later ones (and checks
            # the rest against what it reads back), not everything; otherwise it starts over.
            self.untouched.forget()
            log.warning("restore refused; the next sync rewrites what it held family=IPv%d "
                        "service_ports=%d complete_rewrite=%s", fam, len(unwritten), not renderer.in_sync)
            renderer.refused(unwritten)
            self.metrics.failed(partial)
            raise SyncError(str(exc), partial=partial) from exc

    def render(self, desired: Mapping[int, DesiredState]) -> str:
        parts = []
        for fam in self.families:
            text = IptablesRenderer(self._localhost).render(desired[fam], (), full=True).text
            tool = "iptables-restore" if fam == 4 else "ip6tables-restore"
            parts.append(f"# IPv{fam}: input for {tool} --noflush\n{text}")
        return "".join(parts)

    def features(self) -> dict[str, str]:
        return {"iptables": self.tools.variant or "plain",
                "localhost NodePorts": "on" if self._route_localnet else "off"}

    def programmed(self, nodes: Mapping[int, NodeContext], plans: Sequence[ServicePlan]) -> Programmed:
        """Each port's own chains as iptables-save prints them, and its lines in the shared chains
        (found by their comment); a chain whose rule count differs from what is written is drift."""
        out = Programmed()
        saved: dict[tuple[int, str], list[str]] = {}
        for plan in plans:
            fam = plan.info.family
            rules = render_service(plan, nodes[fam])
            spn = str(plan.name)
            for table in {t for t in rules.chains} | {t for t, _ in DISPATCH}:
                if (fam, table) not in saved:
                    text = run([self.tools.binary(fam, "save"), "-t", table], timeout=120)
                    saved[(fam, table)] = [ln for ln in text.splitlines() if ln.startswith("-A ")]
            for table, chains in rules.chains.items():
                for name, intended in chains:
                    have = [ln for ln in saved[(fam, table)] if ln.split(" ", 2)[1] == name]
                    out.lines.append(f"{table} {name}: {len(have)} rule(s)")
                    out.lines += [f"  {ln}" for ln in have[:20]]
                    if len(have) != len(intended):
                        out.differences.append(f"IPv{fam} {table} chain {name} has {len(have)} rule(s), "
                                               f"{len(intended)} intended")
            own = [name for cs in rules.chains.values() for name, _ in cs]
            for (table, chain), intended in rules.dispatch.items():
                have = [ln for ln in saved[(fam, table)] if ln.startswith(f"-A {chain} ")
                        and (f'"{spn} ' in ln or any(ln.endswith(f"-j {c}") for c in own))]
                out.lines.append(f"{table} {chain}: {len(have)} line(s) for {spn}")
                out.lines += [f"  {ln}" for ln in have[:10]]
                if len(have) != len(intended):
                    out.differences.append(f"IPv{fam} {table} chain {chain} has {len(have)} line(s) for {spn}, "
                                           f"{len(intended)} intended")
        return out

    def cleanup(self) -> None:
        """Every KPA- chain and the jumps into them, in whichever iptables variant holds them."""
        for line in cleanup_prefix(C.PREFIX, self.families, self._tools):
            log.info("cleanup %s", line)


def _count(result: SyncResult, fam: int, out: RenderResult) -> None:
    suffix = "" if fam == 4 else "6"
    for table, n in out.per_table.items():
        result.written[table + suffix] = n
    for table, n in out.totals.items():
        result.totals[table + suffix] = n
