"""`make bench`: a synthetic cluster of 1k and 10k Services x 10 endpoints, per proxy mode.

Prints, per (mode, size): full render time, full sync time into a fresh network namespace, p50/p99
time for one endpoint change to be in the kernel (incremental sync), and the agent process's peak
RSS. Each (mode, size) runs in its own process inside its own namespace, so numbers don't mix.
Needs root. Options: --sizes 1000,10000 --modes iptables,nftables --changes 50
A mode this kernel cannot run but a user-mode-linux guest can (ipvs) runs in one guest, with the
iptables mode measured again in the same guest for a fair ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from typing import Any

from agent.backends import registry
from agent.backends.base import UnsupportedMode
from agent.backends.registry import make_backend
from agent.model.records import from_builtins
from agent.model.serviceport import NamespacedName
from agent.model.state import ClusterModel


def _ip(base: int, n: int) -> str:
    v = base + n
    return f"{v >> 24 & 255}.{v >> 16 & 255}.{v >> 8 & 255}.{v & 255}"


SVC_BASE = (10 << 24) | (96 << 16)
EP_BASE = (10 << 24) | (128 << 16)


def service(i: int) -> dict[str, Any]:
    spec: dict[str, Any] = {"clusterIP": _ip(SVC_BASE, i + 1), "ports": [{"name": "http", "port": 80,
                                                                           "protocol": "TCP"}]}
    if i % 10 == 0:
        spec["type"] = "NodePort"
        spec["ports"][0]["nodePort"] = 30000 + i % 2700
    return {"metadata": {"name": f"svc-{i}", "namespace": "bench"}, "spec": spec}


def eslice(i: int, gen: int = 0, n: int = 10) -> dict[str, Any]:
    eps = [{"addresses": [_ip(EP_BASE, i * 16 + j + (gen % 6))], "nodeName": f"node{j % 3}"} for j in range(n)]
    return {"metadata": {"name": f"svc-{i}-abc", "namespace": "bench",
                         "labels": {"kubernetes.io/service-name": f"svc-{i}"}},
            "addressType": "IPv4", "endpoints": eps, "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]}


def inner(mode: str, size: int, changes: int) -> dict[str, float]:
    model = ClusterModel("node0", ["10.128.0.0/9"], frontends=registry.spec(mode).frontends)
    for i in range(size):
        model.on_service(NamespacedName("bench", f"svc-{i}"), from_builtins("Service", service(i)))  # type: ignore[arg-type]
        model.on_slice(NamespacedName("bench", f"svc-{i}-abc"), from_builtins("EndpointSlice", eslice(i)))  # type: ignore[arg-type]
    # a mode whose state is not confined to this network namespace gets a place of its own:
    # the eBPF mode's socket hooks act on a cgroup (this process's alone) and its pins on bpffs
    settings: dict[str, Any] = {}
    if mode == "ebpf":
        from agent.backends.ebpf.host import cgroup2_root

        tag = uuid.uuid4().hex[:6]
        cgroup = f"{cgroup2_root()}/kpa-bench-{tag}"
        os.makedirs(cgroup, exist_ok=True)
        settings = {"ebpf_cgroup_root": cgroup, "ebpf_bpffs_root": f"/sys/fs/bpf/kpa-bench-{tag}"}
    t0 = time.perf_counter()
    update = model.drain()
    text = make_backend(mode, (4,), settings).render(model.desired)
    render_s = time.perf_counter() - t0
    backend = make_backend(mode, (4,), settings)
    backend.check_supported()
    backend.start()  # compiles and loads, for the eBPF mode (not timed)
    t0 = time.perf_counter()
    backend.sync(model.desired, {f: update.changes(f) for f in (4, 6)}, full=True)
    full_s = time.perf_counter() - t0
    lat = []
    rng = random.Random(1)
    for gen in range(1, changes + 1):
        i = rng.randrange(size)
        t0 = time.perf_counter()
        model.on_slice(NamespacedName("bench", f"svc-{i}-abc"), from_builtins("EndpointSlice", eslice(i, gen)))  # type: ignore[arg-type]
        upd = model.drain()
        backend.sync(model.desired, {f: upd.changes(f) for f in (4, 6)}, full=False)
        lat.append(time.perf_counter() - t0)
    lat.sort()
    t0 = time.perf_counter()
    backend.sync(model.desired, {}, full=True)
    resync_s = time.perf_counter() - t0
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before cleanup: the agent's own peak
    backend.cleanup()
    backend.close(5)
    if settings.get("ebpf_cgroup_root"):
        os.rmdir(settings["ebpf_cgroup_root"])
        shutil.rmtree(settings["ebpf_bpffs_root"], ignore_errors=True)  # the (empty) pin root it made
    return {
        "render_s": render_s, "render_lines": text.count("\n"), "full_sync_s": full_s, "resync_s": resync_s,
        "p50_ms": statistics.median(lat) * 1000, "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000,
        "peak_rss_mb": peak_rss_mb,
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1000,10000")
    ap.add_argument("--modes", default=",".join(s.name for s in registry.SPECS if s.built))
    ap.add_argument("--changes", type=int, default=50)
    ap.add_argument("--inner", nargs=2, metavar=("MODE", "SIZE"))
    args = ap.parse_args()
    if args.inner:
        why = registry.make_backend(args.inner[0], (4,))
        try:
            why.check_supported()
        except UnsupportedMode as exc:
            print(json.dumps({"skipped": str(exc)}))
            return 0
        print(json.dumps(inner(args.inner[0], int(args.inner[1]), args.changes)))
        return 0
    if os.geteuid() != 0:
        print("make bench needs root (it programs a scratch network namespace)", file=sys.stderr)
        return 1
    modes = args.modes.split(",")
    guest_modes = [m for m in modes if _needs_uml(m)]
    rows = []
    for size in [int(s) for s in args.sizes.split(",")]:
        for mode in [m for m in modes if m not in guest_modes]:
            ns = f"kpa-bench-{uuid.uuid4().hex[:6]}"
            subprocess.run(["ip", "netns", "add", ns], check=True)
            try:
                print(f"bench: {mode} {size} services x 10 endpoints ...", file=sys.stderr, flush=True)
                # nsenter, not `ip netns exec`: that one's fresh /sys hides bpffs and the cgroup2 mount
                proc = subprocess.run(["nsenter", f"--net=/run/netns/{ns}", sys.executable, "-m", "tests.bench.bench",
                                       "--inner", mode, str(size), "--changes", str(args.changes)],
                                      capture_output=True, text=True)
                if proc.returncode != 0:
                    print(f"bench: {mode} {size} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
                    continue
                result = json.loads(proc.stdout.strip().splitlines()[-1])
                if "skipped" in result:
                    print(f"bench: {mode} skipped: {result['skipped']}", file=sys.stderr)
                    continue
                rows.append((mode, size, result))
            finally:
                subprocess.run(["ip", "netns", "del", ns], check=False)
    _print(rows)
    if guest_modes:
        _bench_in_uml(guest_modes, args.sizes, args.changes)
    return 0


def _needs_uml(mode: str) -> bool:
    """A mode this kernel cannot run (IPVS) but a user-mode-linux guest can."""
    from tests.uml import in_uml, why_no_uml

    if in_uml():
        return False
    try:
        registry.make_backend(mode, (4,)).check_supported()
        return False
    except UnsupportedMode:
        return why_no_uml() == ""


def _bench_in_uml(modes: list[str], sizes: str, changes: int) -> None:
    """Absolute figures inside UML are slow (every syscall is a host context switch): the same guest
    run measures the iptables mode too, so the ratio is what compares."""
    from tests.uml import run_in_uml

    print(f"\nin a user-mode-linux guest (Linux 6.1, iptables-legacy), beside iptables for scale: "
          f"{', '.join(modes)}", flush=True)
    rc, out = run_in_uml([sys.executable, "-m", "tests.bench.bench", "--sizes", sizes,
                          "--modes", ",".join([*modes, "iptables"]), "--changes", str(changes)],
                         mem="6G", timeout=3600)
    print(out.rstrip(), flush=True)
    if rc != 0:
        print(f"bench: the UML guest run failed (exit {rc})", file=sys.stderr)


def _print(rows: list[tuple[str, int, dict[str, float]]]) -> None:
    hdr = f"{'mode':9} {'services':>8} {'render s':>9} {'full sync s':>11} {'resync s':>9} " \
          f"{'1-ep p50 ms':>11} {'1-ep p99 ms':>11} {'peak RSS MB':>11}"
    print(hdr)
    for mode, size, r in rows:
        print(f"{mode:9} {size:>8} {r['render_s']:>9.2f} {r['full_sync_s']:>11.2f} {r['resync_s']:>9.2f} "
              f"{r['p50_ms']:>11.1f} {r['p99_ms']:>11.1f} {r['peak_rss_mb']:>11.0f}")


if __name__ == "__main__":
    raise SystemExit(main())
