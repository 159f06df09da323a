"""runner.Schedule: the bounded-frequency rules (kube-proxy's BoundedFrequencyRunner) as a pure
function of injected times, and the thin Runner thread around it.

min_interval: no two runs closer than this; max_interval: a full run at least this often;
retry_interval: how soon a failed run is retried.
"""

from __future__ import annotations

import threading

import pytest

from agent.sync.runner import Runner, Schedule

MIN, MAX, RETRY = 1.0, 30.0, 5.0


def simulate(
    schedule: Schedule,
    *,
    requests: list[float],
    until: float,
    fail: frozenset[int] = frozenset(),
) -> list[tuple[float, bool]]:
    """Drive the schedule as Runner does, with runs that take no time: returns (start, full) per run.
    `requests` are the times sources ask for a sync; `fail` holds the indexes of runs that fail."""
    runs: list[tuple[float, bool]] = []
    pending = sorted(requests)
    now = 0.0
    while now <= until:
        while pending and pending[0] <= now:
            schedule.request(pending.pop(0))
        go, full, wait = schedule.due(now)
        if go:
            schedule.requested = None  # Runner clears the request when it starts a run
            runs.append((now, full))
            schedule.done(now, len(runs) - 1 not in fail, full)
            assert len(runs) < 50, f"runaway: {runs[:8]} ..."
            continue
        assert wait > 0
        now = min([now + wait, *pending[:1]])
    return runs


CASES = [
    pytest.param([], 0.0, frozenset(), [(0.0, True)], id="first-run-is-full-at-once"),
    pytest.param([], 65.0, frozenset(), [(0.0, True), (30.0, True), (60.0, True)],
                 id="quiet-node-full-run-every-max-interval"),
    pytest.param([0.2, 0.3, 0.5], 5.0, frozenset(), [(0.0, True), (1.0, False)],
                 id="requests-coalesced-not-before-min-interval"),
    pytest.param([2.5], 5.0, frozenset(), [(0.0, True), (2.5, False)], id="request-after-min-interval-runs-at-once"),
    pytest.param([10.0, 20.0], 31.0, frozenset(), [(0.0, True), (10.0, False), (20.0, False), (30.0, True)],
                 id="partial-runs-do-not-postpone-the-periodic-full-run"),
    pytest.param([round(0.1 * i, 1) for i in range(1, 31)], 3.5, frozenset(),
                 [(0.0, True), (1.0, False), (2.0, False), (3.0, False)], id="request-stream-one-run-per-min-interval"),
    pytest.param([10.0], 20.0, frozenset({1}), [(0.0, True), (10.0, False), (15.0, False)],
                 id="failed-run-retried-after-retry-interval"),
    pytest.param([10.0, 11.5], 20.0, frozenset({1}), [(0.0, True), (10.0, False), (11.5, False)],
                 id="request-before-the-retry-runs-at-min-interval"),
    pytest.param([10.0], 20.0, frozenset({1, 2}), [(0.0, True), (10.0, False), (15.0, False), (20.0, False)],
                 id="retried-until-it-succeeds"),
]


@pytest.mark.parametrize(("requests", "until", "fail", "runs"), CASES)
def test_schedule(requests: list[float], until: float, fail: frozenset[int], runs: list[tuple[float, bool]]) -> None:
    assert simulate(Schedule(MIN, MAX, RETRY), requests=requests, until=until, fail=fail) == runs


def test_retry_shorter_than_min_interval_waits_for_min_interval() -> None:
    schedule = Schedule(min_interval=2.0, max_interval=MAX, retry_interval=0.5)
    assert simulate(schedule, requests=[10.0], until=20.0, fail=frozenset({1})) == [
        (0.0, True), (10.0, False), (12.0, False)]


def test_failed_full_run_stays_due_as_full() -> None:
    """The periodic full run at 30s fails: the next run is a full one again."""
    schedule = Schedule(MIN, MAX, RETRY)
    schedule.done(0.0, True, True)
    assert schedule.due(30.0) == (True, True, 0.0)
    schedule.done(30.0, False, True)
    assert schedule.due(35.0) == (True, True, 0.0)
    schedule.done(35.0, True, True)
    assert schedule.due(36.0) == (False, False, 29.0)  # the next full run is 30s after this one


def test_due_reports_how_long_to_wait() -> None:
    schedule = Schedule(MIN, MAX, RETRY)
    schedule.done(0.0, True, True)
    assert schedule.due(10.0) == (False, False, 20.0)  # until the periodic full run
    schedule.done(10.0, True, False)
    schedule.request(10.2)
    go, full, wait = schedule.due(10.2)
    assert (go, full) == (False, False)
    assert wait == pytest.approx(0.8)  # until min_interval after the last run
    schedule.done(10.0, False, False)
    schedule.requested = None
    assert schedule.due(12.0) == (False, False, 3.0)  # until the retry


def test_request_keeps_the_earliest_time() -> None:
    schedule = Schedule(MIN, MAX, RETRY)
    schedule.request(3.0)
    schedule.request(4.0)
    assert schedule.requested == 3.0


def test_failed_full_run_is_retried_after_retry_interval_not_at_once() -> None:
    """The periodic full run at 30s fails (say iptables-restore is locked): it is retried, as a full
    run, 5s later, like any failed run; BoundedFrequencyRunner never runs more often than min_interval."""
    runs = simulate(Schedule(MIN, MAX, RETRY), requests=[], until=40.0, fail=frozenset({1}))
    assert runs[:3] == [(0.0, True), (30.0, True), (35.0, True)]


def test_failed_first_run_is_retried_as_full() -> None:
    runs = simulate(Schedule(MIN, MAX, RETRY), requests=[], until=6.0, fail=frozenset({0}))
    assert runs == [(0.0, True), (5.0, True)]


def test_periodic_full_run_respects_min_interval() -> None:
    runs = simulate(Schedule(MIN, MAX, RETRY), requests=[29.5], until=31.0)
    assert runs == [(0.0, True), (29.5, False), (30.5, True)]


# -- Runner ----------------------------------------------------------------------------------


def test_runner_runs_full_first_then_on_request_and_stops() -> None:
    """The thread around the schedule: a full run at start, a partial run per request, then stop()."""
    calls: list[bool] = []
    ran = threading.Semaphore(0)

    def sync(full: bool) -> bool:
        calls.append(full)
        ran.release()
        return True

    runner = Runner(sync, Schedule(min_interval=0.0, max_interval=3600.0, retry_interval=0.01))
    runner.start()
    try:
        assert ran.acquire(timeout=5)
        runner.run()
        assert ran.acquire(timeout=5)
    finally:
        runner.stop()
    assert calls == [True, False]


def test_runner_retries_a_failed_run() -> None:
    calls: list[bool] = []
    ran = threading.Semaphore(0)

    def sync(full: bool) -> bool:
        calls.append(full)
        ran.release()
        return len(calls) > 2  # the first two runs fail

    runner = Runner(sync, Schedule(min_interval=0.0, max_interval=3600.0, retry_interval=0.01))
    runner.start()
    try:
        for _ in range(3):
            assert ran.acquire(timeout=5)
    finally:
        runner.stop()
    assert len(calls) == 3
    assert calls[0] is True
