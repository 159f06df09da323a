"""Proxy mode name -> backend. Adding a mode is one line here."""

from __future__ import annotations

import os
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


def _not_built(mode: str) -> Callable[[tuple[int, ...]], Backend]:
    def make(families: tuple[int, ...]) -> Backend:
        raise UnsupportedMode(
            f"--proxy-mode {mode} is not implemented in this build of kube-proxy-agent; "
            "use --proxy-mode iptables or --proxy-mode nftables"
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
