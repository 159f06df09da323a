"""The iptables mode's own metrics, with kube-proxy's names (its iptables proxier registers the
same ones, and only in iptables mode)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class IptablesMetrics:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        r = registry or CollectorRegistry()
        p = "kubeproxy_sync_proxy_rules_iptables_"
        self.total = Gauge(p + "total", "Total number of iptables rules owned by kube-proxy", ["table"], registry=r)
        self.last = Gauge(p + "last", "Number of iptables rules written by kube-proxy in last sync", ["table"],
                          registry=r)
        self.restore_failures = Counter(p + "restore_failures", "Cumulative proxy iptables restore failures",
                                        registry=r)
        self.partial_restore_failures = Counter(
            p + "partial_restore_failures", "Cumulative proxy iptables partial restore failures", registry=r)

    def written(self, written: dict[str, int], totals: dict[str, int]) -> None:
        for table, n in written.items():
            self.last.labels(table).set(n)
        for table, n in totals.items():
            self.total.labels(table).set(n)

    def failed(self, partial: bool) -> None:
        self.restore_failures.inc()
        if partial:
            self.partial_restore_failures.inc()
