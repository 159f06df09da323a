"""The sync loop survives a mode that raises something other than SyncError (a bug, or a command
that hung and was killed): one log line with the traceback, counted as a failed sync, and the
next sync is full."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import pytest

from agent.backends.base import SyncResult
from agent.health import ProxyHealth
from agent.metrics import Metrics
from agent.model.desired import Changes, DesiredState
from agent.model.state import ClusterModel
from agent.sync.loop import KINDS, SyncLoop


class Flaky:
    name = "flaky"

    def __init__(self) -> None:
        self.calls: list[bool] = []

    def sync(self, desired: Mapping[int, DesiredState], changes: Mapping[int, Changes], *, full: bool) -> SyncResult:
        self.calls.append(full)
        if len(self.calls) == 2:
            raise KeyError("a bug")
        return SyncResult()


def test_an_unexpected_error_is_a_failed_sync_and_the_next_is_full(caplog: pytest.LogCaptureFixture) -> None:
    backend = Flaky()
    loop = SyncLoop(ClusterModel("node-a"), backend, Metrics(), ProxyHealth(60), node_name="node-a")  # type: ignore[arg-type]
    for kind in KINDS:
        loop.replace_all(kind, {})
    with caplog.at_level(logging.ERROR, logger="agent.sync"):
        assert loop.sync(full=True)
        assert not loop.sync(full=False)  # raised KeyError: not propagated
        assert loop.sync(full=False)
    assert backend.calls == [True, False, True]
    assert loop.failures == 1
    failed = [r for r in caplog.records if "sync failed" in r.getMessage()]
    assert len(failed) == 1 and failed[0].exc_info is not None
