"""Which UDP conntrack entries each kind of stale flow deletes (the conntrack command line)."""

from __future__ import annotations

import threading

from agent.kernel.conntrack import Cleaner, argv_for
from agent.model.state import StaleFlow
from tests.netlab import wait_for


def test_endpoint_gone_deletes_flows_dnated_to_it() -> None:
    assert argv_for(StaleFlow(4, "10.96.0.10", 53, "10.244.1.5")) == [
        "conntrack", "-D", "-f", "ipv4", "-p", "udp", "--orig-dst", "10.96.0.10", "--orig-port-dst", "53",
        "--dst-nat", "10.244.1.5"]


def test_first_endpoint_deletes_only_flows_that_were_not_dnated() -> None:
    # the reply of a flow that was never DNATed would come from the ClusterIP itself; flows the new
    # rules already sent to an endpoint stay (deleting one mid-request loses its reply)
    assert argv_for(StaleFlow(6, "fd00:96::a", 53, None)) == [
        "conntrack", "-D", "-f", "ipv6", "-p", "udp", "--orig-dst", "fd00:96::a", "--orig-port-dst", "53",
        "--reply-src", "fd00:96::a"]


def test_first_endpoint_of_a_node_port() -> None:
    assert argv_for(StaleFlow(4, None, 30053, None)) == [
        "conntrack", "-D", "-f", "ipv4", "-p", "udp", "--orig-port-dst", "30053", "--reply-port-src", "30053"]
    assert argv_for(StaleFlow(4, None, 30053, "10.244.1.5"))[-2:] == ["--dst-nat", "10.244.1.5"]


def test_cleaner_flushes_in_order_off_the_caller_thread_without_duplicates() -> None:
    batches: list[list[StaleFlow]] = []
    release = threading.Event()

    def slow_flush(flows: list[StaleFlow]) -> None:
        release.wait(5)
        batches.append(flows)

    cleaner = Cleaner(flush_fn=slow_flush)
    a, b, c = (StaleFlow(4, f"10.96.0.{i}", 53, None) for i in (1, 2, 3))
    cleaner.submit([a])  # the worker takes it and blocks in flush: submit returned at once
    cleaner.submit([b, c, b])
    cleaner.submit([c])
    release.set()
    assert cleaner.idle(5)
    assert [f for batch in batches for f in batch] == [a, b, c]


def test_cleaner_queue_is_bounded() -> None:
    batches: list[list[StaleFlow]] = []
    release = threading.Event()

    def slow_flush(flows: list[StaleFlow]) -> None:
        release.wait(5)
        batches.append(flows)

    cleaner = Cleaner(limit=3, flush_fn=slow_flush)
    cleaner.submit([StaleFlow(4, "10.96.1.1", 1, None)])
    assert wait_for(lambda: not cleaner._pending, 5)  # taken by the worker
    cleaner.submit([StaleFlow(4, "10.96.1.1", p, None) for p in range(2, 8)])
    release.set()
    assert cleaner.idle(5)
    assert [f.port for f in batches[1]] == [5, 6, 7]  # the oldest waiting ones were dropped
