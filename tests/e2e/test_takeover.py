"""Takeover from upstream kube-proxy and back, on a live node, with new TCP and UDP connections
running the whole time (issue 12, item 7):

  1. kube-proxy v1.37 (the same mode) serves the node;
  2. kube-proxy is stopped (its rules stay), the agent starts with --cleanup-kube-proxy: its first
     sync serves, then it removes kube-proxy's chains / table (never the kubelet's);
  3. back: the agent is stopped (its rules stay), kube-proxy starts and serves, then
     `kube-proxy-agent --cleanup --proxy-mode M` removes ours.

Every failed connection is counted with its time and phase; expected: none.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.cluster.harness import Harness, SimNode, agent_binary, ask, wait_until
from tests.e2e.conftest import REPORTS, mode_unsupported
from tests.e2e.support import cluster_ip, lone_node
from tests.e2e.traffic import Traffic

NS = "e2e-takeover"
PORTS = [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"},
         {"name": "dns", "port": 53, "targetPort": 8080, "protocol": "UDP"}]
KUBELET_CHAINS = ("KUBE-FIREWALL", "KUBE-KUBELET-CANARY")


def _iptables(node: SimNode) -> str:
    return "".join(subprocess.run(["ip", "netns", "exec", node.netns, tool], capture_output=True, text=True,
                                  check=False).stdout for tool in ("iptables-nft-save", "iptables-legacy-save"))


def _nft_tables(node: SimNode) -> str:
    return subprocess.run(["ip", "netns", "exec", node.netns, "nft", "list", "tables"], capture_output=True,
                          text=True, check=False).stdout


def kube_proxy_state(node: SimNode) -> list[str]:
    """kube-proxy's chains (not the kubelet's) and tables on the node."""
    chains = sorted(set(re.findall(r"^:(KUBE-[\w-]+)", _iptables(node), re.MULTILINE)) - set(KUBELET_CHAINS))
    return chains + re.findall(r"table ip6? kube-proxy$", _nft_tables(node), re.MULTILINE)


def agent_state(node: SimNode) -> list[str]:
    return (sorted(set(re.findall(r"^:(KPA-[\w-]+)", _iptables(node), re.MULTILINE)))
            + re.findall(r"table ip6? kube-proxy-agent$", _nft_tables(node), re.MULTILINE))


@pytest.fixture
def node(harness: Harness, mode: str) -> Iterator[SimNode]:
    if mode not in ("iptables", "nftables"):
        pytest.skip(f"kube-proxy has no {mode} mode to take over from in the same mode")
    why = mode_unsupported(mode)
    if why:
        pytest.skip(f"{mode} mode not usable here: {why}")
    with lone_node(harness, "tko-1", 5, "kube-proxy", mode, NS) as n:
        yield n


def test_takeover_from_kube_proxy_and_back_without_losing_a_connection(harness: Harness, node: SimNode,
                                                                        mode: str) -> None:
    h = harness
    ports = (("http", 8080, "TCP"), ("dns", 8080, "UDP"))
    for i in range(2):
        h.create_pod(NS, f"web-{i}", node, {"app": "web"}, ports=ports)
    client = h.create_pod(NS, "client", node, {"role": "client"}, ports=[], serve=False)
    ip = cluster_ip(h.create_service(NS, "web", PORTS, selector={"app": "web"}))
    wait_until(lambda: ask(client.netns, ip, 80, timeout=0.5).startswith("web-")
               and ask(client.netns, ip, 53, "udp", timeout=0.5).startswith("web-"), 60,
               what="kube-proxy serves the Service")
    assert kube_proxy_state(node), "kube-proxy programmed nothing"
    # the kubelet's chain (kube-proxy's iptables mode makes it too, as the kubelet does) and a jump
    # into it: the takeover must leave both alone
    subprocess.run(["ip", "netns", "exec", node.netns, "iptables", "-N", "KUBE-FIREWALL"], check=False,
                   capture_output=True)
    subprocess.run(["ip", "netns", "exec", node.netns, "iptables", "-A", "INPUT", "-m", "comment", "--comment",
                    "kubelet-test", "-j", "KUBE-FIREWALL"], check=True)
    targets = [("pod->ClusterIP TCP", client.netns, ip, 80, "tcp"), ("pod->ClusterIP UDP", client.netns, ip, 53, "udp")]
    with Traffic(targets, phase="kube-proxy") as traffic:
        time.sleep(2)
        # 2. the takeover
        traffic.phase = "kube-proxy stopped, agent --cleanup-kube-proxy"
        assert node.proxy is not None
        node.proxy.stop()
        node.proxy, node.proxy_kind, node.extra_args = None, "agent", ["--cleanup-kube-proxy"]
        h.start_proxy(node)
        wait_until(lambda: not kube_proxy_state(node), 30, what="kube-proxy's rules removed")
        traffic.phase = "agent alone"
        time.sleep(2)
        # 3. and back
        traffic.phase = "agent stopped, kube-proxy started, agent --cleanup"
        node.proxy.stop()
        node.proxy, node.proxy_kind, node.extra_args = None, "kube-proxy", []
        h.start_proxy(node)
        subprocess.run(["ip", "netns", "exec", node.netns, agent_binary(), "--cleanup", "--proxy-mode", mode,
                        "--hostname-override", node.name], check=True, capture_output=True, timeout=120)
        traffic.phase = "kube-proxy alone"
        time.sleep(2)
    REPORTS.append(traffic.table(f"takeover ({mode})"))
    log = (h.run_dir / "logs" / f"agent-{node.name}.log").read_text()
    assert re.search(r"takeover from kube-proxy: removed (kube-proxy's iptables|nftables table)", log), log[-2000:]
    assert not agent_state(node), agent_state(node)
    assert kube_proxy_state(node), "kube-proxy serves again"
    assert re.search(r"^-A INPUT -m comment --comment kubelet-test -j KUBE-FIREWALL$", _iptables(node),
                     re.MULTILINE), "the kubelet's chain went"
    assert not traffic.failed, traffic.failed[:20]
