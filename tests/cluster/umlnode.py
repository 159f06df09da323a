"""A node of the test cluster that is a user-mode-linux guest: its kernel has IPVS, this machine's
does not. The guest runs tests/cluster/guestd.py: its network, its proxy (kube-proxy-agent or
upstream kube-proxy, against the harness's real apiserver), its pods; this side registers the Node,
creates Pods through the API (the harness plays kubelet for them), and asks the guest for probes.

    host root namespace: tap <host> on the apiserver bridge; tap <lan> on a bridge joined to the
                         LAN namespace's lan0 by a veth pair
    guest:               eth0 (LAN, 10.10.0.N), host0 (10.250.X.1N), br0 10.244.N.1/24 with the pods
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.cluster.harness import CLUSTER_CIDR, LAN_NET, SERVICE_CIDR, Harness, Pod, SimNode, sh, wait_until
from tests.netlab import recv_line
from tests.uml import Guest

RPC_PORT = 7777


@dataclass
class UmlNode:
    h: Harness
    sim: SimNode
    guest: Guest
    taps: list[str]
    pods: dict[str, Pod] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.sim.name

    def rpc(self, op: str, wait: float = 30, **kw: Any) -> dict[str, Any]:
        with socket.create_connection((self.sim.host_ip, RPC_PORT), timeout=wait) as s:
            s.settimeout(wait)
            s.sendall(json.dumps({"op": op, **kw}).encode() + b"\n")
            data = recv_line(s)
        out: dict[str, Any] = json.loads(data)
        if "error" in out:
            raise RuntimeError(f"{self.name}: {op} failed in the guest: {out['error']}")
        return out

    def probe(self, src: str, ip: str, port: int, proto: str = "tcp", timeout: float = 1.0) -> str:
        return str(self.rpc("probe", wait=timeout + 10, src=src, ip=ip, port=port, proto=proto,
                            timeout=timeout)["reply"])

    def exec(self, *argv: str) -> str:
        return str(self.rpc("exec", argv=list(argv))["out"])

    def create_pod(self, namespace: str, name: str, labels: dict[str, str],
                   ports: tuple[tuple[str, int, str], ...] = (("http", 8080, "TCP"),), ready: bool = True) -> Pod:
        spec_ports = [{"containerPort": p, "protocol": proto, **({"name": n} if n else {})} for n, p, proto in ports]
        self.h.api.create({
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": namespace, "labels": labels},
            "spec": {"nodeName": self.name, "automountServiceAccountToken": False,
                     "containers": [{"name": "echo", "image": "registry.invalid/kpa-echo:1", "ports": spec_ports}]},
        })
        ip = self.sim.next_pod_ip()
        self.rpc("pod_add", name=name, ip=ip, ports=[[proto.lower(), p] for _, p, proto in ports])
        pod = Pod(namespace, name, self.sim, ip, "", list(ports), dict(labels))
        self.pods[name] = pod
        self.h.report_status(pod, ready)
        return pod

    def delete_pod(self, pod: Pod) -> None:
        self.h.api.delete(pod.path, grace=0)
        self.rpc("pod_del", name=pod.name)
        self.pods.pop(pod.name, None)

    def log(self) -> str:
        path = self.h.run_dir / "logs" / f"{self.sim.proxy_kind}-{self.name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.rpc("shutdown", wait=5)
        self.guest.stop(timeout=30)
        for tap in self.taps:
            sh("ip", "link", "del", tap, check=False)
        with contextlib.suppress(Exception):  # the apiserver may be gone already
            self.h.api.delete(f"/api/v1/nodes/{self.name}", grace=0)


def _lan_bridge(h: Harness) -> str:
    """A root-namespace bridge joined to the LAN (lan0 in its namespace) by a veth pair: taps
    cannot be moved into a namespace the UML process is not in."""
    br = f"kpl{h.tag[1:5]}"
    if sh("ip", "link", "show", br, check=False):
        return br
    assert h._state is not None
    h._state.add_link(br)
    sh("ip", "link", "add", br, "type", "bridge")
    sh("ip", "link", "set", br, "up")
    root_side, lan_side = f"kpr{h.tag[1:5]}", f"kpn{h.tag[1:5]}"
    h._state.add_link(root_side)
    sh("ip", "link", "add", root_side, "type", "veth", "peer", "name", lan_side, "netns", h.lan)
    sh("ip", "link", "set", root_side, "master", br)
    sh("ip", "link", "set", root_side, "up")
    sh("ip", "-n", h.lan, "link", "set", lan_side, "master", "lan0")
    sh("ip", "-n", h.lan, "link", "set", lan_side, "up")
    return br


def start_uml_node(h: Harness, name: str, index: int, proxy: str, mode: str,
                   peers: list[UmlNode | SimNode] = (), start_proxy: bool = True,  # type: ignore[assignment]
                   mem: str = "768M") -> UmlNode:
    """Boot a guest as node `name` (LAN 10.10.0.<index>), its proxy started; returns once the guest
    answers and the proxy has synced (without `start_proxy`: once the guest answers, no proxy
    running; `node.rpc("proxy", action="start")` starts it)."""
    assert h.cp is not None and h._state is not None
    sim = SimNode(name, index, "", f"{LAN_NET}.{index}", f"{h.host_net}.{10 + index}",
                  f"zone-{chr(ord('a') + index - 1)}", proxy, mode)
    taps = [f"kpt{h.tag[1:5]}{index}l", f"kpt{h.tag[1:5]}{index}h"]
    lan_br = _lan_bridge(h)
    for tap, bridge in zip(taps, (lan_br, h.host_bridge), strict=True):
        h._state.add_link(tap)
        sh("ip", "tuntap", "add", tap, "mode", "tap")
        sh("ip", "link", "set", tap, "master", bridge)
        sh("ip", "link", "set", tap, "up")
    h._register_node(sim)
    argv = h.proxy_argv(sim)
    if proxy == "kube-proxy":
        argv = [a for a in argv if not a.startswith("--proxy-mode")] + [f"--proxy-mode={mode}"]
    peer_sims = [p.sim if isinstance(p, UmlNode) else p for p in peers]
    log = h.run_dir / "logs" / f"{proxy}-{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    cfg = {
        "name": name, "lan_ip": sim.ip, "host_ip": sim.host_ip, "gateway": sim.gateway,
        "bridge_mac": f"02:6b:70:61:{index:02x}:01", "service_cidr": SERVICE_CIDR,
        "peers": [[p.pod_cidr, p.ip] for p in peer_sims], "proxy_argv": argv, "proxy_log": str(log),
        "port": RPC_PORT, "ready_file": str(h.run_dir / f"{name}.ready"), "legacy_iptables": True,
        "cluster_cidr": CLUSTER_CIDR, "start_proxy": start_proxy,
    }
    cfg_path = h.run_dir / f"{name}.json"
    cfg_path.write_text(json.dumps(cfg))
    guestd = Path(__file__).with_name("guestd.py")
    import sys

    guest = Guest([sys.executable, str(guestd), str(cfg_path)], mem=mem,
                  extra_args=[f"vec0:transport=tap,ifname={taps[0]}", f"vec1:transport=tap,ifname={taps[1]}"],
                  log=h.run_dir / "logs" / f"uml-{name}.console")
    node = UmlNode(h, sim, guest, taps)
    try:
        wait_until(lambda: (h.run_dir / f"{name}.ready").exists() or not guest.running(), 120,
                   what=f"UML node {name} to boot")
        if not guest.running():
            raise RuntimeError(f"UML node {name} ended: {guest.output()[-2000:]}")
        for p in peer_sims:  # the other nodes reach this node's pods through its LAN address
            if p.netns:
                h.lab.route(p.netns, sim.pod_cidr, "via", sim.ip)
        if start_proxy:
            t0 = time.monotonic()
            wait_until(lambda: _synced(node), 180, interval=0.5, what=f"{proxy} on {name} to sync")
            h.say(f"{proxy} ({mode}) on UML node {name} synced in {time.monotonic() - t0:.1f}s")
    except BaseException:
        node.close()
        raise
    return node


def _synced(node: UmlNode) -> bool:
    out = node.exec("python3", "-c", "import urllib.request;print(urllib.request.urlopen("
                    "'http://127.0.0.1:10249/metrics',timeout=2).read().decode())")
    for line in out.splitlines():  # kube-proxy labels it with ip_family, the agent does not
        if (line.startswith("kubeproxy_sync_proxy_rules_last_timestamp_seconds")
                and float(line.rsplit(" ", 1)[1]) > 0):
            return True
    return False
