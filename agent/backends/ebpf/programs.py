"""The eBPF mode's programs and maps by name: what lb.c defines, what the compiler process loads
and what the agent attaches and writes."""

from __future__ import annotations

from pathlib import Path

SOURCE = Path(__file__).with_name("lb.c")
CFLAGS = ("-Wno-unused-function", "-Wno-macro-redefined")
# program name -> (attach type, for the cgroup hooks; None: tc)
PROGRAMS: dict[str, int | None] = {
    "kpa_connect4": 10, "kpa_connect6": 11, "kpa_sendmsg4": 14, "kpa_sendmsg6": 15,
    "kpa_recvmsg4": 19, "kpa_recvmsg6": 20, "kpa_peer4": 29, "kpa_peer6": 30,
    "kpa_tc_ingress": None, "kpa_tc_egress": None,
}
# every map lb.c pins (under the layout's pin directory, by these names)
MAPS = ("svcs", "backends", "revnat", "udpflows", "affinity", "ct_fwd", "ct_rev", "ranges")
