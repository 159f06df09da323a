"""The sync loop: records in from sources, drain the model, hand desired state to the backend,
account for it in metrics and health. Sources call the `on_*` methods from their threads."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from typing import TypeVar

from agent.backends.base import Backend, SyncError
from agent.health import ProxyHealth, ServiceHealthServers
from agent.metrics import Metrics
from agent.model.desired import NodeContext, StaleFlow
from agent.model.records import KIND_TYPES, EndpointSlice, Node, Record, Service, ServiceCIDR
from agent.model.serviceport import NamespacedName, Problem
from agent.model.state import FAMILIES, ClusterModel, ServiceFacts
from agent.sync.tallies import PlanTallies

log = logging.getLogger("agent.sync")

KINDS = tuple(KIND_TYPES)


class SyncLoop:
    """Owns the model; the only place that calls the backend."""

    CARRY = 10_000  # stale flows and trigger times kept across failed syncs, at most
    HISTORY = 20_000  # Services whose last change `explain` remembers

    def __init__(
        self,
        model: ClusterModel,
        backend: Backend,
        metrics: Metrics,
        health: ProxyHealth,
        *,
        node_name: str,
        local_ips: Callable[[], Iterable[str]] | None = None,
        hc_servers: ServiceHealthServers | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.model = model
        self.backend = backend
        self.metrics = metrics
        self.health = health
        self.node_name = node_name
        self._local_ips = local_ips
        self._hc = hc_servers
        self._wall = wall_clock
        self._lock = threading.Lock()
        self._synced: set[str] = set()
        self._known: dict[str, set[NamespacedName]] = {k: set() for k in KINDS}
        self._need_full = True
        self.ready = threading.Event()  # every initial list is in
        self.trigger: Callable[[], None] = lambda: None
        # a Kubernetes Event about this node: (type, reason, action, note); set by the daemon
        self.on_event: Callable[[str, str, str, str], None] = lambda type_, reason, action, note: None
        # after the first successful sync: this mode's datapath serves (set by the daemon)
        self.on_first_sync: Callable[[], None] = lambda: None
        self.syncs = 0
        self.failures = 0
        self._failing = False
        self._tallies = PlanTallies()
        self._stale_flows: list[StaleFlow] = []
        self._trigger_times: list[str] = []
        self._queued_at = 0.0  # when the newest change was queued
        # for `status` and `explain`: the last full and partial sync (wall time, seconds, detail),
        # the mode's totals after the last sync, skipped objects by (kind, reason), and per Service
        # when a change to it was last seen and programmed (at most HISTORY Services, oldest go)
        self.last: dict[str, tuple[float, float, str]] = {}
        self.totals: dict[str, int] = {}
        self.skipped: Counter[tuple[str, str]] = Counter()
        self.history: dict[NamespacedName, tuple[float, float]] = {}
        self.source: dict[str, tuple[str, float]] = {}  # kind -> (state in words, since when)
        self.udp_cleaned: dict[str, tuple[int, float]] = {}  # Service -> (stale UDP flows handed to the mode, when)
        self.repaired = 0  # service ports whose drift the mode repaired

    # -- inputs (source threads) ------------------------------------------------------------

    def _record_problems(self, problems: Iterable[Problem]) -> None:
        for p in problems:
            self.skipped[(p.kind, p.reason)] += 1
            log.warning("invalid object skipped kind=%s object=%s reason=%s detail=%r",
                        p.kind, p.object, p.reason, p.detail)
            self.metrics.invalid_objects.labels(p.kind, p.reason).inc()

    def bad_object(self, problem: Problem) -> None:
        self._record_problems([problem])

    def _apply_locked(self, kind: str, key: NamespacedName, rec: Record | None) -> None:
        if kind == "Service":
            assert rec is None or isinstance(rec, Service)
            self._record_problems(self.model.on_service(key, rec))
        elif kind == "EndpointSlice":
            assert rec is None or isinstance(rec, EndpointSlice)
            self._record_problems(self.model.on_slice(key, rec))
        elif kind == "Node":
            if key.name != self.node_name:
                return
            assert rec is None or isinstance(rec, Node)
            self.model.on_node(rec)
            self.health.node_deleting = self.model.node_deleting
        elif kind == "ServiceCIDR":
            assert rec is None or isinstance(rec, ServiceCIDR)
            self._record_problems(self.model.on_service_cidr(key, rec))
        if rec is None:
            self._known[kind].discard(key)
        else:
            self._known[kind].add(key)

    def apply(self, kind: str, key: NamespacedName, rec: Record | None) -> None:
        with self._lock:
            self._apply_locked(kind, key, rec)
        self._queued()

    def replace_all(self, kind: str, records: Mapping[NamespacedName, Record]) -> None:
        """A full list (initial or after 410 Gone): objects not in it are deleted, nothing flushed."""
        with self._lock:
            for key in self._known[kind] - set(records):
                self._apply_locked(kind, key, None)
            for key, rec in records.items():
                self._apply_locked(kind, key, rec)
            first = kind not in self._synced
            self._synced.add(kind)
            if first:
                log.info("initial list complete kind=%s objects=%d", kind, len(records))
            if self._synced >= set(KINDS):
                self.ready.set()
        self._queued()

    def _queued(self) -> None:
        svc, eps = self.model.pending
        self.metrics.service_changes_pending.set(svc)
        self.metrics.endpoint_changes_pending.set(eps)
        if self.ready.is_set():
            self._queued_at = self._wall()
            self.metrics.last_queued.set(self._queued_at)
            self.health.queued()
            self.trigger()

    # -- what a person asks (explain, status) ----------------------------------------------

    def source_state(self, kind: str, state: str) -> None:
        """The source says how its list/watch of `kind` goes (for `status`)."""
        old = self.source.get(kind)
        if old is None or old[0] != state:
            self.source[kind] = (state, self._wall())

    def snapshot(self, key: NamespacedName) -> tuple[ServiceFacts, dict[int, NodeContext]]:
        """One Service as the model holds it, and the node context per family, consistently."""
        with self._lock:
            return self.model.facts(key), {f: self.model.desired[f].node for f in FAMILIES}

    def counts(self) -> dict[str, int]:
        with self._lock:
            plans = [p for f in FAMILIES for p in self.model.desired[f].services.values()]
            return {"services": len({p.name.service for p in plans}), "servicePorts": len(plans),
                    "endpoints": sum(len(p.all_endpoints) for p in plans),
                    "skippedServices": self.model.skipped_services}

    # -- the sync -------------------------------------------------------------------------

    def refresh_node_addresses(self) -> None:
        """Read this node's addresses (NodePort frontends live on them); a change is a change."""
        if self._local_ips is not None:
            try:
                self.model.set_local_ips(self._local_ips())
            except OSError as exc:  # netlink trouble: keep the addresses we had
                log.warning("could not read node addresses; keeping the last ones error=%r", str(exc))

    def sync(self, full: bool = False) -> bool:
        """One sync; returns success. Never raises for kernel errors (they are counted and logged)."""
        if not self.ready.is_set():
            log.info("sync skipped: waiting for the first full list of %s", sorted(set(KINDS) - self._synced))
            return False
        start = time.monotonic()
        with self._lock:
            self.refresh_node_addresses()
            queued_at = self._queued_at  # every change queued until now is in this drain
            update = self.model.drain()
            # from what the drain changed, whether or not the backend then writes it
            self._tallies.apply(self.model.desired, update.changed)
            # a failed sync keeps these for the next successful one (the model reports them once)
            if update.stale_flows:
                self._stale_flows = list(dict.fromkeys(self._stale_flows + update.stale_flows))[-self.CARRY:]
            self._trigger_times = (self._trigger_times + update.trigger_times)[-self.CARRY:]
            self.metrics.service_changes_pending.set(0)
            self.metrics.endpoint_changes_pending.set(0)
        self.metrics.service_changes.inc(update.services_changed)
        self.metrics.endpoint_changes.inc(update.endpoints_changed)
        self._record_problems(update.problems)
        full = full or update.full or self._need_full
        changed_count = sum(len(c) for c in update.changed.values())
        changes = {f: update.changes(f, tuple(s for s in self._stale_flows if s.family == f)) for f in FAMILIES}
        try:
            result = self.backend.sync(self.model.desired, changes, full=full)
        except Exception as exc:  # a mode's bug must not end the sync thread: counted as a failed sync
            self._need_full = True
            self.failures += 1
            log.error("sync failed mode=%s full=%s error=%r; previous rules stay, next sync is full",
                      self.backend.name, full, str(exc), exc_info=not isinstance(exc, SyncError))
            if not self._failing:  # one Warning per failure streak, not one per retry
                self.on_event("Warning", "SyncFailed", "SyncProxyRules",
                              f"{self.backend.name} rules not written: {exc}; previous rules stay, retrying")
            self._failing = True
            return False
        elapsed = time.monotonic() - start
        if self._failing:
            self.on_event("Normal", "SyncRecovered", "SyncProxyRules",
                          f"{self.backend.name} rules written again after {self.failures} failed sync(s) in all")
            self._failing = False
        self._need_full = False
        self.syncs += 1
        if self.syncs == 1:
            self.on_first_sync()
        self.metrics.sync_duration.observe(elapsed)
        (self.metrics.sync_full_duration if full else self.metrics.sync_partial_duration).observe(elapsed)
        self.metrics.last_sync.set(self._wall())
        self.metrics.last_programmed.set(queued_at)
        self.health.updated()
        now = self._wall()
        for flow in self._stale_flows:  # the mode cleans them up now: remembered per Service for `explain`
            if flow.protocol != "UDP":
                continue
            n, _ = self.udp_cleaned.get(flow.service, (0, 0.0))
            _remember(self.udp_cleaned, flow.service, (n + 1, now), self.HISTORY)
        self._stale_flows = []
        self.last["full" if full else "partial"] = (now, elapsed, result.detail)
        self.totals = dict(result.totals)
        self.repaired += result.repaired
        for svc in {p.service for ports in update.changed.values() for p in ports}:
            _remember(self.history, svc, (queued_at, now), self.HISTORY)
        self._after_sync()
        log.info("sync done mode=%s full=%s changed_ports=%d seconds=%.4f %s %s%s", self.backend.name, full,
                 changed_count, elapsed, " ".join(f"{k}={v}" for k, v in sorted(result.totals.items())),
                 " ".join(f"written_{k}={v}" for k, v in sorted(result.written.items())),
                 f" detail={result.detail!r}" if result.detail else "")
        return True

    def _after_sync(self) -> None:
        now = self._wall()
        triggers, self._trigger_times = self._trigger_times, []
        for t in triggers:
            try:
                ts = datetime.fromisoformat(t.replace("Z", "+00:00")).timestamp()
            except ValueError:
                continue
            if ts <= now:
                self.metrics.network_programming.observe(now - ts)
        for policy, n in self._tallies.no_local.items():
            self.metrics.no_local_endpoints.labels(policy).set(n)
        if self._hc is not None and self._tallies.health_checks_changed:
            self._tallies.health_checks_changed = False
            self._hc.update(self._tallies.health_checks)


K = TypeVar("K")
V = TypeVar("V")


def _remember(d: dict[K, V], key: K, value: V, cap: int) -> None:
    """Set `key` as the most recent entry of `d`, dropping the oldest beyond `cap` entries."""
    d.pop(key, None)
    d[key] = value
    while len(d) > cap:
        del d[next(iter(d))]
