"""A process and its children, as the benchmark counts them: CPU seconds and resident memory of
the whole tree (an `nft`, `iptables-restore` or `ipset` child counts), read from /proc. Used on
this machine and inside user-mode-linux guests (tests/cluster/guestd.py), so stdlib only."""

from __future__ import annotations

import os
import threading


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d))
    return kids


def tree(pid: int) -> list[int]:
    kids, out, todo = _children(), [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += kids.get(p, [])
    return out


def cpu_s(pid: int) -> float:
    """CPU seconds of `pid` and of its children, waited-for (cutime) and running."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for i, p in enumerate(tree(pid)):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        if i == 0:
            total += (int(fields[13]) + int(fields[14])) / tick  # waited-for children
    return total


def rss_mb(pid: int) -> float:
    return sum(mb for _, mb in rss_parts(pid))


def rss_parts(pid: int) -> list[tuple[str, float]]:
    """(command name, RSS in MB) of each process of the tree, the root first. A child still
    carrying its parent's name is a fork that has not exec'd yet (Python's subprocess and Go's
    os/exec clone the proxy, then exec the command): it shares the parent's pages (vfork: the same
    memory), so counting its RSS would count the proxy twice; it is left out."""
    kids = _children()
    out: list[tuple[str, float]] = []
    todo: list[tuple[int, str | None]] = [(pid, None)]
    while todo:
        p, parent_name = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                fields = dict(ln.split(":", 1) for ln in f if ln.startswith(("Name:", "VmRSS:")))
        except (OSError, ValueError):
            continue
        name = fields.get("Name", "?").strip()
        todo += [(k, name) for k in kids.get(p, [])]
        if name == parent_name:
            continue
        out.append((name, int(fields.get("VmRSS", "0 kB").split()[0]) / 1024))
    return out


class Watch:
    """Samples one process tree's RSS every 0.25 s: `peak` and `last` (MB), and the peak of each
    phase the caller names (`phase`), so a report can say when the peak happened."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0.0
        self.last = 0.0
        self.phase = "cold start"
        self.peaks: dict[str, float] = {}
        self.peak_parts: list[tuple[str, float]] = []  # the processes at the peak sample
        self._stop = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while not self._stop.is_set():
            parts = rss_parts(self.pid)
            self.last = sum(mb for _, mb in parts)
            if self.last > self.peak:
                self.peak, self.peak_parts = self.last, parts
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0.0), self.last)
            self._stop.wait(0.25)

    def stop(self) -> None:
        self._stop.set()
