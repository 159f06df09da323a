"""Every proxy mode, in one list. Adding a mode is one line in SPECS (and its package)."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from agent.backends.base import Backend, ModeSpec, Setting
from agent.backends.ebpf.mode import SPEC as EBPF
from agent.backends.iptables.mode import SPEC as IPTABLES
from agent.backends.ipvs.mode import SPEC as IPVS
from agent.backends.nftables.mode import SPEC as NFTABLES

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

SPECS: tuple[ModeSpec, ...] = (IPTABLES, NFTABLES, IPVS, EBPF)
MODES: tuple[str, ...] = tuple(s.name for s in SPECS)
DEFAULT_MODE = MODES[0]


def spec(mode: str) -> ModeSpec:
    for s in SPECS:
        if s.name == mode:
            return s
    raise KeyError(f"--proxy-mode {mode!r} is not one of {', '.join(MODES)}")


def settings() -> list[Setting]:
    """Every mode's settings (flags are accepted whatever the mode, as kube-proxy does)."""
    return [s for m in SPECS for s in m.settings]


def ipv6_available() -> bool:
    return os.path.exists("/proc/net/if_inet6")


def make_backend(mode: str, families: tuple[int, ...] | None = None, given: Mapping[str, Any] | None = None,
                 registry: CollectorRegistry | None = None) -> Backend:
    fams = families or ((4, 6) if ipv6_available() else (4,))
    s = spec(mode)
    return s.factory(s.options(fams, given or {}, registry))


def kube_proxy_cleanup_steps(keep: Callable[[Any], bool]) -> list[Callable[[], list[str]]]:
    """A takeover from kube-proxy, in order: its iptables chains and nftables tables first (their
    rules reference its ipsets), then what each of its modes leaves besides (IPVS: virtual servers
    but those `keep` names, kube-ipvs0, ipsets). Each step returns one line per change made."""
    from agent.kernel import kubeproxy

    steps: list[Callable[[], list[str]]] = [kubeproxy.cleanup]
    for s in SPECS:
        if s.kube_proxy_cleanup is not None:
            steps.append(functools.partial(s.kube_proxy_cleanup, keep))
    return steps
