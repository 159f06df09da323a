"""Proxy mode name -> backend. Adding a mode is one line here."""

from __future__ import annotations

import importlib.util
import os
import subprocess
from collections.abc import Callable

from agent.backends.base import Backend, UnsupportedMode


def ipv6_available() -> bool:
    return os.path.exists("/proc/net/if_inet6")


def _iptables(families: tuple[int, ...]) -> Backend:
    from agent.backends.iptables.writer import IptablesBackend

    return IptablesBackend(families=families)


def _nftables(families: tuple[int, ...]) -> Backend:
    from agent.backends.nftables.writer import NftablesBackend

    return NftablesBackend(families=families)


def _kernel_gap(mode: str) -> str:
    """What the kernel or machine lacks for a mode, or "" when nothing is missing."""
    if mode == "ipvs":
        if not os.path.exists("/proc/net/ip_vs"):
            subprocess.run(["modprobe", "ip_vs"], capture_output=True, check=False)
        if not os.path.exists("/proc/net/ip_vs"):
            return ("the kernel has no IPVS: /proc/net/ip_vs is missing and `modprobe ip_vs` did not load it "
                    "(on a node, mount /lib/modules and grant CAP_SYS_MODULE, or load ip_vs on the host)")
    if mode == "ebpf":
        if not os.path.isdir("/sys/fs/bpf"):
            return "the BPF filesystem is not mounted at /sys/fs/bpf"
        if importlib.util.find_spec("bcc") is None:
            return "the bcc Python bindings are missing (apt-get install python3-bpfcc)"
    return ""


def _not_built(mode: str) -> Callable[[tuple[int, ...]], Backend]:
    def make(families: tuple[int, ...]) -> Backend:
        gap = _kernel_gap(mode)
        if gap:
            raise UnsupportedMode(
                f"--proxy-mode {mode} cannot run here: {gap}. "
                "Use --proxy-mode nftables or --proxy-mode iptables, which need only netfilter"
            )
        raise UnsupportedMode(
            f"--proxy-mode {mode} is not implemented in this release of kube-proxy-agent; "
            "use --proxy-mode nftables or --proxy-mode iptables"
        )

    return make


BACKENDS: dict[str, Callable[[tuple[int, ...]], Backend]] = {
    "iptables": _iptables,
    "nftables": _nftables,
    "ipvs": _not_built("ipvs"),
    "ebpf": _not_built("ebpf"),
}


def make_backend(mode: str, families: tuple[int, ...] | None = None) -> Backend:
    fams = families or ((4, 6) if ipv6_available() else (4,))
    return BACKENDS[mode](fams)
