"""What only the eBPF mode does, with real sockets and packets: the datapath outlives the agent
(SIGKILL, a layout upgrade) with traffic running, UDP sockets of a removed endpoint are destroyed,
unconnected UDP keeps one backend per flow and sees replies from the service address,
getpeername() shows the service."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

from tests.kernel.conftest import CLIENT, NODE_EXT, PODS, Node, endpoint, fresh_node, service, slice_
from tests.kernel.test_behaviour import EP_HTTP
from tests.netlab import probe, socket_in, wait_for, who

UDP53 = [{"name": "dns", "port": 53, "protocol": "UDP"}]
EP_UDP = [{"name": "dns", "port": 8080, "protocol": "UDP"}]
NP = [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30090, "protocol": "TCP"}]


class Load:
    """New connections, back to back: from a pod to the cluster IP and from outside to the NodePort."""

    def __init__(self, n: Node, ip: str) -> None:
        self.n, self.ip = n, ip
        self.tried = 0
        self.failed: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for answer in (self.n.probe(self.ip, 80, src="pod-c", timeout=1), self.n.probe(NODE_EXT, 30090, timeout=1)):
                self.tried += 1
                if not answer.startswith(("pod-a", "pod-b")):
                    self.failed.append((time.monotonic(), answer))
            time.sleep(0.01)

    def __enter__(self) -> Load:
        self._t.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._t.join(10)


def _pins(n: Node) -> Path:
    bpffs = n.extra_args[n.extra_args.index("--ebpf-bpffs-root") + 1]
    return Path(bpffs) / "kube-proxy-agent"


def _web(n: Node) -> str:
    ip = n.cluster_ip()[0]
    n.apply("web", [service("web", ip, NP, type="NodePort"),
                    slice_("web-1", "web", [endpoint("pod-a"), endpoint("pod-b")], EP_HTTP)])
    return ip


def test_sigkill_and_restart_under_traffic_lose_no_connection(mode: str) -> None:
    if mode != "ebpf":
        return
    with fresh_node(mode) as n:
        ip = _web(n)
        with Load(n, ip) as load:
            time.sleep(0.5)
            n.proc.kill()
            n.proc.wait()
            time.sleep(1)  # no agent: the pinned programs and maps serve
            n.start()
            time.sleep(1)
        assert load.tried > 40 and load.failed == [], (load.tried, load.failed)


def test_layout_upgrade_with_traffic_running(mode: str) -> None:
    """A new agent whose map layout differs: new maps under a new pin path, filled, then attached,
    then the old programs detached and their maps removed. No connection fails."""
    if mode != "ebpf":
        return
    with fresh_node(mode) as n:
        ip = _web(n)
        assert (_pins(n) / "v1" / "svcs").exists()
        with Load(n, ip) as load:
            n.stop()
            os.environ["KPA_EBPF_LAYOUT"] = "2"
            try:
                n.start()
            finally:
                del os.environ["KPA_EBPF_LAYOUT"]
            assert wait_for(lambda: not (_pins(n) / "v1").exists(), 10), n.log_tail()
            time.sleep(1)
        assert (_pins(n) / "v2" / "svcs").exists() and (_pins(n) / "v2" / "progs" / "kpa_connect4").exists()
        assert load.tried > 20 and load.failed == [], (load.tried, load.failed)


def test_udp_socket_of_a_removed_endpoint_is_destroyed_and_reconnects_elsewhere(mode: str) -> None:
    """A DNS-like client keeps one connected UDP socket. When its endpoint goes, the socket is
    destroyed (the application gets an error), and a new socket reaches a live endpoint."""
    if mode != "ebpf":
        return
    with fresh_node(mode) as n:
        ip = n.cluster_ip()[0]
        n.apply("dns", [service("dns", ip, UDP53), slice_("dns-1", "dns", [endpoint("pod-a")], EP_UDP)])
        s = socket_in(n.pods["pod-c"], socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(2)
        s.connect((ip, 53))
        s.send(b"q\n")
        assert s.recv(100).decode().startswith("pod-a")
        assert s.getpeername() == (ip, 53)  # the service, not the backend
        n.apply("dns", [service("dns", ip, UDP53), slice_("dns-1", "dns", [endpoint("pod-b")], EP_UDP)])

        def destroyed() -> bool:
            try:
                s.send(b"q\n")
                s.recv(100)
            except OSError:
                return True
            return False
        assert wait_for(destroyed, 10), n.log_tail()
        assert "destroyed UDP sockets" in n.log.read_text()
        assert n.probe(ip, 53, "udp", src="pod-c").startswith("pod-b")


def test_unconnected_udp_keeps_one_backend_and_sees_the_service_address(mode: str) -> None:
    if mode != "ebpf":
        return
    with fresh_node(mode) as n:
        ip = n.cluster_ip()[0]
        n.apply("dns", [service("dns", ip, UDP53),
                        slice_("dns-1", "dns", [endpoint("pod-a"), endpoint("pod-b"), endpoint("pod-r")], EP_UDP)])
        s = socket_in(n.pods["pod-c"], socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(2)
        answers, sources = [], set()
        for _ in range(12):
            s.sendto(b"q\n", (ip, 53))
            data, src = s.recvfrom(100)
            answers.append(data.decode())
            sources.add(src)
        assert len(who(answers)) == 1  # one flow, one backend
        assert sources == {(ip, 53)}  # replies come from the service address
        # a new socket is a new flow: over a few of them, more than one backend answers
        picked = set()
        for _ in range(20):
            t = socket_in(n.pods["pod-c"], socket.AF_INET, socket.SOCK_DGRAM)
            t.settimeout(2)
            t.sendto(b"q\n", (ip, 53))
            picked |= who([t.recvfrom(100)[0].decode()])
            t.close()
        assert len(picked) > 1


def test_outside_client_is_not_seen_by_socket_hooks_but_by_tc(mode: str) -> None:
    """The outside client's sockets are outside the node's cgroup: its NodePort traffic is NATed by
    the tc program on the node's interface (client address kept with policy Local)."""
    if mode != "ebpf":
        return
    with fresh_node(mode) as n:
        ip = n.cluster_ip()[0]
        ports = [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30091, "protocol": "TCP"}]
        n.apply("loc", [service("loc", ip, ports, type="NodePort", externalTrafficPolicy="Local"),
                        slice_("loc-1", "loc", [endpoint("pod-b"), endpoint("pod-r")], EP_HTTP)])
        assert set(n.answers(NODE_EXT, 30091, n=6)) == {f"pod-b {CLIENT}"}
        assert probe(n.pods["pod-c"], NODE_EXT, 30091).startswith(("pod-b", "pod-r"))  # short circuit
        assert PODS["pod-b"][0]
