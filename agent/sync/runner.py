"""Bounded-frequency runner: coalesce requests, at most one run per min interval, a full run at
least every max interval, a retry after a failure. The schedule is pure (an injected clock's
`now` goes in); `Runner` is the thin thread around it."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol


class Clock(Protocol):
    def __call__(self) -> float: ...


@dataclass(slots=True)
class Schedule:
    """When to sync, like kube-proxy's BoundedFrequencyRunner: never twice within `min_interval`,
    a full run at least every `max_interval`, and after a failure nothing until `retry_interval`
    has passed, when the failed run (full if it was full) is retried."""

    min_interval: float
    max_interval: float
    retry_interval: float
    last_run: float | None = None
    last_full: float | None = None
    requested: float | None = None
    retry_at: float | None = None
    retry_full: bool = False

    def request(self, now: float) -> None:
        if self.requested is None:
            self.requested = now

    def due(self, now: float) -> tuple[bool, bool, float]:
        """(run now?, must it be full?, seconds to wait otherwise)."""
        if self.last_run is None:
            return True, True, 0.0
        earliest = self.last_run + self.min_interval
        full_at = earliest if self.last_full is None else max(self.last_full + self.max_interval, earliest)
        if self.retry_at is not None:
            # A new request still runs after min_interval; otherwise wait for the retry.
            at = earliest if self.requested is not None else max(self.retry_at, earliest)
            if now >= at:
                return True, self.retry_full or now >= full_at, 0.0
            return False, False, at - now
        if now >= full_at:
            return True, True, 0.0
        if self.requested is not None:
            if now >= earliest:
                return True, False, 0.0
            return False, False, min(earliest, full_at) - now
        return False, False, full_at - now

    def done(self, started: float, ok: bool, full: bool) -> None:
        self.last_run = started
        if ok:
            self.retry_at = None
            self.retry_full = False
            if full:
                self.last_full = started
        else:
            self.retry_at = started + self.retry_interval
            self.retry_full = self.retry_full or full


class Runner:
    """Runs `fn(full)` on its own thread as the schedule allows. `fn` returns success."""

    def __init__(self, fn: Callable[[bool], bool], schedule: Schedule, clock: Clock = time.monotonic) -> None:
        self._fn = fn
        self._schedule = schedule
        self._clock = clock
        self._cond = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="sync-runner", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def run(self) -> None:
        """Ask for a sync soon."""
        with self._cond:
            self._schedule.request(self._clock())
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._stopped:
                        return
                    now = self._clock()
                    go, full, wait = self._schedule.due(now)
                    if go:
                        self._schedule.requested = None
                        break
                    self._cond.wait(timeout=wait)
            ok = False
            try:
                ok = self._fn(full)
            finally:
                with self._cond:
                    self._schedule.done(now, ok, full)
