"""New connections to Services, back to back, while a test changes the node under them: every
failure is kept with its time and the phase it happened in."""

from __future__ import annotations

import threading
import time

from tests.cluster.harness import answered
from tests.netlab import PROTOS, family_of, probe, socket_in

# (label, client network namespace, address, port, protocol)
Target = tuple[str, str, str, int, str]


class Traffic:
    """One thread per target, each opening a new connection every 1/`rate` s (or as soon as the last
    one answered or failed, after at most 3 s, when slower). A connection fails when it gets no
    answer within 3 s, so one lost SYN (retransmitted after 1 s) is a slow connection, seen in the
    longest gap, not a failed one: at 100 connections a second a client port now and then meets
    its previous use still in TIME_WAIT at the server, and then a SYN needs a retransmit whatever
    the proxy does (one in about 10k connections timed out at 1 s in a fresh-clone CI run, during a
    phase where the agent wrote nothing). A reply counts only if it comes from a
    pod whose name starts with `backend`. The rate is bounded on purpose: back to back (800/s per
    target here) the clients cycle through their ephemeral ports within the conntrack TIME_WAIT
    timeout, and reused ports time out now and then whatever the proxy does."""

    def __init__(self, targets: list[Target], phase: str, backend: str = "web-", rate: float = 100.0) -> None:
        self.targets, self.phase, self.backend, self.rate = targets, phase, backend, rate
        self.tried: dict[str, int] = {}
        self.failed: list[tuple[float, str, str, str]] = []  # (seconds since start, phase, target, reply)
        self.ports: list[int] = []  # each failed connection's client port (find it in `conntrack -L`)
        self.began: list[float] = []  # and when it began (seconds since start)
        self.last_ok: dict[str, float] = {}
        self.gap: dict[str, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(t,), daemon=True) for t in targets]
        self.t0 = time.monotonic()

    def _run(self, target: Target) -> None:
        label, netns, ip, port, proto = target
        due = time.monotonic()
        while not self._stop.is_set():
            due += 1 / self.rate
            self._stop.wait(max(0.0, due - time.monotonic()))
            phase = self.phase
            began = time.monotonic()
            sock = socket_in(netns, family_of(ip), PROTOS[proto][0], PROTOS[proto][1])
            try:
                reply = probe(netns, ip, port, proto, timeout=3, sock=sock)
                sport = sock.getsockname()[1]
            finally:
                sock.close()
            now = time.monotonic()
            with self._lock:
                self.tried[phase] = self.tried.get(phase, 0) + 1
                if answered(reply) and reply.startswith(self.backend):
                    last = self.last_ok.get(label)
                    if last is not None:
                        self.gap[phase] = max(self.gap.get(phase, 0.0), now - last)
                    self.last_ok[label] = now
                else:
                    self.failed.append((now - self.t0, phase, label, reply))
                    self.ports.append(sport)
                    self.began.append(began - self.t0)

    def __enter__(self) -> Traffic:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(10)

    def table(self, title: str) -> str:
        elapsed = time.monotonic() - self.t0
        total = sum(self.tried.values())
        labels = ", ".join(t[0] for t in self.targets)
        rows = [f"{title}: {total} connections in {elapsed:.0f}s ({total / elapsed:.0f}/s; {labels})",
                "| phase | tried | failed | longest gap between answers |", "|---|---|---|---|"]
        for phase, n in self.tried.items():
            bad = sum(1 for f in self.failed if f[1] == phase)
            rows.append(f"| {phase} | {n} | {bad} | {self.gap.get(phase, 0.0) * 1000:.0f} ms |")
        return "\n".join(rows)
