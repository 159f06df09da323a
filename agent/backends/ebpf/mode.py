"""The eBPF mode as the registry lists it."""

from __future__ import annotations

import importlib.util
import os

from agent.backends.base import Backend, ModeOptions, ModeSpec, NotBuilt


def kernel_gap() -> str:
    """What this machine lacks for the eBPF mode, or ""."""
    if not os.path.isdir("/sys/fs/bpf"):
        return "the BPF filesystem is not mounted at /sys/fs/bpf"
    if importlib.util.find_spec("bcc") is None:
        return "the bcc Python bindings are missing (apt-get install python3-bpfcc)"
    return ""


def _make(options: ModeOptions) -> Backend:
    return NotBuilt("ebpf", kernel_gap)


SPEC = ModeSpec(
    name="ebpf",
    summary="BPF socket hooks and tc programs with bcc (not in this release)",
    factory=_make,
    built=False,
)
