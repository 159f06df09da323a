"""`make bench-compare`: upstream kube-proxy and kube-proxy-agent side by side on the real control
plane (tests/cluster), in the same mode, on the same machine, in the same run.

Per mode and size: N Services (every tenth a NodePort) with one EndpointSlice of 10 endpoints each
are written through the API, as the EndpointSlice controller would; then two node namespaces start,
one running kube-proxy, one the agent, both with --min-sync-period 0 and the same --sync-period.
Everything is observed from outside the proxy (never from its own log or metrics):

  cold start        proxy process start -> a real connection to a probe Service answered (every
                    Service is written in the same sync), and the CPU seconds the process tree
                    (children included: iptables-restore, nft) used until then
  change -> kernel  the probe Service's EndpointSlice switched between two real pods, `--changes`
                    times at `--rate` per second: from the API accepting the update to the first
                    connection (one attempt every 10 ms) answered by the new pod, on both nodes
                    at once; then a burst: `--burst` updates of other Services in one second, the
                    probe's last, measured from that last update
  CPU               seconds per minute while the changes trickle in, and idle (periodic syncs only)
  memory            peak and steady RSS of the process tree, sampled every 0.25 s

It prints one table per mode and size with the ratio agent/kube-proxy; nothing asserts on time.
Only addresses this run creates are probed (network namespaces of the harness).

    .venv/bin/python -m tests.bench.compare --sizes 1000 --modes iptables,nftables

IPVS (`--modes ipvs`) runs each proxy in its own user-mode-linux guest (this kernel has no IPVS;
tests/cluster/umlnode.py), both against the same apiserver: the probe connections start from the
guest node itself, and CPU seconds and RSS are read from the guest's /proc (CPU seconds are the
guest's, slower than this machine's by the cost of user-mode-linux, the same for both proxies).
`--modes iptables-legacy` is the iptables mode on nodes whose rules live in legacy iptables (both
proxies then write with iptables-legacy-restore; see `_legacy_node`).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from tests.bench.proctree import Watch, cpu_s
from tests.cluster.harness import Harness, Pod, SimNode, answered, ask, first_success
from tests.cluster.kubeapi import ApiError

if TYPE_CHECKING:
    from tests.cluster.umlnode import UmlNode

NS = "bench"
SLICES = "/apis/discovery.k8s.io/v1/namespaces/bench/endpointslices"
SERVICES = "/api/v1/namespaces/bench/services"
MANAGED_BY = {"endpointslice.kubernetes.io/managed-by": "bench.kube-proxy-agent"}
PROXIES = ("kube-proxy", "agent")


def _endpoint_ip(n: int) -> str:
    """Endpoint addresses nobody answers on (never probed): 10.200.0.1 onwards."""
    n += 1
    return f"10.{200 + (n >> 16)}.{(n >> 8) & 255}.{n & 255}"


def _service(i: int) -> dict[str, Any]:
    nodeport = i % 10 == 0
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": f"s{i}", "namespace": NS},
            "spec": {"type": "NodePort" if nodeport else "ClusterIP",
                     "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}}


def _slice(name: str, service: str, ips: list[str], node: str = "elsewhere") -> dict[str, Any]:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": {"name": name, "namespace": NS,
                         "labels": {"kubernetes.io/service-name": service, **MANAGED_BY}},
            "endpoints": [{"addresses": [ip], "nodeName": node, "conditions": {"ready": True}} for ip in ips],
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]}


# -- the nodes under test -------------------------------------------------------------------------


class ProxyNode(Protocol):
    """A node with one proxy on it, not yet started."""

    def start(self) -> float:
        """Start the proxy; the monotonic time it was started."""

    def answered_by(self, ip: str, name: str, t0: float, timeout: float) -> float | None:
        """Seconds from `t0` until a connection from the node to `ip`:80 is answered by pod `name`."""

    def cpu(self) -> float:
        """CPU seconds of the proxy's process tree so far."""

    def memory(self) -> tuple[float, float]:
        """(peak, latest) RSS of the proxy's process tree in MB, sampled every 0.25 s."""

    def phase(self, name: str) -> dict[str, float]:
        """Start the benchmark phase `name`; the peak RSS (MB) of each phase so far, where known."""

    def close(self) -> None: ...


@dataclass
class NsNode:
    """A node network namespace on this machine."""

    h: Harness
    node: SimNode
    watch: Watch | None = None

    def start(self) -> float:
        t0 = time.monotonic()
        self.h.start_proxy(self.node, wait=False)
        assert self.node.proxy is not None
        self.watch = Watch(self.node.proxy.pid)
        return t0

    def answered_by(self, ip: str, name: str, t0: float, timeout: float) -> float | None:
        try:
            t, _ = first_success(lambda: ask(self.node.netns, ip, 80, timeout=1.0),
                                 lambda r: answered(r) and r.split()[0] == name, timeout=timeout)
        except TimeoutError:
            return None
        return t - t0

    def cpu(self) -> float:
        assert self.watch is not None
        return cpu_s(self.watch.pid)

    def memory(self) -> tuple[float, float]:
        return (self.watch.peak, self.watch.last) if self.watch is not None else (0.0, 0.0)

    def phase(self, name: str) -> dict[str, float]:
        if self.watch is None:
            return {}
        self.watch.phase = name
        return dict(self.watch.peaks)

    def peak_parts(self) -> str:
        """The processes of the tree at its peak sample, e.g. 'python3 280 + iptables-restor 140'."""
        parts = self.watch.peak_parts if self.watch is not None else []
        return " + ".join(f"{name} {mb:.0f}" for name, mb in parts)

    def close(self) -> None:
        if self.watch is not None:
            self.watch.stop()
        self.h.remove_node(self.node)


@dataclass
class GuestNode:
    """A user-mode-linux guest (tests/cluster/umlnode.py), for a mode this kernel lacks (IPVS): the
    probe connections, CPU and RSS are taken inside the guest (tests/cluster/guestd.py); a latency
    is the time until the request reached the guest plus the guest's own count from there."""

    node: UmlNode

    def start(self) -> float:
        t0 = time.monotonic()
        self.node.rpc("proxy", action="start")
        return t0

    def answered_by(self, ip: str, name: str, t0: float, timeout: float) -> float | None:
        sent = time.monotonic()
        got = self.node.rpc("await", wait=timeout + 60, ip=ip, port=80, name=name, timeout=timeout)["elapsed"]
        return None if got is None else sent - t0 + float(got)

    def cpu(self) -> float:
        return float(self.node.rpc("stats")["cpu"])

    def memory(self) -> tuple[float, float]:
        got = self.node.rpc("stats")
        return float(got["peak"]), float(got["rss"])

    def phase(self, name: str) -> dict[str, float]:
        return {}  # the guest keeps one peak

    def close(self) -> None:
        self.node.close()


LEGACY = "iptables-legacy"  # the iptables mode on a node whose rules live in legacy iptables


def _legacy_node(h: Harness, node: SimNode) -> None:
    """Make `node` a legacy-iptables node for both proxies. kube-proxy runs plain `iptables` and
    gets xtables-legacy-multi first on its PATH (as a distribution whose alternatives point at
    legacy would give it); the agent picks the variant holding rules (as iptables-wrapper does),
    so the node's legacy filter table gets one rule that does nothing (a counter with a comment),
    as a node whose other components (kubelet, a firewall) use legacy iptables would have."""
    from tests.cluster.procs import Proc

    bin_dir = h.run_dir / "iptables-legacy-bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    for tool in ("iptables", "iptables-save", "iptables-restore", "ip6tables", "ip6tables-save", "ip6tables-restore"):
        link = bin_dir / tool
        if not link.is_symlink():
            link.symlink_to("/usr/sbin/xtables-legacy-multi")
    for tool in ("iptables-legacy", "ip6tables-legacy"):
        h.lab.exec(node.netns, tool, "-A", "INPUT", "-m", "comment", "--comment", "this node uses iptables-legacy")
    if node.proxy_kind == "kube-proxy":
        node.proxy = Proc(f"{node.proxy_kind}@{node.name}", h.proxy_argv(node),
                          h.run_dir / "logs" / f"{node.proxy_kind}-{node.name}.log", h.tag, netns=node.netns,
                          env={**h.node_env(node),
                               "PATH": f"{bin_dir}:{os.environ.get('PATH', '/usr/sbin:/usr/bin')}"})


# -- the run ----------------------------------------------------------------------------------------


@dataclass
class Figures:
    cold_s: float | None = None
    cold_cpu_s: float | None = None
    lat: list[float] = field(default_factory=list)
    lat_at: list[float] = field(default_factory=list)  # wall-clock time of each sample's change
    burst_s: float | None = None
    cpu_trickle: float | None = None  # CPU seconds per minute
    cpu_idle: float | None = None
    peak_mb: float = 0.0
    steady_mb: float = 0.0
    timeouts: int = 0


class Bench:
    def __init__(self, h: Harness, args: argparse.Namespace, first_index: int = 20) -> None:
        self.h = h
        self.args = args
        self.created = 0
        self.index = first_index
        h.namespace(NS)
        self.podhost = h.add_node("bench-pods", first_index, start_proxy=False)
        self.pods: list[Pod] = [h.create_pod(NS, f"probe-{x}", self.podhost) for x in "ab"]
        self.h.api.create({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "probe", "namespace": NS},
                           "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}})
        self.probe_ip = str(self.h.api.get(f"{SERVICES}/probe")["spec"]["clusterIP"])
        self.h.api.create(_slice("probe-1", "probe", [self.pods[0].ip], self.podhost.name))
        self.current = 0  # which pod the probe slice names

    def close(self) -> None:
        """Remove what this benchmark made (its pods' node, its namespace's objects)."""
        self.h.remove_node(self.podhost)
        self.h.cleanup_namespace(NS)

    def grow(self, size: int) -> None:
        """Services s0..s{size-1} and their slices (those already there are kept)."""
        t0 = time.monotonic()

        def one(i: int) -> None:
            for obj in (_service(i), _slice(f"s{i}-1", f"s{i}", [_endpoint_ip(i * 10 + j) for j in range(10)])):
                try:
                    self.h.api.create(obj)
                except ApiError as exc:
                    if exc.status != 409:
                        raise
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(one, range(self.created, size)))
        self.h.say(f"{size - self.created} Services and EndpointSlices written through the API in "
                   f"{time.monotonic() - t0:.0f}s")
        self.created = size

    def switch_probe(self) -> tuple[float, str]:
        """Point the probe Service at the other pod; (time the API accepted it, that pod's name)."""
        self.current = 1 - self.current
        pod = self.pods[self.current]
        body = self.h.api.get(f"{SLICES}/probe-1")
        body["endpoints"] = _slice("probe-1", "probe", [pod.ip], self.podhost.name)["endpoints"]
        self.h.api.put(f"{SLICES}/probe-1", body)
        return time.monotonic(), pod.name

    def on_both(self, nodes: dict[str, ProxyNode], name: str, t0: float, timeout: float) -> dict[str, float | None]:
        """Each node's time from t0 to `name` answering, measured at the same time."""
        with concurrent.futures.ThreadPoolExecutor(len(nodes) or 1) as pool:
            futures = {p: pool.submit(node.answered_by, self.probe_ip, name, t0, timeout) for p, node in nodes.items()}
            return {p: f.result() for p, f in futures.items()}

    def node(self, mode: str, proxy: str) -> ProxyNode:
        """A new node for `proxy` in `mode`, its proxy not started: a network namespace, or a
        user-mode-linux guest for IPVS when this kernel has none."""
        self.index += 1
        name = f"b{mode[:3]}{'l' if mode == LEGACY else ''}-{'kp' if proxy == 'kube-proxy' else 'ag'}{self.index}"
        if mode == "ipvs" and not Path("/proc/net/ip_vs").exists():
            from tests.cluster.umlnode import start_uml_node

            return GuestNode(start_uml_node(self.h, name, self.index, proxy, mode, peers=[self.podhost],
                                            start_proxy=False, mem=self.args.guest_mem))
        node = self.h.add_node(name, self.index, proxy=proxy, mode="iptables" if mode == LEGACY else mode,
                               peers=[self.podhost], start_proxy=False)
        if mode == LEGACY:
            _legacy_node(self.h, node)
        return NsNode(self.h, node)

    def run(self, mode: str, size: int) -> dict[str, Figures]:
        a = self.args
        self.grow(size)
        figs = {p: Figures() for p in PROXIES}
        nodes: dict[str, ProxyNode] = {}
        try:
            for proxy in [p for p in PROXIES if p in a.proxies.split(",")]:  # one after the other: each
                # cold start has the machine to itself
                node = nodes[proxy] = self.node(mode, proxy)
                t0 = node.start()
                took = node.answered_by(self.probe_ip, self.pods[self.current].name, t0, a.cold_timeout)
                figs[proxy].cold_s = took
                figs[proxy].cold_cpu_s = node.cpu()
                self.h.say(f"{proxy} ({mode}, {size}): cold start "
                           + (f"{took:.1f}s, {figs[proxy].cold_cpu_s:.1f} CPU s" if took is not None
                              else f"not done after {a.cold_timeout:.0f}s"))
            live = {p: n for p, n in nodes.items() if figs[p].cold_s is not None}
            time.sleep(2)  # let any sync still running after the first answer finish

            # a trickle of changes
            for n in live.values():
                n.phase("changes")
            cpu0 = {p: n.cpu() for p, n in live.items()}
            w0 = time.monotonic()
            for k in range(a.changes):
                due = w0 + k / a.rate
                time.sleep(max(0.0, due - time.monotonic()))
                wall = time.time()
                t0, name = self.switch_probe()
                for p, s in self.on_both(live, name, t0, 30).items():
                    if s is None:
                        figs[p].timeouts += 1
                    else:
                        figs[p].lat.append(s)
                        figs[p].lat_at.append(wall)
            minutes = (time.monotonic() - w0) / 60
            for p, n in live.items():
                figs[p].cpu_trickle = (n.cpu() - cpu0[p]) / minutes

            # a burst: other Services' slices, the probe's last
            for n in live.values():
                n.phase("burst")
            rng = random.Random(size)
            b0 = time.monotonic()
            for j in range(a.burst - 1):
                i = rng.randrange(size)
                body = self.h.api.get(f"{SLICES}/s{i}-1")
                body["endpoints"][0]["addresses"] = [_endpoint_ip(size * 10 + j)]
                self.h.api.put(f"{SLICES}/s{i}-1", body)
            t0, name = self.switch_probe()
            for p, s in self.on_both(live, name, t0, 60).items():
                figs[p].burst_s = s
            self.h.say(f"burst of {a.burst} updates written in {t0 - b0:.2f}s")

            # idle: periodic syncs only
            for n in live.values():
                n.phase("idle")
            cpu0 = {p: n.cpu() for p, n in live.items()}
            time.sleep(a.idle)
            for p, n in live.items():
                figs[p].cpu_idle = (n.cpu() - cpu0[p]) * 60 / a.idle
        finally:
            for p, n in nodes.items():
                try:
                    figs[p].peak_mb, figs[p].steady_mb = n.memory()
                    if peaks := n.phase("done"):
                        self.h.say(f"{p} ({mode}, {size}): peak RSS (tree) by phase, MB: "
                                   + ", ".join(f"{k} {v:.0f}" for k, v in peaks.items() if k != "done")
                                   + (f"; at the peak: {n.peak_parts()}" if isinstance(n, NsNode) else ""))
                finally:
                    n.close()
        return figs


# -- the table ----------------------------------------------------------------------------------------


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def rows(figs: dict[str, Figures]) -> list[tuple[str, float | None, float | None, str]]:
    out: list[tuple[str, float | None, float | None, str]] = []

    def add(label: str, get: Any, unit: str) -> None:
        out.append((label, get(figs["kube-proxy"]), get(figs["agent"]), unit))
    add("cold start", lambda f: f.cold_s, "s")
    add("CPU to programmed", lambda f: f.cold_cpu_s, "s")
    add("change -> kernel p50", lambda f: _ms(statistics.median(f.lat)) if f.lat else None, "ms")
    add("change -> kernel p90", lambda f: _ms(_pct(f.lat, 0.9)), "ms")
    add("change -> kernel p99", lambda f: _ms(_pct(f.lat, 0.99)), "ms")
    add("change -> kernel max", lambda f: _ms(max(f.lat) if f.lat else None), "ms")
    add("burst: last -> kernel", lambda f: _ms(f.burst_s), "ms")
    add("CPU per minute, changes", lambda f: f.cpu_trickle, "s")
    add("CPU per minute, idle", lambda f: f.cpu_idle, "s")
    add("peak RSS (tree)", lambda f: f.peak_mb or None, "MB")
    add("steady RSS (tree)", lambda f: f.steady_mb or None, "MB")
    return out


def _ms(s: float | None) -> float | None:
    return None if s is None else s * 1000


def table(mode: str, size: int, figs: dict[str, Figures], changes: int) -> str:
    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.0f}" if v >= 100 else f"{v:.1f}" if v >= 1 else f"{v:.2f}"
    lines = [f"| {mode}, {size} Services x 10 endpoints | kube-proxy | kube-proxy-agent | agent/kube-proxy |",
             "|---|---|---|---|"]
    for label, kp, ag, unit in rows(figs):
        ratio = f"{ag / kp:.2f}" if kp and ag is not None else "-"
        lines.append(f"| {label} ({unit}) | {fmt(kp)} | {fmt(ag)} | {ratio} |")
    lost = {p: f.timeouts for p, f in figs.items() if f.timeouts}
    lines.append(f"({changes} changes; latency samples kube-proxy {len(figs['kube-proxy'].lat)}, "
                 f"agent {len(figs['agent'].lat)}" + (f"; not seen within 30 s: {lost}" if lost else "") + ")")
    return "\n".join(lines)


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), "?")
    mem = int(Path("/proc/meminfo").read_text().split()[1]) // 1024 // 1024
    return f"{os.cpu_count()} CPUs ({cpu}), {mem} GiB, Linux {platform.release()}"


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000", help="comma-separated Service counts, ascending")
    ap.add_argument("--modes", default="iptables,nftables")
    ap.add_argument("--changes", type=int, default=200)
    ap.add_argument("--rate", type=float, default=2.0, help="changes per second (steady)")
    ap.add_argument("--burst", type=int, default=100)
    ap.add_argument("--idle", type=float, default=60.0, help="seconds of idle CPU measurement")
    ap.add_argument("--sync-period", default="30s", help="both proxies' periodic sync")
    ap.add_argument("--cold-timeout", type=float, default=900.0)
    ap.add_argument("--proxies", default=",".join(PROXIES),
                    help="which to run (one alone: its figures, '-' for the other)")
    ap.add_argument("--guest-mem", default="3G", help="memory of each user-mode-linux guest (ipvs)")
    ap.add_argument("--samples", type=Path, help="also write every latency sample to this file, a line each "
                    "(mode, size, proxy, UTC time of the change, ms), to match slow ones with a proxy's log")
    return ap


def write_samples(path: Path, mode: str, size: int, figs: dict[str, Figures]) -> None:
    with path.open("a") as out:
        for proxy, f in figs.items():
            for at, s in zip(f.lat_at, f.lat, strict=True):
                stamp = time.strftime("%H:%M:%S", time.gmtime(at)) + f".{int(at % 1 * 1000):03d}"
                out.write(f"{mode} {size} {proxy} {stamp} {s * 1000:.1f}\n")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    sizes = sorted(int(s) for s in args.sizes.split(","))
    modes = [m for m in args.modes.split(",") if m]
    out: list[str] = []
    with Harness() as h:
        h.sync_period = args.sync_period
        kube_proxy = h.cp.bins / "kube-proxy" if h.cp else Path("kube-proxy")
        version = os.popen(f"{kube_proxy} --version 2>/dev/null").read().strip()
        bench = Bench(h, args)
        for size in sizes:
            for mode in modes:
                figs = bench.run(mode, size)
                if args.samples:
                    write_samples(args.samples, mode, size, figs)
                out.append(table(mode, size, figs, args.changes))
                print("\n" + out[-1] + "\n", flush=True)
    print(f"\n{version or 'kube-proxy'} vs kube-proxy-agent; --min-sync-period 0, --sync-period {args.sync_period}; "
          f"{args.changes} changes at {args.rate:g}/s, burst {args.burst}; machine: {machine()}\n")
    print("\n\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
