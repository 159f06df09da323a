"""The iptables mode: renders with render.py and writes with iptables-restore --noflush."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import ClassVar

from agent.backends.base import SyncError, SyncResult, UnsupportedMode
from agent.backends.iptables import chains as C
from agent.backends.iptables.render import IptablesRenderer, RenderResult
from agent.kernel.commands import CommandError, have, run
from agent.kernel.xtables import SavedTables, Tools, detect_variant, parse_save
from agent.model.desired import ChangedPorts, DesiredState

log = logging.getLogger("agent.iptables")
_LINE = re.compile(r"line (\d+)")


def hook_rule(builtin: str, chain: str, extra: str) -> str:
    match = f"{extra} " if extra else ""
    return f"-A {builtin} {match}-m comment --comment kube-proxy-agent -j {chain}"


def _offending(text: str, stderr: str) -> str:
    m = _LINE.search(stderr)
    if not m:
        return ""
    lines = text.splitlines()
    n = int(m.group(1))
    return lines[n - 1] if 0 < n <= len(lines) else ""


class IptablesBackend:
    name: ClassVar[str] = "iptables"
    BATCH_CHAINS = 2000

    def __init__(self, tools: Tools | None = None, families: tuple[int, ...] = (4, 6)) -> None:
        self._tools = tools
        self.families = families
        self._renderers = {f: IptablesRenderer() for f in families}

    @property
    def tools(self) -> Tools:
        if self._tools is None:
            self._tools, why = detect_variant()
            log.info("iptables variant chosen variant=%s reason=%r", self._tools.variant or "plain", why)
        return self._tools

    def check_supported(self) -> None:
        missing = [b for b in (self.tools.binary(4, "restore"), self.tools.binary(4, "save")) if not have(b)]
        if missing:
            raise UnsupportedMode(
                f"iptables mode needs {', '.join(missing)}: install the iptables package "
                "(apt-get install iptables), or use --proxy-mode nftables"
            )
        try:
            run([self.tools.binary(4, "save"), "-t", "nat"], timeout=30)
        except CommandError as exc:
            raise UnsupportedMode(
                f"iptables mode cannot read the nat table ({exc.stderr}); the kernel lacks "
                "iptables NAT support (or the agent lacks CAP_NET_ADMIN); try --proxy-mode nftables"
            ) from exc

    def _saved(self, family: int) -> SavedTables:
        return parse_save(run([self.tools.binary(family, "save")], timeout=120), C.PREFIX)

    @staticmethod
    def _missing_hooks(saved: SavedTables) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for table, builtin, chain, extra in C.HOOKS:
            present = any(
                h.startswith(f"-A {builtin} ") and h.endswith(f"-j {chain}") and extra in h
                for h in saved.hooks.get(table, [])
            )
            if not present:
                rule = hook_rule(builtin, chain, extra)
                out.setdefault(table, []).append("-I" + rule[2:])
        return out

    def sync(
        self, desired: Mapping[int, DesiredState], changed: Mapping[int, ChangedPorts], *, full: bool
    ) -> SyncResult:
        result = SyncResult()
        for fam in self.families:
            state = desired[fam]
            renderer = self._renderers[fam]
            # iptables-nft-restore slows down quadratically with the chains in one input, so the
            # nft variant gets service chains in batches; legacy rewrites its whole table per
            # call, so it gets one input.
            batch = 0 if self.tools.variant == "legacy" else self.BATCH_CHAINS
            if full:
                # A periodic full sync first compares the kernel with what was written and rewrites
                # only what differs (a chain flushed or deleted by hand, a missing jump); a complete
                # rewrite happens at start-up, after a failure, or when a base chain drifted.
                saved = self._saved(fam)
                drifted = renderer.drift(saved.rules, saved.digests)
                saved.digests.clear()  # not needed past the check: free it before rendering
                if drifted is None:
                    out = renderer.render(state, (), full=True, existing_chains=saved.chains,
                                          batch_chains=batch)
                else:
                    todo = drifted | set(changed.get(fam, frozenset()))
                    if drifted:
                        log.warning("rules drifted from what was written; repairing family=IPv%d "
                                    "service_ports=%d", fam, len(drifted))
                    out = renderer.render(state, todo, full=False, existing_chains=saved.chains,
                                          batch_chains=batch)
                hooks = self._missing_hooks(saved)
                last = out.batches.pop() if out.batches else ""
                out.batches.append(_with_hooks(last, hooks))
            else:
                out = renderer.render(state, changed.get(fam, frozenset()), full=False, batch_chains=batch)
            for text in out.batches:
                if text:
                    self._restore(fam, text, renderer, partial=not full)
            if full:
                renderer.in_sync = True
            _count(result, fam, out)
        return result

    def _restore(self, fam: int, text: str, renderer: IptablesRenderer, partial: bool) -> None:
        argv = [self.tools.binary(fam, "restore"), "-w", "5", "--noflush"]
        try:
            run(argv, stdin=text, timeout=300)
        except CommandError as exc:
            renderer.reset()
            bad = _offending(text, exc.stderr)
            raise SyncError(
                f"{argv[0]} failed: {exc.stderr or 'exit ' + str(exc.code)}"
                + (f"; offending line: {bad}" if bad else ""),
                kind="restore",
                partial=partial,
            ) from exc

    def render(self, desired: Mapping[int, DesiredState]) -> str:
        parts = []
        for fam in self.families:
            text = IptablesRenderer().render(desired[fam], (), full=True).text
            tool = "iptables-restore" if fam == 4 else "ip6tables-restore"
            parts.append(f"# IPv{fam}: input for {tool} --noflush\n{text}")
        return "".join(parts)

    def cleanup(self) -> None:
        variants = [self._tools] if self._tools is not None else [Tools(v) for v in ("nft", "legacy")]
        for tools in variants:
            for fam in self.families:
                save = tools.binary(fam, "save")
                if not have(save):
                    continue
                try:
                    saved = parse_save(run([save], timeout=120), C.PREFIX)
                except CommandError as exc:
                    log.warning("cleanup could not read rules tool=%s error=%r", save, exc.stderr)
                    continue
                text = cleanup_text(saved)
                if text:
                    run([tools.binary(fam, "restore"), "-w", "5", "--noflush"], stdin=text, timeout=300)
                    log.info("cleanup removed rules tool=%s family=IPv%d", save, fam)


def _count(result: SyncResult, fam: int, out: RenderResult) -> None:
    suffix = "" if fam == 4 else "6"
    for table, n in out.per_table.items():
        result.written[table + suffix] = n
    for table, n in out.totals.items():
        result.totals[table + suffix] = n


def _with_hooks(text: str, hooks: Mapping[str, list[str]]) -> str:
    """Insert missing jump rules into each table's block, after our chains are declared."""
    if not hooks:
        return text
    lines = text.splitlines()
    out: list[str] = []
    table = ""
    seen: set[str] = set()
    for line in lines:
        if line.startswith("*"):
            table = line[1:]
            seen.add(table)
        if line == "COMMIT":
            out.extend(hooks.get(table, []))
        out.append(line)
    for table, rules in hooks.items():
        if table not in seen:
            out += [f"*{table}", *rules, "COMMIT"]
    return "\n".join(out) + "\n"


def cleanup_text(saved: SavedTables) -> str:
    out: list[str] = []
    for table in sorted(set(saved.chains) | set(saved.hooks)):
        hooks = saved.hooks.get(table, [])
        ours = sorted(saved.chains.get(table, set()))
        if not hooks and not ours:
            continue
        out.append(f"*{table}")
        out.extend(f":{c} - [0:0]" for c in ours)
        out.extend("-D" + h[2:] for h in hooks)
        out.extend(f"-X {c}" for c in ours)
        out.append("COMMIT")
    return "\n".join(out) + "\n" if out else ""
