"""The eBPF mode's own metrics: map entry counts and refused syncs."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class EbpfMetrics:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        r = registry or CollectorRegistry()
        p = "kubeproxyagent_ebpf_"
        self.entries = Gauge(p + "map_entries", "Service entries and backends the eBPF maps hold", ["map"], registry=r)
        self.failures = Counter(p + "map_update_failures", "Syncs whose BPF map updates (or attachments) failed",
                                registry=r)
