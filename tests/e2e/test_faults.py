"""Zero lost connections through the faults a node proxy meets (issue 12, items 1, 2 and 4), in
every mode: new TCP and UDP connections from a pod to a ClusterIP and TCP from outside to a
NodePort run the whole time, through

  - the agent SIGKILLed and restarted, and SIGTERMed and restarted;
  - kube-apiserver down for 30 s and started again (watches resume or relist; nothing flushed);
  - the node's conntrack table flushed;
  - another tool adding its own nftables table and iptables chain.

Every failed connection is counted with its time and phase; expected: none.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.cluster.harness import Harness, SimNode, ask, wait_until
from tests.e2e.conftest import REPORTS, mode_unsupported
from tests.e2e.support import cluster_ip, lone_node, node_port
from tests.e2e.traffic import Traffic

NS = "e2e-faults"
PORTS = [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"},
         {"name": "dns", "port": 53, "targetPort": 8080, "protocol": "UDP"}]


@pytest.fixture
def node(harness: Harness, mode: str) -> Iterator[SimNode]:
    why = mode_unsupported(mode)
    if why:
        pytest.skip(f"{mode} mode not usable here: {why}")
    with lone_node(harness, "flt-1", 6, "agent", mode, NS) as n:
        yield n


def _on_node(node: SimNode, *argv: str) -> None:
    subprocess.run(["ip", "netns", "exec", node.netns, *argv], check=True, capture_output=True, timeout=60)


def test_no_connection_lost_through_faults(harness: Harness, node: SimNode, mode: str) -> None:
    h = harness
    for i in range(2):
        h.create_pod(NS, f"web-{i}", node, {"app": "web"}, ports=(("http", 8080, "TCP"), ("dns", 8080, "UDP")))
    client = h.create_pod(NS, "client", node, {"role": "client"}, ports=[], serve=False)
    svc = h.create_service(NS, "web", PORTS, selector={"app": "web"}, type="NodePort")
    ip, np = cluster_ip(svc), node_port(svc)
    wait_until(lambda: ask(client.netns, ip, 80, timeout=0.5).startswith("web-")
               and ask(h.client, node.ip, np, timeout=0.5).startswith("web-"), 60, what="the Service answers")
    targets = [("pod->ClusterIP TCP", client.netns, ip, 80, "tcp"), ("pod->ClusterIP UDP", client.netns, ip, 53, "udp"),
               ("outside->NodePort TCP", h.client, node.ip, np, "tcp")]
    with Traffic(targets, phase="steady") as traffic:
        time.sleep(2)
        assert node.proxy is not None
        traffic.phase = "agent SIGKILLed, restarted"
        node.proxy.kill()
        time.sleep(1)
        h.start_proxy(node)
        traffic.phase = "agent SIGTERMed, restarted"
        node.proxy.stop()
        time.sleep(1)
        h.start_proxy(node)
        traffic.phase = "kube-apiserver down 30 s, restarted"
        h.restart_apiserver(down=30)
        traffic.phase = "conntrack table flushed"
        _on_node(node, "conntrack", "-F")
        time.sleep(2)
        traffic.phase = "a foreign nftables table and iptables chain added"
        _on_node(node, "nft", "add table ip someone-else; add chain ip someone-else pre "
                 "{ type filter hook prerouting priority -300 ; }; add rule ip someone-else pre counter")
        _on_node(node, "iptables", "-N", "SOMEONE-ELSE")
        _on_node(node, "iptables", "-I", "FORWARD", "-j", "SOMEONE-ELSE")
        time.sleep(3)
        traffic.phase = "steady after"
        time.sleep(2)
    REPORTS.append(traffic.table(f"faults ({mode})"))
    # the foreign objects are still there: the agent never touches them
    out = subprocess.run(["ip", "netns", "exec", node.netns, "nft", "list", "tables"], capture_output=True, text=True)
    assert "table ip someone-else" in out.stdout
    assert not traffic.failed, (f"{len(traffic.failed)} of {sum(traffic.tried.values())} connections failed: "
                                f"{traffic.failed[:10]} client ports {traffic.ports[:10]}")
