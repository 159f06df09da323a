"""The eBPF mode: lb.c compiled by bcc, its maps pinned in bpffs, socket hooks on a cgroup v2 and tc
programs on the node's interfaces. See README.md.

Lifecycle: start() compiles and loads (maps pinned under a versioned path: a restart with the same
layout reuses them, full). The first sync fills the maps, then attaches the programs and only then
detaches those of a previous run, so there is never a moment without a datapath. Programs stay
attached and pinned after the agent exits.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import struct
import subprocess
import sys
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from prometheus_client import CollectorRegistry

from agent.backends.base import Programmed, SyncError, SyncResult, UnsupportedMode
from agent.backends.ebpf import host
from agent.backends.ebpf import layout as L
from agent.backends.ebpf.metrics import EbpfMetrics
from agent.backends.ebpf.mode import kernel_gap
from agent.backends.ebpf.programs import MAPS, PROGRAMS
from agent.kernel import bpf
from agent.kernel.xtables import (
    Tools,
    cleanup_prefix,
    detect_variant,
    missing_hooks,
    parse_save,
    restore,
    with_hooks,
)
from agent.model.desired import Changes, DesiredState, NodeContext, ServicePlan
from agent.model.frontends import FrontendKey

log = logging.getLogger("agent.ebpf")
PREFIX = "KPAB-"  # the mode's xtables chains (masquerade for tc-NATed traffic)
MASQ_MARK = "0x4000"
BPF_F_ALLOW_MULTI = 2
COMPILE_TIMEOUT = 300.0
HOOKS = (("nat", "POSTROUTING", "KPAB-POSTROUTING", ""), ("filter", "FORWARD", "KPAB-FORWARD", ""))


def _rules() -> str:
    return "\n".join([
        "*nat", ":KPAB-POSTROUTING - [0:0]",
        f"-A KPAB-POSTROUTING -m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN",
        f"-A KPAB-POSTROUTING -j MARK --xor-mark {MASQ_MARK}",
        '-A KPAB-POSTROUTING -m comment --comment "kube-proxy-agent tc-NATed traffic requiring SNAT" '
        "-j MASQUERADE --random-fully",
        "COMMIT", "*filter", ":KPAB-FORWARD - [0:0]",
        f"-A KPAB-FORWARD -m mark --mark {MASQ_MARK}/{MASQ_MARK} -j ACCEPT",
        "-A KPAB-FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        "COMMIT",
    ]) + "\n"


def _detach_pinned(pin: Path, cgroup_fd: int) -> None:
    """Detach the cgroup program pinned at `pin` (an earlier run's) from the cgroup, if it is one
    and still attached there."""
    attach = PROGRAMS.get(pin.name)
    try:
        pfd = bpf.obj_get(str(pin))
    except OSError:
        return
    try:
        if attach is not None and cgroup_fd >= 0:
            with contextlib.suppress(OSError):  # not attached there (any more)
                bpf.prog_detach(cgroup_fd, pfd, attach)
    finally:
        os.close(pfd)


@dataclass(slots=True)
class _Written:
    """One service entry as the maps hold it."""

    flags: int
    affinity: int
    svc_id: int
    backends: list[tuple[int, tuple[str, int]]]  # (backend id, (ip, port)) in slot order
    ranges: tuple[str, ...]


class EbpfBackend:
    name: ClassVar[str] = "ebpf"
    WRITE_BATCH = 8192  # service entries written per batch in a full sync

    def __init__(self, families: tuple[int, ...] = (4, 6), settings: Mapping[str, Any] | None = None,
                 registry: CollectorRegistry | None = None) -> None:
        s = dict(settings or {})
        self.families = families
        self.bpffs = str(s.get("ebpf_bpffs_root") or "/sys/fs/bpf")
        self.cgroup = str(s.get("ebpf_cgroup_root") or "")
        # the layout version (part of the pin path); KPA_EBPF_LAYOUT pretends another one, for
        # testing an upgrade that changes the layout
        self.layout = int(os.environ.get("KPA_EBPF_LAYOUT") or L.LAYOUT)
        self.devices_setting = tuple(d.strip() for d in str(s.get("ebpf_devices") or "").split(",") if d.strip())
        self.metrics = EbpfMetrics(registry)
        self._lock = threading.RLock()
        self._maps: dict[str, bpf.Map] = {}
        self._progs: dict[str, int] = {}  # program name -> fd of the program this run loaded
        self._attached = False
        self._known = False
        self._written: dict[tuple[FrontendKey, int], _Written] = {}
        self._backends = 0  # slots in _written, kept in step (no scan per sync)
        self._next_id = 1
        self._cluster: set[bytes] = set()
        self._devices: set[str] = set()
        self._tools: Tools | None = None

    @property
    def root(self) -> Path:
        return Path(self.bpffs) / "kube-proxy-agent"

    @property
    def pin_dir(self) -> Path:
        return self.root / f"v{self.layout}"

    # -- lifecycle ------------------------------------------------------------------------------

    def check_supported(self) -> None:
        gap = kernel_gap() or host.headers_gap()
        if not gap and not (self.cgroup or host.cgroup2_root()):
            gap = "no cgroup v2 hierarchy is mounted (mount -t cgroup2 none /sys/fs/cgroup), or pass --ebpf-cgroup-root"
        if not gap and not shutil.which("tc"):
            gap = "the tc tool is missing (apt-get install iproute2)"
        if gap:
            raise UnsupportedMode(f"--proxy-mode ebpf cannot run here: {gap}. Use --proxy-mode nftables or "
                                  "--proxy-mode iptables, which need only netfilter")

    def start(self) -> None:
        with self._lock:
            self._load()
        log.info("ebpf mode starting layout=v%d pins=%s cgroup=%s; programs attach after the first sync fills "
                 "the maps, then a previous run's are detached", self.layout, self.pin_dir, self._cgroup())

    def close(self, timeout: float) -> None:
        """Programs stay attached and pinned, maps pinned: the datapath serves without the agent."""
        with self._lock:
            self._release()

    def _release(self) -> None:
        """Close this process's descriptors (attachments and pins hold the programs and maps)."""
        for m in self._maps.values():
            m.close()
        for fd in self._progs.values():
            os.close(fd)
        self._maps, self._progs = {}, {}

    def _cgroup(self) -> str:
        return self.cgroup or host.cgroup2_root()

    @property
    def _staged(self) -> Path:
        return self.pin_dir / "staged"

    def _load(self) -> dict[str, bpf.Map]:
        """Compile and load in a child process (agent/backends/ebpf/compile.py: bcc and LLVM never
        enter this one), then open the maps it pinned and the programs it staged."""
        if self._maps:
            return self._maps
        host.ensure_bpffs(self.bpffs)
        self.pin_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self._staged, ignore_errors=True)
        argv = [sys.executable, "-m", "agent.backends.ebpf.compile", str(self.pin_dir), str(self._staged)]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=COMPILE_TIMEOUT, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise SyncError(f"ebpf: could not run the compiler process ({exc})") from exc
        if done.returncode != 0:
            lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
            raise SyncError(f"ebpf: {lines[-1] if lines else f'the compiler process exited {done.returncode}'}"
                            + (f" (and {len(lines) - 1} more line(s) before it)" if len(lines) > 1 else ""))
        try:
            self._progs = {name: bpf.obj_get(str(self._staged / name)) for name in PROGRAMS}
            self._maps = {name: bpf.Map(str(self.pin_dir / name)) for name in MAPS}
        except OSError as exc:
            self._release()
            raise SyncError(f"ebpf: the compiled programs or maps cannot be opened: {exc}") from exc
        return self._maps

    @property
    def tools(self) -> Tools:
        if self._tools is None:
            self._tools, _ = detect_variant()
        return self._tools

    # -- maps -----------------------------------------------------------------------------------

    def _table(self, name: str) -> bpf.Map:
        return self._load()[name]

    def _put(self, name: str, items: list[tuple[bytes, bytes]]) -> None:
        if items:
            self._table(name).update_many(items)

    def _delete(self, name: str, keys: list[bytes]) -> None:
        if keys:
            self._table(name).delete_many(keys)

    def _dump(self, name: str, chunk: int = 4096) -> dict[bytes, bytes]:
        """Every entry of a map, `chunk` entries per batch lookup (see bpf.Map.dump)."""
        return self._table(name).dump(chunk)

    # -- sync -----------------------------------------------------------------------------------

    def sync(self, desired: Mapping[int, DesiredState], changes: Mapping[int, Changes], *, full: bool) -> SyncResult:
        with self._lock:
            did_full = full or not self._known
            try:
                self._load()
                gone = self._full(desired) if did_full else self._partial(desired, changes)
                if not self._attached:
                    self._attach()
                elif did_full:
                    self._attach_devices()
            except Exception as exc:  # OSError, CommandError, RestoreFailed, TcError; bcc raises plain Exception
                if isinstance(exc, SyncError):
                    raise
                self._known = False
                self.metrics.failures.inc()
                raise SyncError(f"ebpf sync failed: {exc}", partial=not full) from exc
            totals = self._totals()
            for k, v in totals.items():
                self.metrics.entries.labels(k).set(v)
        if gone:
            self._forget_udp_flows(gone)
            killed = host.destroy_udp_sockets(gone)
            if killed:
                log.info("destroyed UDP sockets connected to removed endpoints sockets=%d", killed)
        return SyncResult(written={"entries": len(gone)}, totals=totals, detail="full" if did_full else "partial")

    def _forget_udp_flows(self, gone: set[tuple[str, int]]) -> None:
        """The tc path's UDP flows (ct_fwd, and their reverse in ct_rev) to removed endpoints: a
        client sending from the same port again is balanced afresh, not sent to the dead endpoint
        (kube-proxy's UDP conntrack cleanup, for this mode's own flow table)."""
        ends = {L.addr16(ip) + struct.pack("!H", port) for ip, port in gone}
        try:
            with self._lock:
                fwd = [k for k, v in self._dump("ct_fwd").items() if k[36] == L.PROTOCOLS["UDP"] and v[:18] in ends]
                rev = [k for k in self._dump("ct_rev") if k[36] == L.PROTOCOLS["UDP"] and k[:16] + k[32:34] in ends]
                self._delete("ct_fwd", fwd)
                self._delete("ct_rev", rev)
        except Exception as exc:  # bcc raises plain Exception; the entries then age out of the LRU maps
            log.warning("could not forget UDP flows to removed endpoints error=%r", str(exc))
            return
        if fwd:
            log.info("forgot UDP flows to removed endpoints flows=%d", len(fwd))

    def _totals(self) -> dict[str, int]:
        return {"services": len(self._written), "backends": self._backends}

    def _alloc(self) -> int:
        n = self._next_id
        self._next_id += 1
        return n

    def _entry_ops(self, key: FrontendKey, scope: int, old: _Written | None, new: L.ScopeEntry | None,
                   puts: dict[str, list[tuple[bytes, bytes]]], dels: dict[str, list[bytes]],
                   gone: set[tuple[str, int]]) -> _Written | None:
        """Writes taking one service entry from `old` to `new`: backends first, then slots, the master
        last (growing); master first, then slots and backends (shrinking or going)."""
        if new is None:
            if old is None:
                return None
            dels["svcs"].insert(0, L.svc_key(key, scope, 0))
            dels["svcs"] += [L.svc_key(key, scope, i) for i in range(1, len(old.backends) + 1)]
            dels["backends"] += [L.id_key(b) for b, _ in old.backends]
            dels["ranges"] += [L.lpm_key(old.svc_id, c) for c in old.ranges]
            gone.update(ep for _, ep in old.backends)
            return None
        svc_id = old.svc_id if old is not None else self._alloc()
        ids = {ep: b for b, ep in old.backends} if old is not None else {}
        backends: list[tuple[int, tuple[str, int]]] = []
        for e in new.endpoints:
            ep = (e.ip, e.port)
            b = ids.get(ep) or self._alloc()
            backends.append((b, ep))
            if ep not in ids:
                puts["backends"].append((L.id_key(b), L.backend_val(e, key.protocol)))
        old_slots = [b for b, _ in old.backends] if old is not None else []
        for i, (b, _) in enumerate(backends, 1):
            if i > len(old_slots) or old_slots[i - 1] != b:
                puts["svcs"].append((L.svc_key(key, scope, i), L.svc_val(backend_id=b)))
        master = (L.svc_key(key, scope, 0), L.svc_val(count=len(backends), flags=new.flags, affinity=new.affinity,
                                                     svc_id=svc_id))
        if old is None or (len(old.backends), old.flags, old.affinity) != (len(backends), new.flags, new.affinity):
            puts["svcs"].append(master)
        dels["svcs"] += [L.svc_key(key, scope, i) for i in range(len(backends) + 1, len(old_slots) + 1)]
        kept = {b for b, _ in backends}
        if old is not None:
            dels["backends"] += [L.id_key(b) for b, _ in old.backends if b not in kept]
            gone.update(ep for b, ep in old.backends if b not in kept and key.protocol == "UDP")
            for c in set(old.ranges) - set(new.source_ranges):
                dels["ranges"].append(L.lpm_key(svc_id, c))
        for c in new.source_ranges:
            if old is None or c not in old.ranges:
                puts["ranges"].append((L.lpm_key(svc_id, c), b"\x01"))
        return _Written(new.flags, new.affinity, svc_id, backends, new.source_ranges)

    def _apply(self, puts: dict[str, list[tuple[bytes, bytes]]], dels: dict[str, list[bytes]]) -> None:
        # deletions of what nothing names any more last
        self._write(puts)
        self._delete("svcs", dels["svcs"])
        self._delete("backends", dels["backends"])
        self._delete("ranges", dels["ranges"])

    def _write(self, puts: dict[str, list[tuple[bytes, bytes]]]) -> None:
        """Backends and ranges before the service entries naming them; service entries in order
        (slots, then masters when growing)."""
        self._put("backends", puts["backends"])
        self._put("ranges", puts["ranges"])
        self._put("svcs", puts["svcs"])

    @staticmethod
    def _buckets() -> tuple[dict[str, list[tuple[bytes, bytes]]], dict[str, list[bytes]]]:
        return ({"svcs": [], "backends": [], "ranges": []}, {"svcs": [], "backends": [], "ranges": []})

    def _partial(self, desired: Mapping[int, DesiredState], changes: Mapping[int, Changes]) -> set[tuple[str, int]]:
        puts, dels = self._buckets()
        gone: set[tuple[str, int]] = set()
        for fam in self.families:
            table = desired[fam].frontends
            for key in sorted(changes[fam].frontends if fam in changes else ()):
                f = table.get(key)
                entries = L.entries_of(f) if f is not None else {}
                for scope in (L.SCOPE_SOCKETS, L.SCOPE_TC):
                    old = self._written.get((key, scope))
                    w = self._entry_ops(key, scope, old, entries.get(scope), puts, dels, gone)
                    self._backends += (len(w.backends) if w else 0) - (len(old.backends) if old else 0)
                    if w is None:
                        self._written.pop((key, scope), None)
                    else:
                        self._written[(key, scope)] = w
        self._apply(puts, dels)
        return gone

    def _full(self, desired: Mapping[int, DesiredState]) -> set[tuple[str, int]]:
        """Read the maps, adopt what a previous run wrote (ids kept, so affinity and UDP flows
        survive a restart), write what differs, delete what is not wanted."""
        kernel_svcs = self._dump("svcs")
        kernel_backends = self._dump("backends")
        kernel_ranges = set(self._dump("ranges"))
        adopted: dict[tuple[FrontendKey, int], _Written] = {}
        masters: dict[tuple[FrontendKey, int], tuple[int, int, int, int]] = {}
        slots: dict[tuple[FrontendKey, int], dict[int, int]] = {}
        for k, v in kernel_svcs.items():
            fkey, scope, slot = L.decode_svc_key(k)
            backend_id, count, flags, affinity, svc_id = L.decode_svc_val(v)
            if slot == 0:
                masters[(fkey, scope)] = (count, flags, affinity, svc_id)
            else:
                slots.setdefault((fkey, scope), {})[slot] = backend_id
        top = 0
        for ident, (count, flags, affinity, svc_id) in masters.items():
            ids = slots.get(ident, {})
            backends = []
            for slot in range(1, count + 1):
                b = ids.get(slot)
                raw = kernel_backends.get(L.id_key(b)) if b is not None else None
                if b is None or raw is None:
                    break
                backends.append((b, L.decode_backend(raw)))
            adopted[ident] = _Written(flags, affinity, svc_id, backends, ())
            top = max([top, svc_id, *(b for b, _ in backends)])
        self._next_id = max(self._next_id, top + 1)
        if self._written:  # our own memory is better (it knows the source ranges)
            adopted = {k: self._written.get(k, w) for k, w in adopted.items()}
        puts, dels = self._buckets()
        gone: set[tuple[str, int]] = set()
        written: dict[tuple[FrontendKey, int], _Written] = {}
        # What the kernel holds that nothing written names is deleted at the end; with nothing in
        # the maps (the first start) there is nothing to compare, and no set of every key is built.
        compare = bool(kernel_svcs or kernel_backends or kernel_ranges)
        wanted_svcs: set[bytes] = set()
        wanted_backends: set[bytes] = set()
        wanted_ranges: set[bytes] = set()

        def flush() -> None:
            """Write what is pending, a batch at a time, so a full sync of 10k Services never holds
            all its entries at once."""
            # drift: entries whose content differs from what we would write (someone edited the map)
            puts["svcs"] = [(k, v) for k, v in puts["svcs"] if kernel_svcs.get(k) != v]
            self._write(puts)
            for items in puts.values():
                items.clear()

        for fam in self.families:
            for f in desired[fam].frontends.values():
                for scope, entry in L.entries_of(f).items():
                    old = adopted.get((f.key, scope))
                    if old is not None and len(old.backends) != len([s for s in slots.get((f.key, scope), {})]):
                        old = _Written(-1, old.affinity, old.svc_id, old.backends, old.ranges)  # rewrite slots
                    w = self._entry_ops(f.key, scope, old, entry, puts, dels, gone)
                    if w is None:
                        continue
                    written[(f.key, scope)] = w
                    if compare:
                        wanted_svcs.add(L.svc_key(f.key, scope, 0))
                        wanted_svcs.update(L.svc_key(f.key, scope, i) for i in range(1, len(w.backends) + 1))
                        wanted_backends.update(L.id_key(b) for b, _ in w.backends)
                        wanted_ranges.update(L.lpm_key(w.svc_id, c) for c in w.ranges)
                if len(puts["svcs"]) >= self.WRITE_BATCH:
                    flush()
        cluster = {k for fam in self.families for k in L.cluster_cidr_keys(desired[fam].node.cluster_cidrs)}
        wanted_ranges |= cluster
        puts["ranges"] += [(k, b"\x01") for k in sorted(cluster - kernel_ranges)]
        puts["backends"] += [(k, v) for k, v in self._backend_values(written, kernel_backends)]
        flush()
        if compare:
            stale = [k for k in dels["svcs"] if k not in wanted_svcs]
            listed = set(stale)
            dels["svcs"] = stale + [k for k in kernel_svcs if k not in wanted_svcs and k not in listed]
            dels["backends"] = [k for k in set(dels["backends"]) | (set(kernel_backends) - wanted_backends)
                                if k not in wanted_backends]
            dels["ranges"] = [k for k in set(dels["ranges"]) | (kernel_ranges - wanted_ranges)
                              if k not in wanted_ranges]
            self._apply(puts, dels)
        self._written = written
        self._backends = sum(len(w.backends) for w in written.values())
        self._known = True
        self._iptables()
        return gone

    @staticmethod
    def _backend_values(written: Mapping[tuple[FrontendKey, int], _Written],
                        kernel: Mapping[bytes, bytes]) -> Iterable[tuple[bytes, bytes]]:
        """Backend entries the kernel lacks or holds wrong (the ones _entry_ops did not write)."""
        from agent.model.endpoints import EndpointInfo

        for (key, _), w in written.items():
            for b, (ip, port) in w.backends:
                raw = L.backend_val(EndpointInfo(ip, port), key.protocol)
                if kernel.get(L.id_key(b)) != raw:
                    yield L.id_key(b), raw

    def _iptables(self) -> None:
        for fam in self.families:
            saved = parse_save(self._save(fam), PREFIX)
            restore(self.tools, fam, with_hooks(_rules(), missing_hooks(saved, HOOKS)))

    def _save(self, fam: int) -> str:
        from agent.kernel.commands import run

        return run([self.tools.binary(fam, "save")], timeout=120)

    # -- attaching --------------------------------------------------------------------------------

    def _prog_pin(self, name: str) -> Path:
        return self.pin_dir / "progs" / name

    def _attach(self) -> None:
        """Attach this run's programs, then detach what earlier runs attached (found by their pins),
        then pin this run's in their place."""
        self._load()
        cgroup = self._cgroup()
        fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for name, attach in PROGRAMS.items():
                if attach is not None:
                    bpf.prog_attach(fd, self._progs[name], attach, BPF_F_ALLOW_MULTI)
            stale = sorted(self.root.glob("v*/progs/*"))
            for pin in stale:
                _detach_pinned(pin, fd)
                pin.unlink()
        finally:
            os.close(fd)
        progs = self._prog_pin("x").parent
        progs.mkdir(parents=True, exist_ok=True)
        for name, pfd in self._progs.items():
            try:
                bpf.obj_pin(pfd, str(progs / name))
            except OSError as exc:
                raise SyncError(f"ebpf: cannot pin program {name} at {progs / name}: {exc.strerror}") from exc
        shutil.rmtree(self._staged, ignore_errors=True)  # pinned where they belong now
        for old in self.root.glob("v*"):
            if old != self.pin_dir:
                shutil.rmtree(old, ignore_errors=True)  # an older layout's maps, now unused
                log.info("removed the pins of an older layout path=%s", old)
        self._attached = True
        self._attach_devices()
        log.info("ebpf programs attached cgroup=%s devices=%s", cgroup, ",".join(sorted(self._devices)) or "-")

    def _wanted_devices(self) -> set[str]:
        if self.devices_setting:
            return set(self.devices_setting)
        from agent.kernel.netlink import NETLINK_ROUTE, Socket, dump_addresses

        with Socket(NETLINK_ROUTE) as rt:
            indexes = {a.ifindex for a in dump_addresses(rt) if not a.address.startswith(("127.", "::1", "fe80"))}
        import socket

        return {name for index, name in socket.if_nameindex() if index in indexes}

    def _attach_devices(self) -> None:
        """tc programs on every wanted device that lacks one of ours (new devices, and filters
        someone removed: this runs at every full sync)."""
        wanted = self._wanted_devices()
        for dev in sorted(wanted):
            # egress first: a flow the ingress program DNATs needs its replies translated back from
            # its first SYN-ACK on (the other way round, a connection opened in between lost it)
            for direction, prog in (("egress", "kpa_tc_egress"), ("ingress", "kpa_tc_ingress")):
                if not any(name.startswith("kpa_") for _, _, name in host.tc_filters(dev, direction)):
                    if dev in self._devices:
                        log.warning("tc program missing; attaching it again device=%s direction=%s", dev, direction)
                    host.tc_attach(dev, direction, str(self._prog_pin(prog)), prog)
        self._devices = wanted

    # -- render and cleanup -----------------------------------------------------------------------

    def render(self, desired: Mapping[int, DesiredState]) -> str:
        return "".join(L.render_family(desired[f]) for f in self.families)

    def features(self) -> dict[str, str]:
        return {"bpffs": str(self.pin_dir), "devices": ",".join(sorted(self._devices)) or "-", "compiler": "bcc"}

    def programmed(self, nodes: Mapping[int, NodeContext], plans: Sequence[ServicePlan]) -> Programmed:
        """Each frontend's service entries read back from the pinned maps (master: backend count,
        flags, service id; slots: backends, decoded), compared with what this run wrote for it; a
        missing entry or other backends is drift."""
        out = Programmed()
        written = dict(self._written)  # a copy: the sync thread may be writing
        by_port: dict[tuple[int, str], list[tuple[Any, Any]]] = {}  # (port, protocol) -> entries, in order
        for item in sorted(written.items(), key=lambda kv: (str(kv[0][0]), kv[0][1])):
            by_port.setdefault((item[0][0].port, item[0][0].protocol), []).append(item)
        for plan in plans:
            i = plan.info
            addresses = {i.cluster_ip, *i.external_ips, *i.load_balancer_ips}
            for (key, scope), w in by_port.get((i.port, i.protocol), ()):
                if key.address not in addresses:
                    continue
                where = f"{key.address}:{key.port}/{key.protocol} {'sockets' if scope == L.SCOPE_SOCKETS else 'tc'}"
                try:
                    master = self._lookup("svcs", L.svc_key(key, scope, 0))
                    if master is None:
                        out.lines.append(f"{where}: no service entry")
                        out.differences.append(f"no service entry for {where}")
                        continue
                    _, count, flags, affinity, svc_id = L.decode_svc_val(master)
                    backends: list[tuple[str, int]] = []
                    for slot in range(1, count + 1):
                        ref = self._lookup("svcs", L.svc_key(key, scope, slot))
                        raw = self._lookup("backends", L.id_key(L.decode_svc_val(ref)[0])) if ref else None
                        if raw is not None:
                            backends.append(L.decode_backend(raw))
                except Exception as exc:  # a map that cannot be read: said, never fatal
                    out.lines.append(f"{where}: maps not readable ({exc})")
                    out.differences.append(f"maps not readable: {exc}")
                    return out
                out.lines.append(f"{where}: service id {svc_id}, flags {flags:#x}, affinity {affinity}s, "
                                 f"{count} backend(s): " + ", ".join(f"{ip}:{port}" for ip, port in backends))
                if sorted(backends) != sorted(ep for _, ep in w.backends):
                    out.differences.append(f"{where} holds backends {sorted(backends)}, written "
                                           f"{sorted(ep for _, ep in w.backends)}")
        if not out.lines:
            out.lines.append("no map entries for these ports")
        return out

    def _lookup(self, name: str, key: bytes) -> bytes | None:
        return self._table(name).lookup(key)

    def cleanup(self) -> None:
        """Detach our programs (cgroup hooks and tc filters), unpin our programs and maps, remove our
        xtables chains. Nothing else."""
        for line in cleanup_prefix(PREFIX, self.families):
            log.info("cleanup %s", line)
        removed = host.tc_detach_ours(host.all_devices())
        if self.root.exists():
            cgroup = self._cgroup()
            fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY) if cgroup else -1
            try:
                for pin in self.root.glob("v*/progs/*"):
                    _detach_pinned(pin, fd)
            finally:
                if fd >= 0:
                    os.close(fd)
            shutil.rmtree(self.root, ignore_errors=True)
            log.info("cleanup removed pins %s and tc filters=%d", self.root, removed)
        with self._lock:
            self._written.clear()
            self._backends = 0
            self._known = self._attached = False
