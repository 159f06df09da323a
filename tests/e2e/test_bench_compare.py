"""`make bench-compare` at a size that fits in `make test`: upstream kube-proxy and the agent both
come up on the real control plane, both see every change of the probe Service through a real
connection, and the table prints. Nothing here asserts on time (the benchmark only prints)."""

from __future__ import annotations

import os

import pytest

from tests.bench.compare import PROXIES, Bench, parser, table
from tests.cluster.harness import Harness
from tests.uml import why_no_uml


def _smoke(harness: Harness, mode: str, argv: list[str]) -> None:
    """`mode` at 30 Services, a few changes: both proxies answer every change, every figure is there."""
    args = parser().parse_args(["--burst", "5", "--idle", "2", *argv])
    bench = Bench(harness, args)
    try:
        figs = bench.run(mode, 30)
    finally:
        bench.close()
    print(table(mode, 30, figs, args.changes))
    for proxy in PROXIES:
        f = figs[proxy]
        assert f.cold_s is not None, f"{proxy} never answered on the probe Service ({mode})"
        assert len(f.lat) == args.changes and not f.timeouts, f"{proxy}: {f}"
        assert f.burst_s is not None and f.peak_mb > 0 and f.cpu_idle is not None


def test_bench_compare_smoke(harness: Harness) -> None:
    _smoke(harness, "iptables", ["--changes", "4", "--rate", "4", "--cold-timeout", "90"])


def test_bench_compare_ipvs_smoke_in_uml(harness: Harness, request: pytest.FixtureRequest) -> None:
    """The IPVS path: each proxy in its own user-mode-linux guest (this kernel has no IPVS), probe
    connections, CPU and RSS taken in the guest."""
    chosen = list(request.config.getoption("--e2e-mode", default=[]) or [])
    if chosen and "ipvs" not in chosen:
        pytest.skip(f"--e2e-mode {','.join(chosen)} given")
    why = why_no_uml()
    if why:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI=true: no UML guest for the IPVS benchmark nodes: {why}", pytrace=False)
        pytest.skip(f"no UML guest for the IPVS benchmark nodes: {why}")
    _smoke(harness, "ipvs", ["--changes", "3", "--rate", "2", "--cold-timeout", "120", "--guest-mem", "768M"])
