"""Which proxy modes the kernel and end-to-end suites run: every mode in the registry that this
machine can run. The others are not parametrized at all; each suite prints them once, with the
reason (a mode not built yet, a kernel without IPVS, no bcc ...), instead of a skip per test."""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable

from agent.backends import registry
from agent.backends.base import UnsupportedMode

NOT_RUN: dict[str, str] = {}  # mode -> why its tests were not run


@functools.cache
def why_unusable(mode: str) -> str:
    """"" when this machine can run `mode`, else the mode's own reason."""
    if os.geteuid() != 0:
        return ""  # the suites skip every test with "needs root" themselves
    try:
        registry.make_backend(mode, (4,)).check_supported()
    except (UnsupportedMode, ImportError, OSError) as exc:
        return str(exc) or type(exc).__name__
    return ""


def runnable(chosen: Iterable[str]) -> list[str]:
    out = []
    for mode in chosen:
        why = why_unusable(mode)
        if why:
            NOT_RUN[mode] = why
        else:
            out.append(mode)
    return out


def summary_lines(suite: str, instead: dict[str, str] | None = None) -> list[str]:
    """One line per mode not run here; `instead` says, per mode, where it runs instead."""
    alt = instead or {}
    return [f"{suite}: {mode} mode not run on this kernel ({why})" + (f"; {alt[mode]}" if mode in alt else "")
            for mode, why in sorted(NOT_RUN.items())]
