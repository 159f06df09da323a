"""A whole cluster on one machine, no Docker and no kubelet: the harness is the kubelet.

    root namespace: etcd (127.0.0.1), kube-apiserver (10.250.X.1 on bridge kpah<tag>; X is the
                    first /24 no concurrent run uses), kube-controller-manager, this process
         | veth "host0" per node (10.250.X.1N/24): the nodes' way to the apiserver
    node namespaces (one per simulated node): the proxy under test (kube-proxy-agent or upstream
         kube-proxy) with --hostname-override NODE; bridge br0 10.244.N.1/24 with the pods
         (hairpin on); the service CIDR routed via a veth pair svc0/svc1 (not via br0);
         "eth0" 10.10.0.N/24 on the LAN; routes to the other nodes' pod CIDRs via their LAN IPs
    lan namespace:  bridge lan0 joining every node and the outside client
    client namespace: the outside client, 10.10.0.100 and 10.10.0.101 (no cluster routes)
    pod namespaces: eth0 with an address from the node's pod CIDR, echo servers answering
                    "<pod name> <peer ip>" (port 8080) or "<pod name>:<port> <peer ip>" (others)

Playing kubelet: Node objects are registered (podCIDR, InternalIP, zone label); Pods are created
with spec.nodeName, started as namespaces, then their status (podIP(s), phase Running, Ready,
containerStatuses) is patched through the status subresource so the real EndpointSlice controller
publishes them. Readiness flips and graceful deletion (terminating endpoints) go the same way.

All traffic goes to loopback or to addresses created here. Everything is removed by close(), by
atexit, and, should this process die hard, by the next run (procs.sweep_stale).
"""

from __future__ import annotations

import atexit
import contextlib
import datetime as dt
import fcntl
import itertools
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.backends.ebpf.host import cgroup2_root
from tests.cluster.controlplane import ControlPlane, find_bins
from tests.cluster.kubeapi import JSON, Api, ApiError
from tests.cluster.procs import RUN_PREFIX, RUN_ROOT, Proc, RunState, sh, stop_all_processes, sweep_stale
from tests.netlab import HOOKED, CgroupSockets, EchoServer, Lab, http_get, metric_sum, probe

REPO = Path(__file__).resolve().parents[2]
# The apiserver's address: 10.250.X.1/24 on a root-namespace bridge, X = the first /24 of
# 10.250.0.0/16 no other run (concurrent harnesses are fine) has an address in.
HOST_NETS = "10.250"
LAN_NET = "10.10.0"
CLIENT_IP = "10.10.0.100"
CLIENT_IP2 = "10.10.0.101"
CLUSTER_CIDR = "10.244.0.0/16"
SERVICE_CIDR = "10.96.0.0/16"
ECHO_PORT = 8080


def agent_binary() -> str:
    """The agent under test: .venv's console script, or $KPA_AGENT_BIN (another build, e.g. to bisect)."""
    if os.environ.get("KPA_AGENT_BIN"):
        return os.environ["KPA_AGENT_BIN"]
    for cand in (REPO / ".venv" / "bin" / "kube-proxy-agent", Path(sys.executable).parent / "kube-proxy-agent"):
        if cand.exists():
            return str(cand)
    raise FileNotFoundError("kube-proxy-agent is not installed in .venv: run `make install`")


def now_rfc3339() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def wait_until(pred: Callable[[], Any], timeout: float = 30, interval: float = 0.05, what: str = "") -> Any:
    """Poll pred() until it returns something truthy; that value, or TimeoutError."""
    end = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > end:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what or pred}")
        time.sleep(interval)


# -- nodes -------------------------------------------------------------------------------------------

@dataclass
class SimNode:
    name: str
    index: int
    netns: str
    ip: str  # LAN address (the Node's InternalIP)
    host_ip: str  # on the veth to the root namespace
    zone: str
    proxy_kind: str  # "agent" or "kube-proxy"
    mode: str
    proxy: Proc | None = None
    extra_args: list[str] = field(default_factory=list)  # more agent flags (e.g. --cleanup-kube-proxy)
    _ips: Iterator[int] = field(default_factory=lambda: itertools.count(10))
    # eBPF mode: the node's own cgroup (its pods' and its own sockets are made there, so the
    # agent's socket hooks see them and no other node's) and its own directory on bpffs
    sockets: CgroupSockets | None = None
    bpffs: str = ""

    @property
    def pod_cidr(self) -> str:
        return f"10.244.{self.index}.0/24"

    @property
    def gateway(self) -> str:
        return f"10.244.{self.index}.1"

    def next_pod_ip(self) -> str:
        n = next(self._ips)
        if n > 254:
            raise RuntimeError(f"node {self.name} ran out of pod IPs")
        return f"10.244.{self.index}.{n}"

    # -- the proxy's own endpoints, from inside the node namespace
    def http_get(self, port: int, path: str, ip: str = "127.0.0.1", timeout: float = 3) -> tuple[int, str]:
        return http_get(self.netns, ip, port, path, timeout)

    def metrics(self) -> str:
        return self.http_get(10249, "/metrics")[1]

    def metric(self, name: str) -> float:
        return metric_sum(self.metrics(), name)

    def last_sync(self) -> float:
        try:
            return self.metric("kubeproxy_sync_proxy_rules_last_timestamp_seconds")
        except (OSError, ValueError, IndexError):
            return 0.0

    def wait_synced(self, after: float = 0.0, timeout: float = 60) -> None:
        def ok() -> bool:
            if self.proxy is not None and not self.proxy.running():
                raise RuntimeError(f"{self.proxy_kind} on {self.name} exited:\n{self.proxy.tail()}")
            return self.last_sync() > after
        wait_until(ok, timeout, 0.1, f"{self.proxy_kind} on {self.name} to sync")

    def rules(self) -> str:
        """What the proxy programmed, as text."""
        if self.proxy_kind == "agent" and self.mode == "nftables":
            return sh("ip", "netns", "exec", self.netns, "nft", "list", "ruleset", check=False)
        return sh("ip", "netns", "exec", self.netns, "iptables-save", check=False)


@dataclass
class Pod:
    namespace: str
    name: str
    node: SimNode
    ip: str
    netns: str
    ports: list[tuple[str, int, str]]  # (name, port, protocol)
    labels: dict[str, str]
    servers: list[EchoServer] = field(default_factory=list)
    ready: bool = False
    terminating: bool = False
    changed_at: float = 0.0  # monotonic time the API accepted the last status/deletion change

    @property
    def path(self) -> str:
        return f"/api/v1/namespaces/{self.namespace}/pods/{self.name}"


@dataclass
class Latency:
    proxy: str  # e.g. "iptables", "nftables", "kube-proxy"
    what: str
    seconds: float


class Harness:
    """Control plane + network + simulated nodes + the kubelet's job. Use as a context manager."""

    def __init__(self, log: Callable[[str], None] | None = None, bins: Path | None = None) -> None:
        self._log = log or (lambda m: print(m, flush=True))
        self.bins = bins
        self.tag = "h" + uuid.uuid4().hex[:5]
        self.run_dir = RUN_ROOT / f"{RUN_PREFIX}{self.tag}"
        self.lab = Lab(tag=self.tag)
        self.cp: ControlPlane | None = None
        self.nodes: dict[str, SimNode] = {}
        self.pods: dict[tuple[str, str], Pod] = {}
        self.latencies: list[Latency] = []
        self.lan = ""
        self.client = ""
        self.host_bridge = f"kpah{self.tag[1:5]}"
        self.host_net = ""
        self.api_ip = ""
        self._state: RunState | None = None
        self._closed = False
        self._lock = threading.Lock()
        self._pod_seq = itertools.count(1)
        self._canary_ready = False
        self._t0 = time.monotonic()
        self.sync_period = "10s"  # both proxies' periodic sync (the benchmark uses kube-proxy's 30s)

    # -- lifecycle ---------------------------------------------------------------------------------

    def say(self, msg: str) -> None:
        self._log(f"[{time.monotonic() - self._t0:6.1f}s] {msg}")

    def __enter__(self) -> Harness:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> Harness:
        if os.geteuid() != 0:
            raise PermissionError("the cluster harness needs root (network namespaces, iptables)")
        sweep_stale(self.say)
        self.run_dir.mkdir(parents=True)
        self._state = RunState(self.run_dir)
        self._state.set("netns_prefix", f"kpa-{self.tag}-")
        atexit.register(self.close)
        with contextlib.suppress(ValueError):  # not the main thread: pytest/demo handle signals
            if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
                signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
        bins = self.bins or find_bins()
        self.say(f"control plane binaries: {bins}")
        self._network()
        self.cp = ControlPlane(bins, self.run_dir, self.tag, api_ip=self.api_ip, log=self.say).start()
        self._kube_system_ready()
        return self

    def _network(self) -> None:
        """Root-side bridge for the apiserver, the LAN namespace and the outside client."""
        assert self._state is not None
        self._state.add_link(self.host_bridge)
        with open(RUN_ROOT / "kpa-harness.lock", "w") as lock:  # one run picks a subnet at a time
            fcntl.flock(lock, fcntl.LOCK_EX)
            used = set(re.findall(rf"inet {re.escape(HOST_NETS)}\.(\d+)\.", sh("ip", "-4", "addr", "show")))
            x = next((i for i in range(256) if str(i) not in used), None)
            if x is None:
                raise RuntimeError(f"no free /24 left in {HOST_NETS}.0.0/16 for the apiserver bridge")
            self.host_net = f"{HOST_NETS}.{x}"
            self.api_ip = f"{self.host_net}.1"
            sh("ip", "link", "add", self.host_bridge, "type", "bridge")
            sh("ip", "addr", "add", f"{self.api_ip}/24", "dev", self.host_bridge)
            sh("ip", "link", "set", self.host_bridge, "up")
        self.lan = self.lab.ns("lan")
        self.lab.exec(self.lan, "ip", "link", "add", "lan0", "type", "bridge")
        self.lab.exec(self.lan, "ip", "link", "set", "lan0", "up")
        self.client = self.lab.ns("client")
        self._lan_port(self.client, f"{CLIENT_IP}/24", f"{CLIENT_IP2}/24")
        self.say(f"network: apiserver address {self.api_ip} on {self.host_bridge}, LAN {LAN_NET}.0/24, "
                 f"outside client {CLIENT_IP}")

    def _lan_port(self, ns: str, *cidrs: str) -> None:
        side = self.lab.link_name("vl")
        sh("ip", "link", "add", side, "netns", self.lan, "type", "veth", "peer", "name", "eth0", "netns", ns)
        batch(self.lan, f"link set {side} master lan0", f"link set {side} up")
        batch(ns, "link set eth0 up", *[f"addr add {c} dev eth0" for c in cidrs])

    def _kube_system_ready(self) -> None:
        # The EndpointSlice controller's ServiceAccounts are made by the controller-manager itself.
        assert self.cp is not None
        wait_until(lambda: self._sa_exists("kube-system", "endpointslice-controller"), 60, 0.2,
                   "the controller-manager to start the endpointslice controller")

    def _sa_exists(self, ns: str, name: str) -> bool:
        try:
            self.api.get(f"/api/v1/namespaces/{ns}/serviceaccounts/{name}")
            return True
        except ApiError:
            return False

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        t0 = time.monotonic()
        for node in list(self.nodes.values()):
            if node.proxy is not None:
                node.proxy.stop(timeout=10)
        if self.cp is not None:
            self.cp.stop()
        stop_all_processes()
        self.lab.close()
        sh("ip", "link", "del", self.host_bridge, check=False)
        keep = os.environ.get("KPA_KEEP_RUN_DIR") == "1"
        if keep:  # logs and certs stay for a look; nothing left for the next run to sweep
            (self.run_dir / "state.json").unlink(missing_ok=True)
        else:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        self.say(f"torn down in {time.monotonic() - t0:.1f}s (processes, namespaces, links"
                 f"{'' if keep else ', ' + str(self.run_dir)})")

    @property
    def api(self) -> Api:
        assert self.cp is not None, "harness not started"
        return self.cp.admin

    # -- nodes -------------------------------------------------------------------------------------

    def add_node(self, name: str, index: int, proxy: str = "agent", mode: str = "iptables",
                 peers: Sequence[SimNode] = (), start_proxy: bool = True) -> SimNode:
        """A node namespace wired to the LAN and the apiserver, its Node object, and its proxy.
        If anything fails, whatever was made for the node is removed again."""
        assert self._state is not None and self.cp is not None
        ns = self.lab.ns(name)
        node = SimNode(name, index, ns, f"{LAN_NET}.{index}", f"{self.host_net}.{10 + index}",
                       f"zone-{chr(ord('a') + index - 1)}", proxy, mode)
        self.nodes[name] = node
        try:
            if proxy == "agent" and mode == "ebpf":
                node.sockets = CgroupSockets(f"{cgroup2_root()}/kpa-e2e-{self.tag}-{name}")
                HOOKED[ns] = node.sockets
                node.bpffs = f"/sys/fs/bpf/kpa-e2e-{self.tag}-{name}"
            self._wire_node(node, peers)
            self._register_node(node)
            if start_proxy:
                self.start_proxy(node)
        except BaseException:
            self.remove_node(node)
            raise
        return node

    def _wire_node(self, node: SimNode, peers: Sequence[SimNode]) -> None:
        assert self._state is not None
        ns = node.netns
        # icmp_ratelimit=0: the kernel's per-destination ICMP limit (1/s after a burst of 6) would
        # otherwise make a REJECTed connection attempt wait for a SYN retransmit whenever a test has
        # just probed the same client several times; tests check that rejection is immediate.
        self.lab.sysctl(ns, "net.ipv4.ip_forward=1", "net.ipv4.icmp_ratelimit=0")
        self._lan_port(ns, f"{node.ip}/24")
        root_side = f"kh{self.tag[1:5]}{node.index}"
        self._state.add_link(root_side)
        sh("ip", "link", "add", root_side, "type", "veth", "peer", "name", "host0", "netns", ns)
        sh("ip", "link", "set", root_side, "master", self.host_bridge)
        sh("ip", "link", "set", root_side, "up")
        batch(ns, "link set host0 up", f"addr add {node.host_ip}/24 dev host0",
              # a fixed MAC, as the bridge CNI plugin sets: a bridge otherwise takes its lowest port's
              # MAC, which changes when that pod goes, and pods' cached gateway entry then points nowhere
              "link add br0 type bridge", f"link set br0 address 02:6b:70:61:{node.index:02x}:01", "link set br0 up",
              f"addr add {node.gateway}/24 dev br0",
              # the service CIDR needs a route for the node's own connections, not via br0 (ICMP
              # redirects would rate-limit REJECT replies)
              "link add svc0 type veth peer name svc1", "link set svc0 up", "link set svc1 up",
              f"route add {SERVICE_CIDR} dev svc0")
        for peer in peers:
            self.lab.route(ns, peer.pod_cidr, "via", peer.ip)
            self.lab.route(peer.netns, node.pod_cidr, "via", node.ip)

    def _register_node(self, node: SimNode) -> None:
        now = now_rfc3339()
        body = {
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": node.name, "labels": {
                "kubernetes.io/hostname": node.name, "kubernetes.io/os": "linux",
                "topology.kubernetes.io/zone": node.zone}},
            "spec": {"podCIDR": node.pod_cidr, "podCIDRs": [node.pod_cidr]},
        }
        status = {"status": {
            "addresses": [{"type": "InternalIP", "address": node.ip}, {"type": "Hostname", "address": node.name}],
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                            "message": "simulated by the test harness", "lastHeartbeatTime": now,
                            "lastTransitionTime": now}],
            "capacity": {"cpu": "2", "memory": "4Gi", "pods": "110"},
            "allocatable": {"cpu": "2", "memory": "4Gi", "pods": "110"},
        }}
        self.api.create(body)
        self.api.patch(f"/api/v1/nodes/{node.name}/status", status)

    def proxy_argv(self, node: SimNode) -> list[str]:
        assert self.cp is not None
        if node.proxy_kind == "kube-proxy":
            return [str(self.cp.bins / "kube-proxy"), f"--kubeconfig={self.cp.kubeconfigs['kube-proxy']}",
                    f"--hostname-override={node.name}", f"--proxy-mode={node.mode}", f"--cluster-cidr={CLUSTER_CIDR}",
                    "--iptables-min-sync-period=0s", f"--iptables-sync-period={self.sync_period}",
                    # in IPVS mode kube-proxy ignores the iptables periods (its default minimum is 1 s)
                    "--ipvs-min-sync-period=0s", f"--ipvs-sync-period={self.sync_period}",
                    "--metrics-bind-address=127.0.0.1:10249", "--healthz-bind-address=0.0.0.0:10256",
                    "--conntrack-max-per-core=0", "--conntrack-tcp-timeout-established=0",
                    "--conntrack-tcp-timeout-close-wait=0", "--v=2"]
        argv = [agent_binary(), "--kubeconfig", str(self.cp.kubeconfigs["agent"]), "--hostname-override", node.name,
                "--proxy-mode", node.mode, "--cluster-cidr", CLUSTER_CIDR, "--min-sync-period", "0s",
                "--sync-period", self.sync_period, "--metrics-bind-address", "127.0.0.1:10249"]
        if node.sockets is not None:
            argv += ["--ebpf-cgroup-root", node.sockets.cgroup, "--ebpf-bpffs-root", node.bpffs]
        return argv + node.extra_args

    def node_env(self, node: SimNode) -> dict[str, str]:
        """What a node's proxy gets in its environment besides ours: its own xtables lock. Legacy
        iptables tools serialise on /run/xtables.lock, which every network namespace here shares;
        separate nodes do not share one, and with a shared lock one node's proxy waits for
        another's iptables-restore (seconds at 10k Services)."""
        return {"XTABLES_LOCKFILE": str(self.run_dir / f"xtables-{node.name}.lock")}

    def start_proxy(self, node: SimNode, wait: bool = True) -> float:
        """Start (or restart) the node's proxy; seconds until its first sync."""
        t0 = time.monotonic()
        wall = time.time()
        if node.proxy is None:
            node.proxy = Proc(f"{node.proxy_kind}@{node.name}", self.proxy_argv(node),
                              self.run_dir / "logs" / f"{node.proxy_kind}-{node.name}.log", self.tag,
                              netns=node.netns, keep_sys=node.sockets is not None, env=self.node_env(node))
        node.proxy.start()
        if wait:
            node.wait_synced(after=wall - 1)
        took = time.monotonic() - t0
        label = node.mode if node.proxy_kind == "agent" else "kube-proxy"
        self.say(f"{node.proxy_kind} ({label}) on {node.name} {'synced' if wait else 'started'} in {took:.1f}s")
        return took

    def remove_node(self, node: SimNode) -> None:
        for key, pod in list(self.pods.items()):
            if pod.node is node:
                with contextlib.suppress(Exception):  # best effort: the API may be down
                    self.api.delete(pod.path, grace=0)
                self._teardown_pod(pod)
                self.pods.pop(key, None)
        if node.proxy is not None:
            node.proxy.stop(timeout=10)
        with contextlib.suppress(Exception):
            self.api.delete(f"/api/v1/nodes/{node.name}", grace=0)
        HOOKED.pop(node.netns, None)
        if node.sockets is not None:
            node.sockets.close()
            node.sockets = None
        if node.bpffs:
            shutil.rmtree(node.bpffs, ignore_errors=True)
        self.lab.drop_ns(node.netns)
        self.nodes.pop(node.name, None)
        # a later node may reuse this index (same addresses, new MACs): forget the old neighbours
        for ns in [self.client, *(n.netns for n in self.nodes.values())]:
            for ip in (node.ip, node.host_ip):
                sh("ip", "-n", ns, "neigh", "flush", "to", ip, check=False)
        sh("ip", "neigh", "flush", "to", node.host_ip, check=False)

    # -- namespaces and pods (the kubelet's side) -----------------------------------------------------

    def namespace(self, name: str, labels: dict[str, str] | None = None) -> str:
        self.api.create({"apiVersion": "v1", "kind": "Namespace",
                         "metadata": {"name": name, "labels": labels or {}}}, exist_ok=True)
        # what the serviceaccount controller would do (Pod admission needs the default SA)
        self.api.create({"apiVersion": "v1", "kind": "ServiceAccount",
                         "metadata": {"name": "default", "namespace": name}}, exist_ok=True)
        return name

    def create_pod(self, namespace: str, name: str, node: SimNode, labels: dict[str, str] | None = None,
                   ports: Sequence[tuple[str, int, str]] = (("http", ECHO_PORT, "TCP"),),
                   ready: bool = True, serve: bool = True) -> Pod:
        """Create the Pod (bound to `node`), start it as a namespace, report it Running (Ready)."""
        spec_ports = [{"containerPort": p, "protocol": proto, **({"name": n} if n else {})} for n, p, proto in ports]
        self.api.create({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "labels": labels or {}},
            "spec": {"nodeName": node.name, "automountServiceAccountToken": False,
                     "terminationGracePeriodSeconds": 30,
                     "containers": [{"name": "echo", "image": "registry.invalid/kpa-echo:1", "ports": spec_ports}]},
        })
        ip = node.next_pod_ip()
        pns = self.lab.ns(f"pod{next(self._pod_seq)}")
        if node.sockets is not None:
            HOOKED[pns] = node.sockets
        pod = Pod(namespace, name, node, ip, pns, list(ports), dict(labels or {}))
        self.pods[(namespace, name)] = pod
        side = self.lab.link_name("vp")
        sh("ip", "link", "add", side, "netns", node.netns, "type", "veth", "peer", "name", "eth0", "netns", pns)
        # hairpin: what the bridge CNI plugin's hairpinMode does (a pod may reach itself via a Service)
        batch(node.netns, f"link set {side} master br0", f"link set {side} type bridge_slave hairpin on",
              f"link set {side} up")
        batch(pns, "link set eth0 up", f"addr add {ip}/24 dev eth0", f"route add default via {node.gateway}")
        if serve:
            for _, port, proto in ports:
                label = name if port == ECHO_PORT else f"{name}:{port}"
                pod.servers.append(self.lab.serve(pns, label, [(proto.lower(), port)], v6=False))
        self.report_status(pod, ready)
        return pod

    def report_status(self, pod: Pod, ready: bool) -> None:
        """PATCH pods/status the way kubelet reports a running container and its readiness probe."""
        now = now_rfc3339()
        flag = "True" if ready else "False"

        def cond(t: str, s: str) -> JSON:
            return {"type": t, "status": s, "lastProbeTime": None, "lastTransitionTime": now}

        status = {
            "phase": "Running", "podIP": pod.ip, "podIPs": [{"ip": pod.ip}],
            "hostIP": pod.node.ip, "hostIPs": [{"ip": pod.node.ip}], "startTime": now,
            "conditions": [cond("PodReadyToStartContainers", "True"), cond("Initialized", "True"),
                           cond("Ready", flag), cond("ContainersReady", flag), cond("PodScheduled", "True")],
            "containerStatuses": [{
                "name": "echo", "image": "registry.invalid/kpa-echo:1", "imageID": "", "containerID":
                f"harness://{pod.netns}", "ready": ready, "started": True, "restartCount": 0,
                "state": {"running": {"startedAt": now}}}],
        }
        self.api.patch(pod.path + "/status", {"status": status})
        pod.changed_at = time.monotonic()
        pod.ready = ready

    def set_ready(self, pod: Pod, ready: bool) -> None:
        self.report_status(pod, ready)

    def delete_pod(self, pod: Pod, grace: int = 0) -> None:
        """grace=0: gone at once (API object and namespace). grace>0: the Pod is Terminating (its
        endpoint stays, terminating, serving as long as it is Ready) until finalize_pod()."""
        if grace > 0:
            self.api.delete(pod.path, grace=grace)
            pod.changed_at = time.monotonic()
            pod.terminating = True
            return
        self.finalize_pod(pod)

    def finalize_pod(self, pod: Pod) -> None:
        """What kubelet does once the containers have stopped: delete for good, remove the sandbox."""
        self.api.delete(pod.path, grace=0)
        self._teardown_pod(pod)
        self.pods.pop((pod.namespace, pod.name), None)

    def _teardown_pod(self, pod: Pod) -> None:
        for srv in pod.servers:
            srv.close()
            with contextlib.suppress(ValueError):
                self.lab.servers.remove(srv)
        pod.servers.clear()
        HOOKED.pop(pod.netns, None)
        self.lab.drop_ns(pod.netns)

    # -- the control plane's own health ----------------------------------------------------------

    CANARY_NS = "kpa-canary"
    CANARY_NODE = "kpa-canary-node"

    def controller_canary(self, timeout: float = 90) -> float:
        """Seconds until the EndpointSlice controller publishes a brand-new Ready pod (an API object
        only: a canary Node and Pod with a pod IP nothing routes to). After an apiserver restart the
        controller-manager's informers back off (client-go, up to 30 s; requests that race the
        apiserver's RBAC warm-up get 403), so tests that rely on it wait for this first."""
        t0 = time.monotonic()
        if not self._canary_ready:
            self.namespace(self.CANARY_NS)
            self.api.create({"apiVersion": "v1", "kind": "Node",
                             "metadata": {"name": self.CANARY_NODE, "labels": {"kpa-harness": "canary"}},
                             "spec": {"podCIDR": "10.244.255.0/24"}}, exist_ok=True)
            self.create_service(self.CANARY_NS, "canary", [{"name": "p", "port": 80, "targetPort": 8080}],
                                {"app": "canary"})
            self._canary_ready = True
        n = next(self._pod_seq)
        name = f"canary-{n}"
        path = f"/api/v1/namespaces/{self.CANARY_NS}/pods/{name}"
        self.api.create({"apiVersion": "v1", "kind": "Pod",
                         "metadata": {"name": name, "namespace": self.CANARY_NS, "labels": {"app": "canary"}},
                         "spec": {"nodeName": self.CANARY_NODE, "automountServiceAccountToken": False,
                                  "containers": [{"name": "c", "image": "registry.invalid/canary:1"}]}})
        now = now_rfc3339()
        ip = f"10.244.255.{10 + n % 200}"
        self.api.patch(path + "/status", {"status": {
            "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
            "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": now}]}})

        def published() -> bool:
            try:
                return any(e.get("targetRef", {}).get("name") == name
                           for sl in self.endpoint_slices(self.CANARY_NS, "canary") for e in sl.get("endpoints") or [])
            except ApiError:
                return False
        try:
            wait_until(published, timeout, 0.05, "the EndpointSlice controller to publish a new pod")
        finally:
            with contextlib.suppress(ApiError):
                self.api.delete(path, grace=0)
        return time.monotonic() - t0

    def restart_apiserver(self, down: float = 2.0, between: Callable[[], None] | None = None) -> tuple[float, float]:
        """Stop kube-apiserver (SIGTERM), keep it down `down` seconds (calling between() while it
        is down), start it again. The proxies are left alone; kube-controller-manager is restarted
        once the apiserver is ready (see ControlPlane.restart_controller_manager).
        Returns (seconds to stop, seconds until /readyz)."""
        assert self.cp is not None
        stopped = self.cp.stop_apiserver()
        t_down = time.monotonic()
        if between is not None:
            between()
        time.sleep(max(0.0, down - (time.monotonic() - t_down)))
        ready = self.cp.start_apiserver()
        self.cp.restart_controller_manager()
        self.say(f"kube-apiserver restarted: stopped in {stopped:.1f}s, down {time.monotonic() - t_down - ready:.1f}s, "
                 f"ready in {ready:.1f}s (kube-controller-manager restarted after it)")
        return stopped, ready

    def cleanup_namespace(self, namespace: str) -> None:
        """Delete what a test made in its namespace (there is no namespace controller here)."""
        for (ns, _), pod in list(self.pods.items()):
            if ns == namespace:
                with contextlib.suppress(ApiError):
                    self.finalize_pod(pod)
        for kind, path in (("Service", f"/api/v1/namespaces/{namespace}/services"),
                           ("EndpointSlice", f"/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices")):
            with contextlib.suppress(ApiError):
                for item in self.api.get(path).get("items", []):
                    with contextlib.suppress(ApiError):
                        self.api.delete(f"{path}/{item['metadata']['name']}")
            del kind

    # -- API objects -------------------------------------------------------------------------------

    def create_service(self, namespace: str, name: str, ports: list[JSON], selector: dict[str, str] | None = None,
                       **spec: Any) -> JSON:
        body: JSON = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": namespace},
                      "spec": {"ports": ports, **spec}}
        if selector is not None:
            body["spec"]["selector"] = selector
        return self.api.create(body)

    def service_path(self, namespace: str, name: str) -> str:
        return f"/api/v1/namespaces/{namespace}/services/{name}"

    def endpoint_slices(self, namespace: str, service: str) -> list[JSON]:
        return list(self.api.get(f"/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices",
                                 labelSelector=f"kubernetes.io/service-name={service}").get("items", []))

    # -- measuring ---------------------------------------------------------------------------------

    def record(self, proxy: str, what: str, seconds: float) -> float:
        self.latencies.append(Latency(proxy, what, seconds))
        return seconds

    def converge(self, proxy: str, what: str, t0: float, check: Callable[[], bool], timeout: float = 30,
                 interval: float = 0.01) -> float:
        """Poll check() until true; record (and return) the time since t0 (the moment the API
        accepted the change). For checks whose probes are quick both before and after the change;
        when the state before the change is a timeout, use first() instead."""
        wait_until(check, timeout, interval, what)
        return self.record(proxy, what, time.monotonic() - t0)

    def first(self, proxy: str, what: str, t0: float, attempt: Callable[[], str], accept: Callable[[str], bool],
              timeout: float = 30, record: bool = True) -> tuple[float, str]:
        """Network programming latency as a client sees it: start a connection attempt every 10 ms
        (without waiting for earlier ones, which may be waiting for a timeout) until one gives an
        accepted reply; record the time from t0 to that reply. Returns (seconds, reply)."""
        t, reply = first_success(attempt, accept, timeout, what=what)
        return (self.record(proxy, what, t - t0) if record else t - t0), reply


def first_success(attempt: Callable[[], str], accept: Callable[[str], bool], timeout: float = 30,
                  interval: float = 0.01, max_inflight: int = 60, what: str = "",
                  slow_after: float = 2.0, slow_interval: float = 0.1) -> tuple[float, str]:
    """(monotonic time, reply) of the earliest accepted reply among attempts started every
    `interval` seconds (every `slow_interval` after `slow_after` seconds), each in its own thread.

    Slowing down matters: every attempt at a Service not yet programmed leaves an unNATed SYN_SENT
    conntrack entry for 2 minutes, and once the client's source ports come round again a new
    connection that hits one of them is lost (TIMEOUT) even though the rules are right."""
    done = threading.Event()
    lock = threading.Lock()
    best: list[tuple[float, str]] = []
    errors: list[BaseException] = []
    slots = threading.BoundedSemaphore(max_inflight)

    def run() -> None:
        try:
            r = attempt()
            t = time.monotonic()
            if accept(r):
                with lock:
                    best.append((t, r))
                done.set()
        except BaseException as exc:  # reported to the caller
            errors.append(exc)
            done.set()
        finally:
            slots.release()

    start = time.monotonic()
    end = start + timeout
    while not done.is_set():
        now = time.monotonic()
        if now > end:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what or attempt}")
        step = interval if now - start < slow_after else slow_interval
        if slots.acquire(timeout=step):
            threading.Thread(target=run, daemon=True).start()
        done.wait(step)
    if errors and not best:
        raise errors[0]
    with lock:
        return min(best)


def batch(netns: str, *cmds: str) -> None:
    """Several `ip` commands in one namespace with one process."""
    sh_input("ip", "-n", netns, "-batch", "-", input="\n".join(cmds) + "\n")


def sh_input(*argv: str, input: str) -> str:
    proc = subprocess.run(list(argv), input=input, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}\ninput:\n{input}")
    return proc.stdout


def _raise_keyboard_interrupt(*_: object) -> None:
    raise KeyboardInterrupt("SIGTERM")


# -- probing -----------------------------------------------------------------------------------------

def ask(netns: str, ip: str, port: int, proto: str = "tcp", timeout: float = 1.0, src_ip: str = "") -> str:
    """One connection: '<server name> <client ip as seen>' or REFUSED / TIMEOUT / RESET / UNREACHABLE."""
    return probe(netns, ip, port, proto, timeout=timeout, src_ip=src_ip)


def answered(reply: str) -> bool:
    return reply not in ("REFUSED", "TIMEOUT", "RESET", "UNREACHABLE", "EMPTY")


def summarize(latencies: Sequence[Latency], slowest: int = 3) -> list[str]:
    """Per proxy: n, min, p50, p90, max, and the slowest changes."""
    out = []
    by: dict[str, list[Latency]] = {}
    for lat in latencies:
        by.setdefault(lat.proxy, []).append(lat)
    for proxy, lats in by.items():
        secs = sorted(x.seconds for x in lats)
        p90 = secs[min(len(secs) - 1, round(0.9 * (len(secs) - 1)))]
        out.append(f"{proxy}: n={len(secs)}  min {secs[0] * 1000:.0f} ms  p50 {statistics.median(secs) * 1000:.0f} ms"
                   f"  p90 {p90 * 1000:.0f} ms  max {secs[-1] * 1000:.0f} ms")
        for lat in sorted(lats, key=lambda x: -x.seconds)[:slowest]:
            out.append(f"    {lat.seconds * 1000:7.0f} ms  {lat.what}")
    return out
