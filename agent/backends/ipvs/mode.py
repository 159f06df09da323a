"""The IPVS mode as the registry lists it, with kube-proxy's --ipvs-* flags and `ipvs:` settings."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from typing import Any

from agent.backends.base import Backend, ModeOptions, ModeSpec, Setting


def kernel_gap() -> str:
    """What the kernel lacks for IPVS, or ""."""
    if not os.path.exists("/proc/net/ip_vs"):
        subprocess.run(["modprobe", "ip_vs"], capture_output=True, check=False)
    if not os.path.exists("/proc/net/ip_vs"):
        return ("the kernel has no IPVS: /proc/net/ip_vs is missing and `modprobe ip_vs` did not load it "
                "(on a node, mount /lib/modules and grant CAP_SYS_MODULE, or load ip_vs on the host)")
    return ""


def _make(options: ModeOptions) -> Backend:
    from agent.backends.ipvs.writer import IpvsBackend

    return IpvsBackend(families=options.families, settings=options.settings, registry=options.registry)


def _kube_proxy_cleanup(keep: Callable[[Any], bool]) -> list[str]:
    from agent.backends.ipvs.takeover import cleanup

    return cleanup(keep)


SETTINGS = (
    Setting("ipvs_scheduler", "--ipvs-scheduler", ("ipvs", "scheduler"), "str", "rr",
            "IPVS scheduler (rr, wrr, lc, wlc, lblc, lblcr, sh, dh, sed, nq, mh)"),
    Setting("ipvs_sync_period", "--ipvs-sync-period", ("ipvs", "syncPeriod"), "duration", 30.0,
            "full resync interval in ipvs mode (overrides --sync-period)", overrides="sync_period"),
    Setting("ipvs_min_sync_period", "--ipvs-min-sync-period", ("ipvs", "minSyncPeriod"), "duration", 0.0,
            "minimum interval between syncs in ipvs mode (overrides --min-sync-period)",
            overrides="min_sync_period"),
    Setting("ipvs_strict_arp", "--ipvs-strict-arp", ("ipvs", "strictARP"), "bool", False,
            "set arp_ignore=1 and arp_announce=2 so the dummy interface's addresses get no ARP answers"),
    Setting("ipvs_exclude_cidrs", "--ipvs-exclude-cidrs", ("ipvs", "excludeCIDRs"), "cidrs", (),
            "CIDRs whose virtual servers the agent never deletes (another tool's)"),
    Setting("ipvs_tcp_timeout", "--ipvs-tcp-timeout", ("ipvs", "tcpTimeout"), "duration", 0.0,
            "IPVS timeout for idle TCP connections (0: leave the kernel's)"),
    Setting("ipvs_tcpfin_timeout", "--ipvs-tcpfin-timeout", ("ipvs", "tcpFinTimeout"), "duration", 0.0,
            "IPVS timeout for TCP connections after FIN (0: leave the kernel's)"),
    Setting("ipvs_udp_timeout", "--ipvs-udp-timeout", ("ipvs", "udpTimeout"), "duration", 0.0,
            "IPVS timeout for UDP packets (0: leave the kernel's)"),
)

SPEC = ModeSpec(
    name="ipvs",
    summary="IPVS virtual servers through netlink; a dummy interface holds service addresses",
    factory=_make,
    settings=SETTINGS,
    owned_links=("kpa-ipvs0",),
    frontends=True,
    kube_proxy_cleanup=_kube_proxy_cleanup,
)
