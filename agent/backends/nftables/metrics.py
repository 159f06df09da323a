"""The nftables mode's own metrics: kube-proxy's nftables names, and ours (per-map element counts,
transaction failures, kept for the dashboards that already use them)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class NftablesMetrics:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        r = registry or CollectorRegistry()
        p = "kubeproxy_sync_proxy_rules_nftables_"
        self.sync_failures = Counter(p + "sync_failures", "Cumulative proxy nftables sync failures", registry=r)
        self.cleanup_failures = Counter(p + "cleanup_failures", "Cumulative proxy nftables cleanup failures",
                                        registry=r)
        self.transaction_failures = Counter(
            p + "transaction_failures", "Cumulative nft transactions the kernel refused", registry=r)
        self.elements = Gauge(p + "elements", "Number of elements in each nftables map or set", ["map"], registry=r)

    def written(self, totals: dict[str, int]) -> None:
        for name, n in totals.items():
            self.elements.labels(name).set(n)

    def failed(self) -> None:
        self.sync_failures.inc()
        self.transaction_failures.inc()
