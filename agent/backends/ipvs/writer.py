"""The IPVS mode: frontends become IPVS virtual servers (netlink), their addresses live on a dummy
interface, and a constant handful of iptables rules match ipsets for what IPVS cannot do alone
(masquerade, hairpin, source ranges, drops). See README.md.

Memory of what was written (per frontend) makes a partial sync a diff of the frontends that changed:
one endpoint change is one or two netlink messages. A full sync reads the kernel once (one service
dump, /proc/net/ip_vs for every real server, one `ipset save`, one address dump) and repairs what
differs. Graceful termination: a TCP real server that goes away stays at weight 0 until its
connections end; a reaper thread deletes it then.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from prometheus_client import CollectorRegistry

from agent.backends.base import Programmed, SyncError, SyncResult, UnsupportedMode
from agent.backends.ipvs import render as R
from agent.backends.ipvs import takeover
from agent.backends.ipvs.ipvsnl import Ipvs
from agent.backends.ipvs.metrics import IpvsMetrics
from agent.backends.ipvs.mode import kernel_gap
from agent.backends.ipvs.servers import RealServer, ServiceKey, parse_proc_ip_vs
from agent.kernel import conntrack, ipset, sysctl
from agent.kernel.commands import CommandError, run
from agent.kernel.netlink import (
    NETLINK_ROUTE,
    NetlinkError,
    Request,
    Socket,
    address_request,
    dump_addresses,
)
from agent.kernel.xtables import (
    RestoreFailed,
    Tools,
    cleanup_prefix,
    detect_variant,
    missing_hooks,
    parse_save,
    restore,
    with_hooks,
)
from agent.model.desired import Changes, DesiredState, NodeContext, ServicePlan
from agent.model.frontends import FrontendKey, frontends_of

log = logging.getLogger("agent.ipvs")
PROC_IP_VS = Path("/proc/net/ip_vs")
GONE = (errno.ENOENT, errno.ESRCH)  # deleting what is already gone


def _family(address: str) -> int:
    return 6 if ":" in address else 4


@dataclass(slots=True)
class _Ops:
    """One sync's writes, applied in an order that never leaves traffic without a path:
    set entries and addresses first, virtual and real servers, then deletions in reverse."""

    set_adds: list[str] = field(default_factory=list)
    addr_adds: list[str] = field(default_factory=list)
    ipvs: list[Request] = field(default_factory=list)
    ipvs_deletes: list[Request] = field(default_factory=list)
    addr_dels: list[str] = field(default_factory=list)
    set_dels: list[str] = field(default_factory=list)

    def count(self) -> int:
        return (len(self.set_adds) + len(self.addr_adds) + len(self.ipvs) + len(self.ipvs_deletes)
                + len(self.addr_dels) + len(self.set_dels))


class IpvsBackend:
    name: ClassVar[str] = "ipvs"
    GRACEFUL_DUMP_MAX = 64  # virtual servers with graceful real servers read one by one, up to this many
    GRACEFUL_CHECK = 2.0  # seconds between checks of real servers waiting for their connections to end
    SYSCTLS = (
        ("net.ipv4.vs.conntrack", "1"),  # conntrack entries for IPVS connections: iptables masquerade works
        ("net.ipv4.vs.expire_nodest_conn", "1"),  # a deleted real server's connections end at their next packet
        ("net.ipv4.vs.expire_quiescent_template", "1"),  # affinity to a weight-0 real server ends
        ("net.ipv4.ip_forward", "1"),
    )
    STRICT_ARP = (("net.ipv4.conf.all.arp_ignore", "1"), ("net.ipv4.conf.all.arp_announce", "2"))

    def __init__(self, families: tuple[int, ...] = (4, 6), settings: Mapping[str, Any] | None = None,
                 registry: CollectorRegistry | None = None, tools: Tools | None = None) -> None:
        s = dict(settings or {})
        self.families = families
        self.scheduler = str(s.get("ipvs_scheduler") or "rr")
        self.strict_arp = bool(s.get("ipvs_strict_arp", False))
        self.exclude = [ipaddress.ip_network(c, strict=False) for c in s.get("ipvs_exclude_cidrs", ())]
        self.timeouts = tuple(int(s.get(k, 0) or 0) for k in ("ipvs_tcp_timeout", "ipvs_tcpfin_timeout",
                                                               "ipvs_udp_timeout"))
        self.metrics = IpvsMetrics(registry)
        self.conntrack = conntrack.Cleaner()
        self._tools = tools
        self._lock = threading.RLock()
        self._ipvs: Ipvs | None = None
        self._rt: Socket | None = None
        self._ifindex = 0
        self._known = False  # memory below matches the kernel
        self._written: dict[int, dict[FrontendKey, R.FrontendIpvs]] = {f: {} for f in families}
        self._reals: dict[ServiceKey, dict[tuple[str, int], RealServer]] = {}  # our virtual servers' real servers
        self._graceful: dict[tuple[ServiceKey, tuple[str, int]], float] = {}  # weight 0 since
        self._addr_refs: Counter[str] = Counter()
        self._entries: dict[str, Counter[str]] = {}  # set name -> entry -> frontends wanting it
        self._stop = threading.Event()
        self._reaper: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def tools(self) -> Tools:
        if self._tools is None:
            self._tools, why = detect_variant()
            log.info("iptables variant chosen variant=%s reason=%r", self._tools.variant or "plain", why)
        return self._tools

    def check_supported(self) -> None:
        gap = kernel_gap()
        if gap:
            raise UnsupportedMode(f"--proxy-mode ipvs cannot run here: {gap}. Use --proxy-mode nftables or "
                                  "--proxy-mode iptables, which need only netfilter")
        if not ipset.available():
            raise UnsupportedMode("--proxy-mode ipvs needs the ipset tool (apt-get install ipset)")
        try:
            Ipvs().close()
        except NetlinkError as exc:
            raise UnsupportedMode(f"--proxy-mode ipvs cannot reach IPVS over netlink: {exc}") from exc
        try:
            run([self.tools.binary(4, "save"), "-t", "nat"], timeout=30)
        except (CommandError, OSError) as exc:
            raise UnsupportedMode(f"--proxy-mode ipvs needs iptables with NAT for masquerading: {exc}") from exc
        module = f"ip_vs_{self.scheduler}"
        if not Path("/sys/module", module).exists():
            with contextlib.suppress(OSError):
                run(["modprobe", module], check=False, timeout=30)
            if not Path("/sys/module", module).exists():
                raise UnsupportedMode(f"--ipvs-scheduler {self.scheduler}: the kernel has no {module} module "
                                      "(load it on the host, or pick another scheduler such as rr)")

    def start(self) -> None:
        with self._lock:
            self._open()
        self._reaper = threading.Thread(target=self._reap_loop, name="ipvs-graceful", daemon=True)
        self._reaper.start()
        log.info("ipvs mode starting scheduler=%s dummy=%s; the first sync adopts what a previous run left "
                 "(weights reset to 1, leftovers removed)", self.scheduler, R.DUMMY)

    def close(self, timeout: float) -> None:
        """Everything stays in the kernel; the reaper stops (a later start() resumes the graceful
        deletions: weight-0 real servers are found again by the first full sync)."""
        self._stop.set()
        if self._reaper is not None:
            self._reaper.join(timeout)
        self.conntrack.idle(timeout)
        with self._lock:
            if self._ipvs is not None:
                self._ipvs.close()
                self._ipvs = None
            if self._rt is not None:
                self._rt.close()
                self._rt = None

    def _open(self) -> tuple[Ipvs, Socket]:
        if self._ipvs is None:
            self._ipvs = Ipvs()
        if self._rt is None:
            self._rt = Socket(NETLINK_ROUTE)
        return self._ipvs, self._rt

    def _ensure_node(self) -> None:
        """The dummy interface (left down, as kube-proxy's), sysctls, timeouts, our ipsets."""
        try:
            self._ifindex = socket.if_nametoindex(R.DUMMY)
        except OSError:
            from pyroute2 import IPRoute

            with IPRoute() as ipr:
                ipr.link("add", ifname=R.DUMMY, kind="dummy")
            self._ifindex = socket.if_nametoindex(R.DUMMY)
            log.info("created dummy interface %s for service addresses", R.DUMMY)
        wanted = list(self.SYSCTLS) + (list(self.STRICT_ARP) if self.strict_arp else [])
        if 6 in self.families:
            wanted.append(("net.ipv6.conf.all.forwarding", "1"))
        for name, value in wanted:
            try:
                if sysctl.ensure(name, value):
                    log.info("sysctl set %s=%s", name, value)
            except OSError as exc:
                log.warning("could not set sysctl %s=%s error=%r", name, value, str(exc))
        if any(self.timeouts):
            ipvs, _ = self._open()
            ipvs.set_timeouts(*self.timeouts)
        ipset.restore(line for fam in self.families for line in R.ipset_create(fam).splitlines())

    # -- sync -----------------------------------------------------------------------------------

    def sync(self, desired: Mapping[int, DesiredState], changes: Mapping[int, Changes], *, full: bool) -> SyncResult:
        with self._lock:
            did_full = full or not self._known
            try:
                ops = self._full(desired) if did_full else self._partial(desired, changes)
                self._apply(ops)
            except (NetlinkError, ipset.IpsetError, RestoreFailed, OSError) as exc:
                self._known = False
                self.metrics.failures.inc()
                if isinstance(exc, RestoreFailed):
                    self.metrics.restore_failures.inc()
                raise SyncError(f"ipvs sync failed: {exc}", partial=not full) from exc
            result = SyncResult(written={"operations": ops.count()}, totals=self._totals(),
                                detail="full" if did_full else "partial")
            self._gauges()
        self.conntrack.submit([f for c in changes.values() for f in c.stale])
        return result

    def _totals(self) -> dict[str, int]:
        return {
            "virtual_servers": len(self._reals),
            "real_servers": sum(1 for rs in self._reals.values() for r in rs.values() if r.weight),
            "graceful": len(self._graceful),
            "addresses": len(self._addr_refs),
        }

    def _gauges(self) -> None:
        t = self._totals()
        self.metrics.virtual_servers.set(t["virtual_servers"])
        self.metrics.real_servers.set(t["real_servers"])
        self.metrics.graceful.set(t["graceful"])
        self.metrics.addresses.set(t["addresses"])

    def _partial(self, desired: Mapping[int, DesiredState], changes: Mapping[int, Changes]) -> _Ops:
        ops = _Ops()
        entries_before: dict[tuple[str, str], int] = {}
        addrs_before: dict[str, int] = {}
        for fam in self.families:
            state = desired[fam]
            written = self._written[fam]
            for key in sorted(changes[fam].frontends if fam in changes else ()):
                f = state.frontends.get(key)
                new = R.render_frontend(f, state.node, self.scheduler) if f is not None else None
                old = written.get(key)
                if new == old:
                    continue
                self._refs(fam, old, new, entries_before, addrs_before)
                self._servers(old, new, ops)
                if new is None:
                    written.pop(key, None)
                else:
                    written[key] = new
        self._ref_ops(entries_before, addrs_before, ops)
        return ops

    def _refs(self, fam: int, old: R.FrontendIpvs | None, new: R.FrontendIpvs | None,
              entries_before: dict[tuple[str, str], int], addrs_before: dict[str, int]) -> None:
        for frontend, delta in ((old, -1), (new, 1)):
            if frontend is None:
                continue
            for base, entry in frontend.entries:
                name = R.set_name(base, fam)
                counts = self._entries.setdefault(name, Counter())
                entries_before.setdefault((name, entry), counts[entry])
                counts[entry] += delta
                if counts[entry] <= 0:
                    del counts[entry]
            if frontend.address is not None:
                addrs_before.setdefault(frontend.address, self._addr_refs[frontend.address])
                self._addr_refs[frontend.address] += delta
                if self._addr_refs[frontend.address] <= 0:
                    del self._addr_refs[frontend.address]

    def _ref_ops(self, entries_before: dict[tuple[str, str], int], addrs_before: dict[str, int], ops: _Ops) -> None:
        for (name, entry), before in sorted(entries_before.items()):
            after = self._entries.get(name, Counter())[entry]
            if before == 0 and after > 0:
                ops.set_adds.append(f"add {name} {entry}")
            elif before > 0 and after == 0:
                ops.set_dels.append(f"del {name} {entry}")
        for address, before in sorted(addrs_before.items()):
            after = self._addr_refs[address]
            if before == 0 and after > 0:
                ops.addr_adds.append(address)
            elif before > 0 and after == 0:
                ops.addr_dels.append(address)

    def _servers(self, old: R.FrontendIpvs | None, new: R.FrontendIpvs | None, ops: _Ops) -> None:
        """Virtual and real server requests taking one frontend from `old` to `new`, as in the kernel
        (self._reals), which is updated as if they had been applied."""
        ipvs, _ = self._open()
        if new is None:
            assert old is not None
            key = old.server.key
            ops.ipvs_deletes.append(ipvs.delete_service(key))
            self._reals.pop(key, None)
            for g in [g for g in self._graceful if g[0] == key]:
                del self._graceful[g]
            return
        key = new.server.key
        current = self._reals.get(key)
        if current is None:
            ops.ipvs.append(ipvs.add_service(new.server))
            current = self._reals[key] = {}
        elif old is None or old.server != new.server:
            ops.ipvs.append(ipvs.update_service(new.server))
        self._reals_to(key, new.reals, current, ops)

    def _reals_to(self, key: ServiceKey, wanted: Iterable[RealServer], current: dict[tuple[str, int], RealServer],
                  ops: _Ops) -> None:
        ipvs, _ = self._open()
        want = {r.key: r for r in wanted}
        for rk, r in want.items():
            have = current.get(rk)
            if have is None:
                ops.ipvs.append(ipvs.add_dest(key, r))
            elif have.weight != r.weight or not have.masquerade:
                ops.ipvs.append(ipvs.update_dest(key, r))  # back from graceful deletion, or a weight reset
            self._graceful.pop((key, rk), None)
            current[rk] = r
        for rk, have in list(current.items()):
            if rk in want:
                continue
            if key.protocol == "TCP":
                # graceful termination: no new connections; deleted once the last one ends
                if have.weight != 0:
                    gone = RealServer(have.address, have.port, weight=0)
                    ops.ipvs.append(ipvs.update_dest(key, gone))
                    current[rk] = gone
                self._graceful.setdefault((key, rk), time.monotonic())
            else:  # UDP and SCTP: at once (expire_nodest_conn moves their flows on at the next packet)
                ops.ipvs_deletes.append(ipvs.delete_dest(key, have))
                del current[rk]
                self._graceful.pop((key, rk), None)

    def _owned(self, key: ServiceKey, on_dummy: set[str], frontends_sets: set[str]) -> bool:
        """A virtual server is ours (to delete when unwanted) if its address is on our dummy
        interface, our FRONTENDS ipset lists it, or we wrote it; never inside --ipvs-exclude-cidrs."""
        addr = ipaddress.ip_address(key.address)
        if any(addr in n for n in self.exclude):
            return False
        entry = f"{key.address},{key.protocol.lower()}:{key.port}"
        return key.address in on_dummy or entry in frontends_sets or key in self._reals

    def _full(self, desired: Mapping[int, DesiredState]) -> _Ops:
        ipvs, rt = self._open()
        self._ensure_node()
        # -- read the kernel once --
        kernel_sets = ipset.members(R.PREFIX)
        on_dummy = {a.address for a in dump_addresses(rt) if a.ifindex == self._ifindex}
        services = {vs.key: vs for vs in ipvs.services()}
        reals = parse_proc_ip_vs(PROC_IP_VS.read_text())
        frontends_sets = set().union(*(kernel_sets.get(R.set_name("FRONTENDS", f), set()) for f in (4, 6)))
        owned = {k for k in services if self._owned(k, on_dummy, frontends_sets)}
        self._iptables(desired)

        # -- what should be --
        written: dict[int, dict[FrontendKey, R.FrontendIpvs]] = {}
        entries: dict[str, Counter[str]] = {}
        addr_refs: Counter[str] = Counter()
        for fam in self.families:
            state = desired[fam]
            memo = self._written.get(fam, {})
            out: dict[FrontendKey, R.FrontendIpvs] = {}
            for f in state.frontends.values():
                new = R.render_frontend(f, state.node, self.scheduler)
                old = memo.get(f.key)
                out[f.key] = old if old == new else new
                for base, entry in new.entries:
                    entries.setdefault(R.set_name(base, fam), Counter())[entry] += 1
                if new.address is not None:
                    addr_refs[new.address] += 1
            written[fam] = out

        ops = _Ops()
        # ipsets: exactly the wanted entries in each of our sets (of the families we run)
        for fam in self.families:
            for base in R.SETS:
                name = R.set_name(base, fam)
                want = set(entries.get(name, ()))
                have = kernel_sets.get(name, set())
                ops.set_adds += [f"add {name} {e}" for e in sorted(want - have)]
                ops.set_dels += [f"del {name} {e}" for e in sorted(have - want)]
        # addresses: exactly the wanted ones on the dummy interface
        wanted_addrs = {a for a in addr_refs if _family(a) in self.families}
        ops.addr_adds += sorted(wanted_addrs - on_dummy)
        ops.addr_dels += sorted(a for a in on_dummy - wanted_addrs if _family(a) in self.families)
        # virtual servers and their real servers, against what the kernel holds
        self._reals = {}
        graceful = self._graceful
        self._graceful = {}
        wanted_keys: set[ServiceKey] = set()
        for fam in self.families:
            for fr in written[fam].values():
                key = fr.server.key
                wanted_keys.add(key)
                have_vs = services.get(key)
                if have_vs is None:
                    ops.ipvs.append(ipvs.add_service(fr.server))
                    current: dict[tuple[str, int], RealServer] = {}
                else:
                    if have_vs != fr.server:
                        ops.ipvs.append(ipvs.update_service(fr.server))
                    current = {r.key: r.settings() for r in reals.get(key, ())}
                for rk in current:
                    if (key, rk) in graceful:
                        self._graceful[(key, rk)] = graceful[(key, rk)]
                self._reals_to(key, fr.reals, current, ops)
                self._reals[key] = current
        for key in sorted(owned - wanted_keys):
            if _family(key.address) in self.families:
                ops.ipvs_deletes.append(ipvs.delete_service(key))
        self._written = written
        self._entries = entries
        self._addr_refs = addr_refs
        self._known = True
        return ops

    def _iptables(self, desired: Mapping[int, DesiredState]) -> None:
        """Our chains, rewritten whole (a constant handful of rules), plus any missing jump into
        them; leftover KPAV- chains of an older release deleted."""
        for fam in self.families:
            saved = parse_save(run([self.tools.binary(fam, "save")], timeout=120), R.PREFIX)
            text = R.base_rules(desired[fam].node)
            wanted = {c for cs in R.CHAINS.values() for c in cs}
            leftovers: dict[str, list[str]] = {}
            for table, chains in saved.chains.items():
                leftovers[table] = sorted(chains - wanted)
            if any(leftovers.values()):  # chains of ours no release makes any more: flush, then delete
                lines: list[str] = []
                table = ""
                for line in text.splitlines():
                    if line.startswith("*"):
                        table = line[1:]
                        lines.append(line)
                        lines += [f":{c} - [0:0]" for c in leftovers.get(table, [])]
                        continue
                    if line == "COMMIT":
                        lines += [f"-X {c}" for c in leftovers.get(table, [])]
                    lines.append(line)
                text = "\n".join(lines) + "\n"
            restore(self.tools, fam, with_hooks(text, missing_hooks(saved, R.HOOKS)))

    def _apply(self, ops: _Ops) -> None:
        ipvs, rt = self._open()
        if ops.set_adds:
            ipset.change(ops.set_adds)
        if ops.addr_adds:
            self._check(rt.apply([address_request(True, self._ifindex, a) for a in ops.addr_adds]), ignore=(
                errno.EEXIST,))
        if ops.ipvs:
            errors = ipvs.apply(ops.ipvs)
            retry = []
            for exc in errors:
                if exc.errno == errno.EEXIST:  # already there (another writer, or a half-failed sync): update
                    retry.append(exc)
            self._check([e for e in errors if e not in retry])
            if retry:
                log.info("ipvs: %d objects already existed; updated instead", len(retry))
                by_what = {r.what: r for r in ops.ipvs}
                updates = [_as_update(ipvs, by_what[e.what]) for e in retry if e.what in by_what]
                self._check(ipvs.apply([u for u in updates if u is not None]))
        if ops.ipvs_deletes:
            self._check(ipvs.apply(ops.ipvs_deletes), ignore=GONE)
        if ops.addr_dels:
            self._check(rt.apply([address_request(False, self._ifindex, a) for a in ops.addr_dels]),
                        ignore=(errno.EADDRNOTAVAIL, errno.ENOENT))
        if ops.set_dels:
            ipset.change(ops.set_dels)

    @staticmethod
    def _check(errors: list[NetlinkError], ignore: tuple[int, ...] = ()) -> None:
        bad = [e for e in errors if e.errno not in ignore]
        if bad:
            more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
            raise NetlinkError(bad[0].errno or errno.EIO, f"{bad[0].what}{more}")

    # -- graceful termination -------------------------------------------------------------------

    def _reap_loop(self) -> None:
        while not self._stop.wait(self.GRACEFUL_CHECK):
            try:
                self.reap()
            except (OSError, NetlinkError) as exc:
                log.warning("graceful deletion check failed error=%r", str(exc))

    def reap(self) -> int:
        """Delete real servers at weight 0 whose connections have all ended; returns how many."""
        with self._lock:
            if not self._graceful or self._ipvs is None:
                return 0
            ipvs = self._ipvs
            table = self._graceful_table(ipvs)
            requests = []
            for key, rk in list(self._graceful):
                rs = next((r for r in table.get(key, ()) if r.key == rk), None)
                if rs is None:
                    del self._graceful[(key, rk)]
                    self._reals.get(key, {}).pop(rk, None)
                elif rs.weight == 0 and rs.active + rs.inactive == 0:
                    requests.append(ipvs.delete_dest(key, rs))
                    del self._graceful[(key, rk)]
                    self._reals.get(key, {}).pop(rk, None)
            if requests:
                self._check(ipvs.apply(requests), ignore=GONE)
                log.info("graceful deletion done real_servers=%d", len(requests))
            self._gauges()
            return len(requests)

    def _graceful_table(self, ipvs: Ipvs) -> Mapping[ServiceKey, Sequence[RealServer]]:
        """The real servers (with connection counts) of the virtual servers holding graceful ones:
        one dump each when they are few, else all of /proc/net/ip_vs at once (every 2 s, reading
        100k real servers for one would cost more than the sync that made it)."""
        keys = {key for key, _ in self._graceful}
        if len(keys) > self.GRACEFUL_DUMP_MAX:
            return parse_proc_ip_vs(PROC_IP_VS.read_text())
        table: dict[ServiceKey, Sequence[RealServer]] = {}
        for key in keys:
            try:
                table[key] = ipvs.dests(key)
            except NetlinkError as exc:
                if exc.errno not in GONE:
                    raise
                table[key] = ()
        return table

    # -- render and cleanup ---------------------------------------------------------------------

    def render(self, desired: Mapping[int, DesiredState]) -> str:
        return R.render(desired, self.families, self.scheduler)

    def features(self) -> dict[str, str]:
        return {"ipvs": "netlink", "iptables": self.tools.variant or "plain"}

    def programmed(self, nodes: Mapping[int, NodeContext], plans: Sequence[ServicePlan]) -> Programmed:
        """The virtual server of each cluster, external and load-balancer IP frontend and its real
        servers with their connection counts, read over netlink; a missing virtual server or a real
        server set that differs from the endpoints (weight-0 servers draining aside) is drift."""
        out = Programmed()
        ipvs = Ipvs()
        try:
            held = {vs.key: vs for vs in ipvs.services()}
            for plan in plans:
                for f in frontends_of(plan, ()):
                    key = ServiceKey(f.key.protocol, f.key.address, f.key.port)
                    vs = held.get(key)
                    if vs is None:
                        out.lines.append(f"{f.kind} virtual server {key}: missing")
                        out.differences.append(f"no virtual server {key}")
                        continue
                    dests = ipvs.dests(key)
                    out.lines.append(f"{f.kind} virtual server {key} scheduler {vs.scheduler}"
                                     + (f" persistent {vs.timeout}s" if vs.timeout else ""))
                    out.lines += [f"  -> {d.address}:{d.port} weight {d.weight} active {d.active} "
                                  f"inactive {d.inactive}" for d in dests]
                    live = {(d.address, d.port) for d in dests if d.weight > 0}
                    want = {(e.ip, e.port) for e in f.endpoints}
                    if live != want:
                        out.differences.append(f"virtual server {key} has real servers "
                                               f"{sorted(live)}, intended {sorted(want)}")
        finally:
            ipvs.close()
        return out

    def serves_virtual_server(self, key: ServiceKey) -> bool:
        """Whether this run wrote (or adopted) the virtual server: a takeover from kube-proxy
        keeps it."""
        return key in self._reals

    def cleanup(self) -> None:
        """Our chains (KPAV-), our virtual servers (on the dummy interface or listed in our FRONTENDS
        ipset), the dummy interface, our ipsets. Nothing else."""
        for line in cleanup_prefix(R.PREFIX, self.families):
            log.info("cleanup %s", line)
        sets = ipset.members(R.PREFIX) if ipset.available() else {}
        try:
            ifindex = socket.if_nametoindex(R.DUMMY)
        except OSError:
            ifindex = 0
        if PROC_IP_VS.exists():
            with Socket(NETLINK_ROUTE) as rt:
                on_dummy = {a.address for a in dump_addresses(rt) if ifindex and a.ifindex == ifindex}
            frontends = set().union(*(sets.get(R.set_name("FRONTENDS", f), set()) for f in (4, 6)))
            # back to kube-proxy: what it serves now (the same addresses on its kube-ipvs0, its
            # NodePorts) stays, though our dummy or ipset lists it too
            kube_proxy = takeover.read()
            ipvs = Ipvs()
            try:
                doomed = [vs.key for vs in ipvs.services()
                          if self._owned(vs.key, on_dummy, frontends) and not kube_proxy.owns(vs.key)]
                self._check(ipvs.apply([ipvs.delete_service(k) for k in doomed]), ignore=GONE)
                log.info("cleanup removed virtual_servers=%d", len(doomed))
            finally:
                ipvs.close()
        if ifindex:
            from pyroute2 import IPRoute

            with IPRoute() as ipr:
                ipr.link("del", index=ifindex)
            log.info("cleanup removed interface %s", R.DUMMY)
        if sets:
            ipset.destroy(sorted(sets))
            log.info("cleanup removed ipsets=%d", len(sets))
        with self._lock:
            self._known = False
            self._reals.clear()
            self._graceful.clear()


def _as_update(ipvs: Ipvs, r: Request) -> Request | None:
    """The update for an add that found its object there already."""
    from agent.backends.ipvs import ipvsnl

    cmd = r.payload[0]
    if cmd not in (ipvsnl.CMD_NEW_SERVICE, ipvsnl.CMD_NEW_DEST):
        return None
    new_cmd = ipvsnl.CMD_SET_SERVICE if cmd == ipvsnl.CMD_NEW_SERVICE else ipvsnl.CMD_SET_DEST
    return Request(r.type, bytes([new_cmd]) + r.payload[1:], r.what.replace("add ", "update ", 1), r.flags)

