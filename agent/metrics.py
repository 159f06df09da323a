"""Prometheus metrics with kube-proxy's names, labels and buckets, so existing dashboards work."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


def _exponential(start: float, factor: float, count: int) -> list[float]:
    return [start * factor**i for i in range(count)]


def _linear(start: float, width: float, count: int) -> list[float]:
    return [start + width * i for i in range(count)]


SYNC_BUCKETS = _exponential(0.001, 2, 15)  # kube-proxy: ExponentialBuckets(0.001, 2, 15)
NETWORK_PROGRAMMING_BUCKETS = (
    _linear(0.25, 0.25, 2) + _linear(1, 1, 59) + _linear(60, 5, 12) + _linear(120, 30, 7)
)


class Metrics:
    """The metrics every mode shares, on one registry (so tests can make several). A mode registers
    its own (kube-proxy's metrics for that mode) on the same registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        p = "kubeproxy_"
        self.sync_duration = Histogram(
            p + "sync_proxy_rules_duration_seconds", "SyncProxyRules latency in seconds",
            buckets=SYNC_BUCKETS, registry=r)
        self.sync_full_duration = Histogram(
            p + "sync_full_proxy_rules_duration_seconds", "SyncProxyRules latency in seconds for full resyncs",
            buckets=SYNC_BUCKETS, registry=r)
        self.sync_partial_duration = Histogram(
            p + "sync_partial_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for partial resyncs", buckets=SYNC_BUCKETS, registry=r)
        self.network_programming = Histogram(
            p + "network_programming_duration_seconds", "In Cluster Network Programming Latency in seconds",
            buckets=NETWORK_PROGRAMMING_BUCKETS, registry=r)
        self.last_sync = Gauge(
            p + "sync_proxy_rules_last_timestamp_seconds", "The last time proxy rules were successfully synced",
            registry=r)
        self.last_queued = Gauge(
            p + "sync_proxy_rules_last_queued_timestamp_seconds",
            "The last time a sync of proxy rules was queued", registry=r)
        self.last_programmed = Gauge(
            "kubeproxyagent_sync_proxy_rules_last_programmed_queued_timestamp_seconds",
            "When the newest change that a successful sync has programmed was queued", registry=r)
        self.endpoint_changes_pending = Gauge(
            p + "sync_proxy_rules_endpoint_changes_pending", "Pending proxy rules Endpoint changes", registry=r)
        self.endpoint_changes = Counter(
            p + "sync_proxy_rules_endpoint_changes", "Cumulative proxy rules Endpoint changes", registry=r)
        self.service_changes_pending = Gauge(
            p + "sync_proxy_rules_service_changes_pending", "Pending proxy rules Service changes", registry=r)
        self.service_changes = Counter(
            p + "sync_proxy_rules_service_changes", "Cumulative proxy rules Service changes", registry=r)
        self.no_local_endpoints = Gauge(
            p + "sync_proxy_rules_no_local_endpoints_total",
            "Number of services with a Local traffic policy and no endpoints", ["traffic_policy"], registry=r)
        self.healthz = Counter(p + "proxy_healthz", "Cumulative proxy healthz HTTP status", ["code"], registry=r)
        self.livez = Counter(p + "proxy_livez", "Cumulative proxy livez HTTP status", ["code"], registry=r)
        self.invalid_objects = Counter(
            "kubeproxyagent_invalid_objects", "API objects (or parts of them) skipped as invalid",
            ["kind", "reason"], registry=r)
        self.api_errors = Counter(
            "kubeproxyagent_api_errors", "Failed list/watch calls to the Kubernetes API", ["resource"], registry=r)
