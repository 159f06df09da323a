"""The nftables mode: renders with render.py and loads each sync as one nft transaction.

Writes go through libnftables in process (Debian's python3-nftables); only when that binding is
missing does the mode run `nft -f -`. Input is handed to libnftables as a file (a memfd) rather
than a string, because nft 1.0 reports errors in string input against the wrong line.
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Protocol

from prometheus_client import CollectorRegistry

from agent.backends.base import Programmed, SyncError, SyncResult, UnsupportedMode
from agent.backends.nftables import names as N
from agent.backends.nftables.elements import element_writes
from agent.backends.nftables.metrics import NftablesMetrics
from agent.backends.nftables.render import Existing, NftRenderer, RenderResult, render_service
from agent.kernel import conntrack, heap, nfgen, nftelements
from agent.kernel.commands import CommandError, have, run
from agent.model.desired import Changes, DesiredState, NodeContext, ServicePlan
from agent.model.state import unanswered_tcp_flows

log = logging.getLogger("agent.nftables")
_ERROR_AT = re.compile(r"^\S*?:(\d+):\d+(?:-\d+)?: Error: (.*)$", re.MULTILINE)


class Nft(Protocol):
    """Runs nft input: one call is one transaction."""

    name: str

    def run(self, text: str) -> tuple[int, str, str]:
        """Load `text` (nft -f syntax); return (rc, stdout, stderr)."""

    def list_json(self, what: str) -> Any:
        """`nft -j -t list <what>`, decoded."""

    def release(self) -> None:
        """Free what the writer keeps between transactions (libnftables' cache of the table)."""


class LibNft:
    """libnftables through its Python binding, in process."""

    name = "libnftables"

    def __init__(self) -> None:
        import nftables

        self._nft = nftables.Nftables()

    CHUNK = 1 << 20

    def run(self, text: str) -> tuple[int, str, str]:
        fd = os.memfd_create("kube-proxy-agent.nft", os.MFD_CLOEXEC)
        try:
            with open(fd, "wb", closefd=False) as f:  # encoded a chunk at a time: no second copy
                for i in range(0, len(text), self.CHUNK):
                    f.write(text[i:i + self.CHUNK].encode())
            rc, out, err = self._nft.cmd_from_file(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        return int(rc), str(out), str(err)

    def release(self) -> None:
        """A fresh context: the old one's cache held a copy of every chain and rule of the last
        big transaction (about 80 MB at 10k Services) until the next command."""
        import nftables

        self._nft = nftables.Nftables()

    def list_json(self, what: str) -> Any:
        self._nft.set_json_output(True)
        self._nft.set_terse_output(True)
        try:
            rc, out, err = self._nft.cmd(f"list {what}")
        finally:
            self._nft.set_json_output(False)
            self._nft.set_terse_output(False)
        if rc != 0:
            raise CommandError(["nft", "list", what], int(rc), str(err))
        return json.loads(out) if out else {}


class NftCommand:
    """The `nft` binary, for hosts without the Python binding."""

    name = "nft"

    def __init__(self, binary: str = "nft") -> None:
        self.binary = binary

    def run(self, text: str) -> tuple[int, str, str]:
        try:
            return 0, run([self.binary, "-f", "-"], stdin=text, timeout=300), ""
        except CommandError as exc:
            return exc.code or 1, "", exc.stderr

    def list_json(self, what: str) -> Any:
        out = run([self.binary, "-j", "-t", "list", *what.split()], timeout=120)
        return json.loads(out) if out else {}

    def release(self) -> None:
        """Nothing kept: each call is its own process."""


def detect_nft() -> Nft | None:
    """The binding if importable and loadable, else the nft binary, else None."""
    try:
        return LibNft()
    except (ImportError, OSError) as exc:
        if have("nft"):
            log.info("python nftables binding unavailable (%s); falling back to running `nft -f -`", exc)
            return NftCommand()
        return None


def offending(text: str, stderr: str) -> tuple[str, str]:
    """The first error nft reported and the input line it names."""
    m = _ERROR_AT.search(stderr)
    if not m:
        first = next((ln for ln in stderr.splitlines() if ln.strip()), "")
        return first, ""
    lines = text.splitlines()
    n = int(m.group(1))
    if not 0 < n <= len(lines):
        return m.group(2), ""
    line = lines[n - 1]
    if line.startswith("\t"):  # one element of a multi-line element block: name the block too
        head = next((lines[i] for i in range(n - 2, -1, -1) if not lines[i].startswith("\t")), "")
        line = f"{head} {line.strip().rstrip(',')} }}"
    return m.group(2), line.strip()


def _listed(data: Any, kind: str) -> dict[str, set[str]]:
    """family -> names of our table's chains (or sets) from `nft -j list chains|sets`."""
    out: dict[str, set[str]] = {}
    for item in data.get("nftables", []) if isinstance(data, dict) else []:
        obj = item.get(kind) if isinstance(item, dict) else None
        if isinstance(obj, dict) and obj.get("table") == N.TABLE:
            out.setdefault(str(obj.get("family")), set()).add(str(obj.get("name")))
    return out


def probe_text(family: int) -> str:
    """A scratch table using each kind of statement the mode relies on."""
    ip = N.family_keyword(family)
    t = f"{ip} {N.PROBE_TABLE}"
    addr = "10.0.0.1" if family == 4 else "fd00::1"
    dest = "10.0.0.1:80" if family == 4 else "[fd00::1]:80"
    addr_t = "ipv4_addr" if family == 4 else "ipv6_addr"
    return "\n".join(
        [
            f"add table {t}",
            f"add map {t} m {{ type {addr_t} . inet_proto . inet_service : verdict ; }}",
            f"add set {t} h {{ type {addr_t} . {addr_t} ; }}",
            f"add map {t} e {{ typeof numgen random mod 1 : {ip} daddr ; }}",
            f"add set {t} a {{ typeof {ip} saddr ; flags dynamic,timeout ; timeout 10s ; }}",
            f"add chain {t} svc",
            f"add rule {t} svc {ip} saddr @a meta l4proto tcp update @a {{ {ip} saddr }} dnat to {dest}",
            f"add rule {t} svc numgen random mod 2 == 0 meta l4proto tcp dnat to {dest}",
            f"add rule {t} svc meta l4proto udp dnat {ip} to numgen random mod 2 offset 4 map @e : 80",
            f"add element {t} e {{ 4 : {addr}, 5 : {addr} }}",
            f"add element {t} m {{ {addr} . tcp . 80 : jump svc }}",
            f"add chain {t} nat {{ type nat hook prerouting priority -100 ; }}",
            f"add rule {t} nat {ip} daddr != {addr} fib daddr type local tcp dport 1 accept",
            f"add rule {t} nat {ip} daddr . meta l4proto . th dport vmap @m",
            f"add chain {t} post {{ type nat hook postrouting priority 100 ; }}",
            f"add rule {t} post meta mark & 0x4000 == 0x4000 masquerade fully-random",
            f"add chain {t} filter {{ type filter hook forward priority 0 ; }}",
            f"add rule {t} filter ct state new ct status dnat {ip} saddr . {ip} daddr @h accept",
            f"add rule {t} filter ct state new fib daddr type local tcp dport 1 reject",
        ]
    ) + "\n"


class NftablesBackend:
    name: ClassVar[str] = "nftables"
    TRIM_AFTER = 1 << 20  # transaction text size (bytes) after which the C heap is trimmed

    def __init__(self, nft: Nft | None = None, families: tuple[int, ...] = (4, 6),
                 registry: CollectorRegistry | None = None, netlink_elements: bool | None = None) -> None:
        self._nft = nft
        self._detected = nft is not None
        # endpoint-only changes written over netlink (agent.kernel.nftelements), not through nft;
        # by default only with the detected writer (a writer handed in sees every transaction)
        self.netlink_elements = nft is None if netlink_elements is None else netlink_elements
        self.families = families
        self._renderers = {f: NftRenderer(f) for f in families}
        self.metrics = NftablesMetrics(registry)
        self.conntrack = conntrack.Cleaner()
        self.untouched = nfgen.Untouched()

    @property
    def nft(self) -> Nft | None:
        if not self._detected:
            self._nft = detect_nft()
            self._detected = True
        return self._nft

    def _require(self) -> Nft:
        nft = self.nft
        if nft is None:
            raise UnsupportedMode(
                "nftables mode needs libnftables or the nft binary: install python3-nftables "
                "(apt-get install python3-nftables) or nftables; or use --proxy-mode iptables"
            )
        return nft

    def check_supported(self) -> None:
        nft = self._require()
        for fam in self.families:
            rc, _, err = nft.run(probe_text(fam))
            probe = f"{N.family_keyword(fam)} {N.PROBE_TABLE}"
            nft.run(f"add table {probe}\ndelete table {probe}\n")
            if rc != 0:
                what, _ = offending(probe_text(fam), err)
                raise UnsupportedMode(
                    f"the kernel refused a scratch nftables table for IPv{fam} ({what or err.strip()}): "
                    "nftables mode needs nf_tables with nat, fib, numgen and reject support and "
                    "CAP_NET_ADMIN; try --proxy-mode iptables"
                )

    def start(self) -> None:
        """Nothing to load: the first sync is full and replaces what a previous run left in our
        tables in one transaction (flush and refill), so packets never see an empty table."""
        log.info("nftables mode starting writer=%s; the first sync replaces table %s in one transaction",
                 self._require().name, N.TABLE)

    def close(self, timeout: float) -> None:
        """The tables stay in the kernel; only the conntrack cleanup still queued is waited for."""
        self.conntrack.idle(timeout)

    def _existing(self, nft: Nft) -> dict[int, Existing]:
        """Our chains and sets as the kernel has them, per family (empty when unreadable)."""
        try:
            chains = _listed(nft.list_json("chains"), "chain")
            sets = _listed(nft.list_json("sets"), "set")
            maps = _listed(nft.list_json("maps"), "map")
        except (CommandError, ValueError) as exc:
            log.warning("could not list nftables chains; leftovers stay until the next full sync: %s", exc)
            return {}
        out: dict[int, Existing] = {}
        for fam in self.families:
            kw = N.family_keyword(fam)
            out[fam] = Existing(
                frozenset(chains.get(kw, set())), frozenset(sets.get(kw, set())), frozenset(maps.get(kw, set()))
            )
        return out

    def sync(self, desired: Mapping[int, DesiredState], changes: Mapping[int, Changes], *, full: bool) -> SyncResult:
        nft = self._require()
        result = SyncResult()
        unknown = [f for f in self.families if not self._renderers[f].known]
        # A periodic sync while nobody has committed to nf_tables since our last write (the
        # ruleset generation is unchanged) has nothing to check: it writes the pending changes only.
        quiet = full and not unknown and self.untouched.holds()
        full = full and not quiet
        # A full sync lists our chains and sets (names only): after a restart or failure to delete
        # leftovers; periodically to find what is missing (see NftRenderer._periodic).
        existing = self._existing(nft) if unknown or full else {}
        texts: list[str] = []
        outs: dict[int, RenderResult] = {}
        for fam in self.families:
            renderer = self._renderers[fam]
            changed = changes[fam].ports if fam in changes else frozenset()
            out = renderer.render(desired[fam], changed, full=full, existing=existing.get(fam))
            if out.missing:
                result.repaired += len(out.missing)
                log.warning("rules drifted from what was written; repairing family=IPv%d rewrite=%s missing=%s",
                            fam, "table" if out.full else "service ports", ",".join(out.missing[:10])
                            + (f",...({len(out.missing)})" if len(out.missing) > 10 else ""))
            outs[fam] = out
            texts.append(out.text)
        text = "".join(texts)
        via = nft.name
        if text and self._elements_by_netlink(outs):
            text, via = "", "netlink"
            self.untouched.wrote()
        if text:
            self.untouched.before_write()
            rc, _, err = nft.run(text)
            if len(text) > self.TRIM_AFTER:
                nft.release()
                heap.trim()  # libnftables freed what parsing a big transaction took: give it back
            if rc != 0:
                self.untouched.forget()
                for fam in self.families:
                    self._renderers[fam].reset(full=outs[fam].full)
                what, line = offending(text, err)
                self.metrics.failed()
                raise SyncError(
                    f"nft transaction failed ({nft.name}): {what or err.strip() or 'exit ' + str(rc)}"
                    + (f"; offending statement: {line}" if line else ""),
                    partial=not full,
                )
            self.untouched.wrote()  # after our write, and only then: a foreign commit since stays visible
        for fam, out in outs.items():
            suffix = "" if fam == 4 else "6"
            for key, n in out.written.items():
                result.written[key + suffix] = n
            for key, n in out.totals.items():
                result.totals[key + suffix] = n
        kinds = {fam: "full" if out.full else f"check(reasserted={out.reasserted})" if full
                 else "unchanged" if quiet else "partial" for fam, out in outs.items()}
        result.detail = " ".join(f"IPv{fam}={k}" for fam, k in kinds.items())
        if via == "netlink":
            result.detail += " writer=netlink"
        self.metrics.written(result.totals)
        # UDP flows the changes left pointing nowhere, now that the new rules are in
        self.conntrack.submit([f for c in changes.values() for f in c.stale])
        # A check ran (someone else committed to nf_tables since our last write, or at start): the
        # fixed chains were rewritten whether or not that commit had flushed them, so attempts
        # made while rules were gone, never DNATed, would keep retrying clients out; drop those.
        if full or result.repaired:
            self.conntrack.submit([f for state in desired.values() for plan in state.services.values()
                                   for f in unanswered_tcp_flows(plan)])
        return result

    def _elements_by_netlink(self, outs: Mapping[int, RenderResult]) -> bool:
        """Write a partial sync that only changes endpoint elements over netlink, in one
        transaction; False (nothing written) when it is not such a sync or the kernel refused it:
        the caller then loads the same changes as nft text, whose error names the statement."""
        if not self.netlink_elements or any(o.elements is None for o in outs.values() if o.text):
            return False
        try:
            writes = [w for fam, o in outs.items() if o.text and o.elements for w in element_writes(fam, o.elements)]
            self.untouched.before_write()
            nftelements.commit(writes)
        except nftelements.BatchTooBig:
            return False
        except (OSError, ValueError, struct.error) as exc:
            log.warning("nftables element write over netlink failed; writing the same changes with nft: %s", exc)
            return False
        return True

    def render(self, desired: Mapping[int, DesiredState]) -> str:
        parts = []
        for fam in self.families:
            text = NftRenderer(fam).render(desired[fam], (), full=True).text
            parts.append(f"# IPv{fam}: input for nft -f\n{text}")
        return "".join(parts)

    def features(self) -> dict[str, str]:
        nft = self.nft
        out = {"writer": nft.name if nft is not None else "none"}
        if self.netlink_elements:
            out["endpoint-changes"] = "netlink"
        return out

    MAX_CHAINS_READ = 200  # explain of a Service with thousands of ports: the first ones' chains

    def programmed(self, nodes: Mapping[int, NodeContext], plans: Sequence[ServicePlan]) -> Programmed:
        """Each port's chains (rule counts, from `nft list chain`) and map elements (`nft get
        element`), read with the nft binary (the sync thread owns the libnftables context); a
        missing chain or element, or a rule count that differs, is drift."""
        out = Programmed()
        nft = NftCommand()
        elements: dict[tuple[int, str], list[tuple[str, str]]] = {}  # (family, map) -> [(key, verdict)]
        chains_read = 0
        for plan in plans:
            fam = plan.info.family
            t = N.table_ref(fam)
            renderer = self._renderers.get(fam)
            # the sync's own rendering when it has one: it knows the endpoint map numbers written
            written = renderer.rendered(plan.info.name) if renderer is not None else None
            s = written if written is not None and written.plan == plan else render_service(plan, nodes[fam])
            for name, intended in s.chains:
                chains_read += 1
                if chains_read > self.MAX_CHAINS_READ:
                    continue
                try:
                    listed = nft.list_json(f"chain {t} {name}")
                    rules = [e["rule"] for e in listed.get("nftables", []) if "rule" in e]
                except (CommandError, ValueError):
                    out.lines.append(f"chain {name}: missing")
                    out.differences.append(f"IPv{fam} chain {name} is missing")
                    continue
                out.lines.append(f"chain {name}: {len(rules)} rule(s)")
                if len(rules) != len(intended):
                    out.differences.append(f"IPv{fam} chain {name} has {len(rules)} rule(s), {len(intended)} intended")
            for mapname, key, verdict, _ in s.elements:
                elements.setdefault((fam, mapname), []).append((key, verdict))
        if chains_read > self.MAX_CHAINS_READ:
            out.lines.append(f"... {chains_read - self.MAX_CHAINS_READ} more chain(s) not read back (one `nft list "
                             f"chain` each; the periodic sync checks them all)")
        for (fam, mapname), items in elements.items():
            found = self._elements_present(nft.binary, N.table_ref(fam), mapname, [k for k, _ in items])
            for key, verdict in items:
                if key in found:
                    out.lines.append(f"{mapname}: {key}{' : ' + verdict if verdict else ''}")
                else:
                    out.lines.append(f"{mapname}: {key} missing")
                    out.differences.append(f"IPv{fam} {mapname} has no element {key}")
        return out

    @staticmethod
    def _elements_present(binary: str, table: str, mapname: str, keys: list[str]) -> set[str]:
        """Which of `keys` the map holds: one `nft get element` per 100 keys (a Service with
        thousands of ports is read in a few calls; nft 1.0.6 crashes on about 130 keys or more),
        halving a call that fails until the missing keys are found."""
        def get(ks: list[str]) -> bool:
            try:
                run([binary, "get", "element", *table.split(), mapname, "{", ", ".join(ks), "}"], timeout=60)
                return True
            except CommandError:
                return False

        def present(ks: list[str]) -> set[str]:
            if get(ks):
                return set(ks)
            if len(ks) == 1:
                return set()
            half = len(ks) // 2
            return present(ks[:half]) | present(ks[half:])
        return set().union(*(present(keys[i:i + 100]) for i in range(0, len(keys), 100)))

    def cleanup(self) -> None:
        nft = self.nft
        if nft is None:
            log.info("cleanup: neither libnftables nor nft is available; nothing to remove")
            return
        # Which of our tables exist, from a netlink dump of table objects. Not `nft list tables`:
        # with a big iptables-nft ruleset in the kernel (our iptables mode at 10k Services, before
        # a mode switch) nft 1.0 dumped every rule for it, 2.5 minutes of kernel time. Unreadable:
        # delete blind (add+delete is a no-op for a missing table).
        present = nfgen.tables()
        lines = []
        for kw in ("ip", "ip6"):
            for table in (N.TABLE, N.PROBE_TABLE):
                if present is None or (kw, table) in present:
                    lines += [f"add table {kw} {table}", f"delete table {kw} {table}"]
        if not lines:
            return
        rc, _, err = nft.run("\n".join(lines) + "\n")
        if rc != 0:
            self.metrics.cleanup_failures.inc()
            raise SyncError(f"nftables cleanup failed: {err.strip()}")
        for r in self._renderers.values():
            r.reset(full=False)
        log.info("cleanup: no table %s left (ip, ip6)", N.TABLE)
