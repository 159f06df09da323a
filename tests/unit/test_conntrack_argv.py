"""Which UDP conntrack entries each kind of stale flow deletes (the conntrack command line)."""

from __future__ import annotations

from agent.kernel.conntrack import argv_for
from agent.model.state import StaleFlow


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
