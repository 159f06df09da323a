"""A live node switched from one proxy mode to another and back, with connections running all
the time: the new mode programs its datapath, then removes what the old one left; no connection
fails and nothing of the old mode remains.

  nftables run (host): iptables -> nftables -> iptables
  ebpf run (host): iptables -> ebpf -> iptables
  ipvs run (UML guest): iptables -> ipvs -> iptables ("off IPVS", the way users leave it)
"""

from __future__ import annotations

import os
import threading
import time

from tests.kernel.conftest import Node, endpoint, fresh_node, service, slice_
from tests.kernel.test_behaviour import EP_HTTP, HTTP
from tests.netlab import wait_for

UDP53 = [{"name": "dns", "port": 53, "protocol": "UDP"}]
EP_UDP = [{"name": "dns", "port": 8080, "protocol": "UDP"}]


class Traffic:
    """New TCP and UDP connections from a pod to two Services, back to back, until stopped."""

    def __init__(self, n: Node, tcp_ip: str, udp_ip: str) -> None:
        self.n, self.tcp_ip, self.udp_ip = n, tcp_ip, udp_ip
        self.tried = 0
        self.failed: list[tuple[float, str, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for proto, ip, port in (("tcp", self.tcp_ip, 80), ("udp", self.udp_ip, 53)):
                answer = self.n.probe(ip, port, proto, src="pod-c", timeout=1)
                self.tried += 1
                if not answer.startswith(("pod-a", "pod-b")):
                    self.failed.append((time.monotonic(), proto, answer))
            time.sleep(0.01)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(10)


def _state(n: Node, mode: str) -> str:
    """What `mode` holds in the node's kernel ("" when nothing)."""
    ex = n.lab.exec
    if mode == "iptables":
        variants = ["iptables-legacy-save"] + ([] if n.mode == "ipvs" or _uml() else ["iptables-nft-save"])
        return "".join(ln + "\n" for tool in variants for ln in ex(n.node, tool, check=False).splitlines()
                       if "KPA-" in ln)
    if mode == "nftables":
        return "".join(ln for ln in ex(n.node, "nft", "list", "tables", check=False).splitlines(True)
                       if "kube-proxy-agent" in ln)
    if mode == "ebpf":
        pins = n.extra_args[n.extra_args.index("--ebpf-bpffs-root") + 1] + "/kube-proxy-agent"
        tc = ex(n.node, "tc", "filter", "show", "dev", "ext0", "ingress", check=False)
        saved = ex(n.node, "iptables-save", check=False)
        return ("pins\n" if os.path.exists(pins) else "") + ("tc\n" if "kpa_" in tc else "") + (
            "KPAB-\n" if "KPAB-" in saved else "")
    if mode == "ipvs":
        links = ex(n.node, "ip", "-o", "link", "show")
        sets = ex(n.node, "ipset", "list", "-n", check=False)
        virtual = ex(n.node, "ipvsadm", "-Sn", check=False)
        return ("kpa-ipvs0\n" if "kpa-ipvs0" in links else "") + "".join(
            ln + "\n" for ln in sets.splitlines() if ln.startswith("KPAV")) + virtual
    raise AssertionError(mode)


def _uml() -> bool:
    from tests.uml import in_uml

    return in_uml()


def _switch(n: Node, to: str) -> None:
    old = n.mode
    n.stop()  # SIGTERM: the old mode's state stays and keeps serving
    n.mode = to
    n.start()
    assert wait_for(lambda: _state(n, old) == "", 30), f"{old} state left after switching to {to}:\n" \
        f"{_state(n, old)}\n{n.log_tail()}"


def test_switch_modes_on_a_live_node_without_losing_a_connection(mode: str) -> None:
    if mode not in ("nftables", "ipvs", "ebpf"):
        return
    with fresh_node(mode, start=False) as n:  # the node as `mode` needs it (e.g. its cgroup), started as iptables
        n.mode = "iptables"
        n.start()
        tcp, udp = n.cluster_ip(), n.cluster_ip()
        n.apply("svc", [service("web", tcp[0], HTTP), slice_("web-1", "web", [endpoint("pod-a"), endpoint("pod-b")],
                                                              EP_HTTP),
                        service("dns", udp[0], UDP53), slice_("dns-1", "dns", [endpoint("pod-a")], EP_UDP)])
        with Traffic(n, tcp[0], udp[0]) as traffic:
            time.sleep(1)
            _switch(n, mode)
            assert _state(n, mode) != ""
            time.sleep(1)
            _switch(n, "iptables")
            time.sleep(1)
        assert traffic.tried > 50
        assert traffic.failed == [], f"{len(traffic.failed)} of {traffic.tried} connections failed: {traffic.failed}"
        assert "could not remove" not in n.log.read_text()
