"""`make bench-compare` at a size that fits in `make test`: upstream kube-proxy and the agent both
come up on the real control plane, both see every change of the probe Service through a real
connection, and the table prints. Nothing here asserts on time (the benchmark only prints)."""

from __future__ import annotations

from tests.bench.compare import PROXIES, Bench, parser, table
from tests.cluster.harness import Harness


def test_bench_compare_smoke(harness: Harness) -> None:
    args = parser().parse_args(["--changes", "4", "--rate", "4", "--burst", "5", "--idle", "2",
                                "--cold-timeout", "90"])
    bench = Bench(harness, args)
    try:
        figs = bench.run("iptables", 30)
    finally:
        bench.close()
    print(table("iptables", 30, figs, args.changes))
    for proxy in PROXIES:
        f = figs[proxy]
        assert f.cold_s is not None, f"{proxy} never answered on the probe Service"
        assert len(f.lat) == args.changes and not f.timeouts, f"{proxy}: {f}"
        assert f.burst_s is not None and f.peak_mb > 0 and f.cpu_idle is not None
