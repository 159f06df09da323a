"""Deleting stale conntrack entries so clients move on: UDP flows to a removed endpoint or sent
while a Service had none, and TCP connection attempts nobody answered (never DNATed)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from agent.kernel.commands import CommandError, have, run
from agent.model.desired import StaleFlow

log = logging.getLogger("agent.conntrack")


def argv_for(flow: StaleFlow) -> list[str]:
    """The conntrack command deleting exactly the flows `flow` names:
    - an endpoint that went away: flows to the frontend that were DNATed to it;
    - a service that had no endpoint and now has one: flows to the frontend that were not DNATed
      (their reply would come from the frontend itself). Flows the new rules already sent to an
      endpoint are left alone: deleting one mid-request loses its reply."""
    argv = ["conntrack", "-D", "-f", "ipv4" if flow.family == 4 else "ipv6", "-p", "udp"]
    if flow.frontend is not None:
        argv += ["--orig-dst", flow.frontend]
    argv += ["--orig-port-dst", str(flow.port)]
    if flow.endpoint_ip is not None:
        argv += ["--dst-nat", flow.endpoint_ip]
    elif flow.frontend is not None:
        argv += ["--reply-src", flow.frontend]
    else:  # a node port on any node address: not DNATed means the reply comes from that port
        argv += ["--reply-port-src", str(flow.port)]
    return argv


def unanswered_tcp(listing: str, flows: list[StaleFlow]) -> list[list[str]]:
    """The `conntrack -D` command lines for the entries of `listing` (`conntrack -L -p tcp --state
    SYN_SENT` output, one family) that `flows` name: to a frontend and port (any address for a
    node port), never DNATed (the reply tuple is the original one reversed)."""
    fronts = {(f.frontend, f.port) for f in flows}
    ports = {f.port for f in flows if f.frontend is None}
    out = []
    for line in listing.splitlines():
        fields = [w.split("=", 1) for w in line.split() if "=" in w]
        vals = [v for k, v in fields if k in ("src", "dst", "sport", "dport")]
        if len(vals) < 8:
            continue
        src, dst, sport, dport, rsrc, rdst, rsport, rdport = vals[:8]
        if (rsrc, rdst, rsport, rdport) != (dst, src, dport, sport) or not dport.isdigit():
            continue  # DNATed (or SNATed): an attempt the rules handled
        if (dst, int(dport)) in fronts or int(dport) in ports:
            out.append(["conntrack", "-D", "-f", "ipv6" if ":" in src else "ipv4", "-p", "tcp",
                        "--state", "SYN_SENT", "--orig-src", src, "--orig-dst", dst,
                        "--orig-port-src", sport, "--orig-port-dst", dport])
    return out


def _flush_tcp(flows: list[StaleFlow]) -> None:
    """One listing of unanswered TCP attempts per family (usually a few entries), then a delete per
    entry that matches: cheap even when thousands of Services are new at start-up."""
    for fam in sorted({f.family for f in flows}):
        mine = [f for f in flows if f.family == fam]
        try:
            listing = run(["conntrack", "-L", "-f", "ipv4" if fam == 4 else "ipv6", "-p", "tcp",
                           "--state", "SYN_SENT"], timeout=60)
        except CommandError as exc:
            log.warning("conntrack listing failed error=%r", exc.stderr)
            continue
        for argv in unanswered_tcp(listing, mine):
            try:
                run(argv, timeout=30)
                log.info("conntrack entries deleted %s", " ".join(argv[2:]))
            except CommandError as exc:
                if "0 flow entries" not in exc.stderr:
                    log.warning("conntrack delete failed argv=%r error=%r", argv, exc.stderr)


def flush(flows: list[StaleFlow]) -> None:
    if not have("conntrack"):
        log.warning("conntrack tool missing; stale flows not cleared (apt-get install conntrack)")
        return
    tcp = [f for f in flows if f.protocol == "TCP"]
    if tcp:
        _flush_tcp(tcp)
    for flow in dict.fromkeys(f for f in flows if f.protocol != "TCP"):
        try:
            run(argv_for(flow), timeout=30)
            log.info("conntrack entries deleted %s", " ".join(argv_for(flow)[2:]))
        except CommandError as exc:
            if "0 flow entries" not in exc.stderr:
                log.warning("conntrack delete failed argv=%r error=%r", argv_for(flow), exc.stderr)


class Cleaner:
    """Runs `flush` on its own thread, in the order syncs hand flows over, so a sync never waits
    for conntrack (each delete scans the table: about 90 ms at 60k entries here). Flows wait in a
    bounded, de-duplicated queue; past `limit` the oldest are dropped with a warning (their entries
    then expire on conntrack's own timeouts).

    A helper for the modes whose datapath uses netfilter conntrack (iptables, nftables, IPVS): each
    submits the stale flows of a sync once its new rules are written."""

    def __init__(self, limit: int = 100_000, flush_fn: Callable[[list[StaleFlow]], None] = flush) -> None:
        self._flush = flush_fn
        self._limit = limit
        self._pending: dict[StaleFlow, None] = {}
        self._cond = threading.Condition()
        self._busy = False
        threading.Thread(target=self._run, name="conntrack", daemon=True).start()

    def submit(self, flows: list[StaleFlow]) -> None:
        if not flows:
            return
        with self._cond:
            self._pending.update(dict.fromkeys(flows))
            over = len(self._pending) - self._limit
            if over > 0:
                for flow in list(self._pending)[:over]:
                    del self._pending[flow]
                log.warning("conntrack cleanup queue full; dropped %d oldest stale flows", over)
            self._cond.notify()

    def idle(self, timeout: float) -> bool:
        """Wait until everything submitted has been flushed (for shutdown and tests)."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._pending and not self._busy, timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._pending))
                batch, self._pending = list(self._pending), {}
                self._busy = True
            try:
                self._flush(batch)
            except Exception as exc:  # never let the worker die: the next batch may work
                log.warning("conntrack cleanup failed error=%r", str(exc))
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()
