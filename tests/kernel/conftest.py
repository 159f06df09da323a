"""One simulated node per proxy mode: the agent in a node namespace fed by --source files, pods
on a bridge, and a client outside the node.

    client (10.10.0.2, .3)  --ext--  node1 (10.10.0.1 | br0 10.244.1.1)  --br0--  pods a, b, c, r
                                     agent --source DIR                             (r "runs on node2")
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.backends import registry
from agent.backends.base import UnsupportedMode
from agent.backends.ebpf import host as ebpf_host
from agent.backends.registry import make_backend
from tests.modes import runnable, summary_lines
from tests.netlab import HOOKED, CgroupSockets, Lab, http_get, metric_sum, probe, wait_for
from tests.uml import in_uml

REPO = Path(__file__).resolve().parents[2]
AGENT = str(Path(sys.executable).parent / "kube-proxy-agent")
CLUSTER_CIDRS = "10.244.0.0/16,fd00:244::/32"
NODE_EXT = "10.10.0.1"
NODE_EXT6 = "fd00:10::1"
NODE_BR = "10.244.1.1"
CLIENT = "10.10.0.2"
CLIENT2 = "10.10.0.3"
CLIENT6 = "fd00:10::2"
PODS = {  # name -> (ipv4, ipv6, node)
    "pod-a": ("10.244.1.10", "fd00:244:1::10", "node1"),
    "pod-b": ("10.244.1.11", "fd00:244:1::11", "node1"),
    "pod-c": ("10.244.1.12", "fd00:244:1::12", "node1"),
    "pod-r": ("10.244.1.20", "fd00:244:1::20", "node2"),
}
POD_PORTS = [("tcp", 8080), ("udp", 8080), ("sctp", 8080), ("tcp", 9090)]
MODES = registry.MODES  # every mode; one this machine cannot run is skipped with the reason


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--proxy-mode", action="append", default=[], help="run kernel tests for this mode only")


def _modes(config: pytest.Config) -> list[str]:
    chosen = config.getoption("--proxy-mode") or list(MODES)
    return runnable(m for m in chosen if m in MODES)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    from tests.kernel.test_in_uml import UML_MODES

    for line in summary_lines("kernel tests", {m: "its suite runs inside a UML guest instead (test_in_uml)"
                                               for m in UML_MODES}):
        terminalreporter.write_line(line)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "mode" in metafunc.fixturenames:
        metafunc.parametrize("mode", _modes(metafunc.config), scope="module")


def _mode_supported(mode: str) -> str:
    try:
        make_backend(mode, (4,)).check_supported()
    except (UnsupportedMode, ImportError) as exc:
        return str(exc)
    return ""


def _threads(pid: int) -> str:
    """Each thread's state and kernel wait channel (what a stuck process is waiting for)."""
    out = []
    for tid in sorted(os.listdir(f"/proc/{pid}/task")):
        try:
            task = Path(f"/proc/{pid}/task/{tid}")
            comm = (task / "comm").read_text().strip()
            wchan = (task / "wchan").read_text().strip()
            state = next(ln for ln in (task / "status").read_text().splitlines() if ln.startswith("State:")).split()[1]
        except (OSError, StopIteration):
            continue
        out.append(f"  {tid} {comm} {state} {wchan}")
    kids = subprocess.run(["ps", "--ppid", str(pid), "-o", "pid,stat,etime,args"], capture_output=True, text=True)
    return "\n".join(out) + "\nchildren:\n" + kids.stdout


@dataclass
class Node:
    """The running agent and its world. Tests call apply()/remove() and probe from client or pods."""

    lab: Lab
    mode: str
    node: str
    client: str
    pods: dict[str, str]  # pod name -> namespace
    source: Path
    log: Path
    extra_args: list[str] = field(default_factory=list)
    proc: Any = None
    _ips: Iterator[int] = field(default_factory=lambda: itertools.count(10))

    def start(self) -> None:
        argv = [AGENT, "--proxy-mode", self.mode, "--source", str(self.source), "--hostname-override", "node1",
                "--cluster-cidr", CLUSTER_CIDRS, "--min-sync-period", "0s", "--sync-period", "20s",
                *self.extra_args]
        self.proc = self.lab.spawn(self.node, argv, str(self.log))
        # inside a UML guest every system call is slow, and more so on a busy host: the first sync
        # (dummy interface, sysctls, ipsets, iptables-legacy) took 16-40 s there
        first = 120 if in_uml() else 30
        assert wait_for(lambda: self.last_sync() > 0, first), f"agent never synced; log:\n{self.log_tail()}"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                where = _threads(self.proc.pid)
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"the agent did not exit within 30 s of SIGTERM; its threads:\n{where}\n"
                                     f"log:\n{self.log_tail()}") from None

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text().splitlines()[-n:])

    def http(self, port: int, path: str, ip: str = "127.0.0.1", ns: str | None = None,
             timeout: float = 3) -> tuple[int, str]:
        return http_get(ns or self.node, ip, port, path, timeout)

    def metrics(self) -> str:
        return self.http(10249, "/metrics")[1]

    def metric(self, name: str) -> float:
        return metric_sum(self.metrics(), name)

    def last_sync(self) -> float:
        try:
            return self.metric("kubeproxy_sync_proxy_rules_last_timestamp_seconds")
        except OSError:
            return 0.0

    def apply(self, name: str, objects: list[dict[str, Any]]) -> None:
        """Write one file of objects and wait until the agent has synced after it."""
        before = time.time()
        tmp = self.source / f".{name}.tmp"
        tmp.write_text(yaml.safe_dump_all(objects))
        tmp.rename(self.source / f"{name}.yaml")
        self.wait_sync(before)

    def remove(self, name: str) -> None:
        before = time.time()
        (self.source / f"{name}.yaml").unlink(missing_ok=True)
        self.wait_sync(before)

    def wait_sync(self, after: float, timeout: float = 20) -> None:
        """Until a sync that drained every change queued since `after` has succeeded (a sync that was
        already running when the change came does not count)."""
        def programmed() -> bool:
            try:
                return self.metric("kubeproxyagent_sync_proxy_rules_last_programmed_queued_timestamp_seconds") > after
            except OSError:
                return False
        assert wait_for(programmed, timeout), f"no sync after change:\n{self.log_tail()}"

    def cluster_ip(self) -> tuple[str, str]:
        n = next(self._ips)
        return f"10.96.0.{n}", f"fd00:96::{n:x}"

    def probe(self, ip: str, port: int, proto: str = "tcp", src: str | None = None, **kw: Any) -> str:
        """From the outside client (default) or from a pod namespace (src='pod-a')."""
        ns = self.pods[src] if src else self.client
        return probe(ns, ip, port, proto, **kw)

    def answers(self, ip: str, port: int, n: int = 1, **kw: Any) -> list[str]:
        return [self.probe(ip, port, **kw) for _ in range(n)]


def build_node(lab: Lab, mode: str, tmp: Path, extra_args: list[str]) -> Node:
    node = lab.ns("node")
    client = lab.ns("client")
    lab.sysctl(node, "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1")
    lab.exec(node, "ip", "link", "add", "br0", "type", "bridge")
    # a fixed MAC, as the bridge CNI plugin sets (a bridge otherwise takes its lowest port's MAC)
    lab.exec(node, "ip", "link", "set", "br0", "address", "02:6b:70:61:01:01")
    lab.exec(node, "ip", "link", "set", "br0", "up")
    lab.addr(node, "br0", f"{NODE_BR}/24", "fd00:244:1::1/64")
    n_ext, c_ext = lab.veth(node, client, "ext0", "eth0")
    lab.addr(node, n_ext, f"{NODE_EXT}/24", f"{NODE_EXT6}/64")
    lab.addr(client, c_ext, f"{CLIENT}/24", f"{CLIENT2}/24", f"{CLIENT6}/64")
    for cidr in ("10.96.0.0/16", "10.20.0.0/24"):
        lab.route(client, cidr, "via", NODE_EXT)
    for cidr in ("fd00:96::/64", "fd00:20::/64"):
        lab.route(client, cidr, "via", NODE_EXT6)
    # Like a real node, the service CIDR is not on the pod bridge (the default route would carry
    # it); a veth pair inside the node stands in so the node's own connections have a route.
    lab.exec(node, "ip", "link", "add", "svc0", "type", "veth", "peer", "name", "svc1")
    lab.exec(node, "ip", "link", "set", "svc0", "up")
    lab.exec(node, "ip", "link", "set", "svc1", "up")
    lab.route(node, "10.96.0.0/16", "dev", "svc0")
    lab.route(node, "fd00:96::/64", "dev", "svc0")
    pods: dict[str, str] = {}
    for name, (ip4, ip6, _) in PODS.items():
        ns = lab.ns(name)
        pods[name] = ns
        n_if, p_if = lab.veth(node, ns, None, "eth0")
        lab.exec(node, "ip", "link", "set", n_if, "master", "br0")
        # What the bridge CNI plugin's hairpinMode does: a pod may reach itself via its Service.
        lab.exec(node, "bridge", "link", "set", "dev", n_if, "hairpin", "on")
        lab.addr(ns, p_if, f"{ip4}/24", f"{ip6}/64")
        lab.route(ns, "default", "via", NODE_BR)
        lab.exec(ns, "ip", "-6", "route", "add", "default", "via", "fd00:244:1::1")
        lab.serve(ns, name, POD_PORTS)
    source = tmp / "source"
    source.mkdir()
    return Node(lab, mode, node, client, pods, source, tmp / "agent.log", extra_args)


@contextlib.contextmanager
def fresh_node(mode: str, extra_args: list[str] | None = None, start: bool = True) -> Iterator[Node]:
    """A new node world (agent started unless start=False); everything removed afterwards."""
    if os.geteuid() != 0:
        pytest.skip("kernel tests need root (network namespaces, iptables, nftables)")
    why = _mode_supported(mode)
    if why:
        pytest.skip(f"{mode} mode not usable here: {why}")
    tmp = Path(tempfile.mkdtemp(prefix=f"kpa-kernel-{mode}-"))
    lab = Lab()
    hooked: CgroupSockets | None = None
    bpffs = ""
    try:
        n = build_node(lab, mode, tmp, extra_args or [])
        if mode == "ebpf":
            # socket hooks act on a cgroup: this node's own one, holding the sockets of its pods and
            # of the node itself (a helper creates them there); the outside client stays outside.
            # Pins go under a directory of this node's own, on the one bpffs everything shares.
            hooked = CgroupSockets(f"{ebpf_host.cgroup2_root()}/kpa-{lab.tag}")
            for ns in [n.node, *n.pods.values()]:
                HOOKED[ns] = hooked
            bpffs = f"/sys/fs/bpf/kpa-{lab.tag}"
            n.extra_args += ["--ebpf-cgroup-root", hooked.cgroup, "--ebpf-bpffs-root", bpffs]
        (n.source / "node.yaml").write_text(yaml.safe_dump(
            {"kind": "Node", "apiVersion": "v1",
             "metadata": {"name": "node1", "labels": {"topology.kubernetes.io/zone": "zone-a"}}}))
        if start:
            n.start()
        yield n
        n.stop()
    finally:
        lab.close()
        if hooked is not None:
            for ns in [k for k, v in HOOKED.items() if v is hooked]:
                del HOOKED[ns]
            hooked.close()
        if bpffs:
            shutil.rmtree(bpffs, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def node(mode: str) -> Iterator[Node]:
    with fresh_node(mode) as n:
        yield n


# -- object builders -----------------------------------------------------------------------------

def service(name: str, ips: tuple[str, str] | str, ports: list[dict[str, Any]], ns: str = "default",
            labels: dict[str, str] | None = None, status: dict[str, Any] | None = None,
            **spec: Any) -> dict[str, Any]:
    cips = [ips] if isinstance(ips, str) else list(ips)
    body: dict[str, Any] = {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": ns, "labels": labels or {}},
        "spec": {"clusterIP": cips[0], "clusterIPs": cips, "ports": ports, **spec},
    }
    if status:
        body["status"] = status
    return body


def endpoint(pod: str, family: int = 4, ready: bool = True, serving: bool | None = None,
             terminating: bool = False, zones: list[str] | None = None, node: str | None = None) -> dict[str, Any]:
    ip4, ip6, pod_node = PODS[pod]
    ep: dict[str, Any] = {
        "addresses": [ip4 if family == 4 else ip6],
        "conditions": {"ready": ready, "serving": ready if serving is None else serving,
                       "terminating": terminating},
        "nodeName": node or pod_node,
    }
    if zones is not None:
        ep["hints"] = {"forZones": [{"name": z} for z in zones]}
    return ep


def slice_(name: str, svc: str, endpoints: list[dict[str, Any]], ports: list[dict[str, Any]],
           family: int = 4, ns: str = "default") -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": ns, "labels": {"kubernetes.io/service-name": svc}},
        "addressType": "IPv4" if family == 4 else "IPv6",
        "endpoints": endpoints, "ports": ports,
    }
