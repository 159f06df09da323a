"""The IPVS mode's own metrics: kube-proxy's (its IPVS proxier also counts iptables restore
failures) and ours, sizes of what the mode holds in the kernel."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class IpvsMetrics:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        r = registry or CollectorRegistry()
        self.restore_failures = Counter(
            "kubeproxy_sync_proxy_rules_iptables_restore_failures", "Cumulative proxy iptables restore failures",
            registry=r)
        p = "kubeproxyagent_ipvs_"
        self.virtual_servers = Gauge(p + "virtual_servers", "IPVS virtual servers the agent holds", registry=r)
        self.real_servers = Gauge(p + "real_servers", "IPVS real servers of those virtual servers (weight 1)",
                                  registry=r)
        self.graceful = Gauge(p + "graceful_real_servers",
                              "Real servers at weight 0, waiting for their connections to end before deletion",
                              registry=r)
        self.addresses = Gauge(p + "dummy_addresses", "Addresses on the IPVS dummy interface", registry=r)
        self.failures = Counter(p + "sync_failures", "Syncs the kernel refused (netlink, ipset or iptables)",
                                registry=r)
