"""Which UDP conntrack entries each kind of stale flow deletes (the conntrack command line)."""

from __future__ import annotations

import threading

from agent.kernel.conntrack import Cleaner, argv_for, unanswered_tcp
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


LISTING = """\
tcp      6 117 SYN_SENT src=10.244.8.12 dst=10.96.78.48 sport=49302 dport=80 [UNREPLIED]\
 src=10.96.78.48 dst=10.244.8.12 sport=80 dport=49302
tcp      6 118 SYN_SENT src=10.244.8.12 dst=10.96.78.48 sport=49304 dport=80 [UNREPLIED]\
 src=10.244.8.13 dst=10.244.8.12 sport=8080 dport=49304
tcp      6 119 SYN_SENT src=10.244.8.12 dst=10.96.78.49 sport=49306 dport=80 [UNREPLIED]\
 src=10.96.78.49 dst=10.244.8.12 sport=80 dport=49306
tcp      6 119 SYN_SENT src=10.10.0.100 dst=10.10.0.8 sport=40000 dport=30080 [UNREPLIED]\
 src=10.10.0.8 dst=10.10.0.100 sport=30080 dport=40000
"""


def test_tcp_attempts_nobody_answered_are_deleted_one_by_one_dnated_ones_stay() -> None:
    """A TCP flow is named only by a port gaining its first endpoint: the attempts made before,
    never DNATed, go; one the new rules DNATed (49304) and other frontends' (10.96.78.49) stay."""
    flows = [StaleFlow(4, "10.96.78.48", 80, None, protocol="TCP"), StaleFlow(4, None, 30080, None, protocol="TCP")]
    assert unanswered_tcp(LISTING, flows) == [
        ["conntrack", "-D", "-f", "ipv4", "-p", "tcp", "--state", "SYN_SENT", "--orig-src", "10.244.8.12",
         "--orig-dst", "10.96.78.48", "--orig-port-src", "49302", "--orig-port-dst", "80"],
        ["conntrack", "-D", "-f", "ipv4", "-p", "tcp", "--state", "SYN_SENT", "--orig-src", "10.10.0.100",
         "--orig-dst", "10.10.0.8", "--orig-port-src", "40000", "--orig-port-dst", "30080"]]
    assert unanswered_tcp("", flows) == []
