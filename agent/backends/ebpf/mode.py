"""The eBPF mode as the registry lists it, with its settings (where the BPF file system and the
cgroup v2 hierarchy are, which devices get the tc programs)."""

from __future__ import annotations

import importlib.util

from agent.backends.base import Backend, ModeOptions, ModeSpec, Setting


def kernel_gap() -> str:
    """What this machine lacks for the eBPF mode, or ""."""
    if importlib.util.find_spec("bcc") is None:
        return "the bcc Python bindings are missing (apt-get install python3-bpfcc; run with Debian's python3)"
    return ""


def _make(options: ModeOptions) -> Backend:
    from agent.backends.ebpf.writer import EbpfBackend

    return EbpfBackend(families=options.families, settings=options.settings, registry=options.registry)


SETTINGS = (
    Setting("ebpf_bpffs_root", "--ebpf-bpffs-root", ("ebpf", "bpffsRoot"), "str", "/sys/fs/bpf",
            "where the BPF file system is (mounted there if it is not); pins go under kube-proxy-agent/"),
    Setting("ebpf_cgroup_root", "--ebpf-cgroup-root", ("ebpf", "cgroupRoot"), "str", "",
            "the cgroup v2 directory whose sockets get service load balancing (default: the cgroup2 mount)"),
    Setting("ebpf_devices", "--ebpf-devices", ("ebpf", "devices"), "str", "",
            "comma-separated interfaces for the tc programs (default: every interface with a node address)"),
)

SPEC = ModeSpec(
    name="ebpf",
    summary="socket-level load balancing (cgroup hooks) and tc programs for external traffic, with bcc",
    factory=_make,
    settings=SETTINGS,
    frontends=True,
)
