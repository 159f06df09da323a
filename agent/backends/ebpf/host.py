"""The host facts and tools the eBPF mode needs: mounts (bpffs, cgroup2), kernel headers for bcc,
tc filters, and destroying sockets in every network namespace."""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path

from agent.kernel.commands import CommandError, have, run

log = logging.getLogger("agent.ebpf")
TC_PREF = 49152  # our tc filters' priority (kube-proxy-agent's; another user's is never replaced)
_FILTER = re.compile(r"^filter .*?pref (\d+) (\S+)(.*)$", re.MULTILINE)
_BPF_PROG = re.compile(r"handle (0x[0-9a-f]+) (\S+?)(?::\[[^\]]*\])?\s")
_PROG_NAME = re.compile(r"\bname (\S+)")


def mounts(fstype: str) -> list[str]:
    """Mount points of a file system type, from this process's mount table."""
    out = []
    with contextlib.suppress(OSError), open("/proc/self/mountinfo") as fh:
        for line in fh:
            left, _, right = line.partition(" - ")
            if right.split(" ", 1)[0] == fstype:
                out.append(left.split()[4].replace("\\040", " "))
    return out


def cgroup2_root() -> str:
    found = mounts("cgroup2")
    return found[0] if found else ""


BPFFS = "/sys/fs/bpf"  # where bpffs belongs (systemd and Cilium mount it here)


def ensure_bpffs(root: str) -> None:
    """Make `root` a directory on bpffs, mounting bpffs first if it is not (it is not mounted at
    boot on every host): at /sys/fs/bpf when `root` is below it (sysfs holds only the empty mount
    point there, so nothing can be created in it before the mount), else at `root` itself."""
    if not any(root == m or root.startswith(m.rstrip("/") + "/") for m in mounts("bpf")):
        at = BPFFS if root == BPFFS or root.startswith(BPFFS + "/") else root
        os.makedirs(at, exist_ok=True)
        run(["mount", "-t", "bpf", "bpf", at], timeout=30)
        log.info("mounted bpffs at %s", at)
    os.makedirs(root, exist_ok=True)


def headers_gap() -> str:
    """What bcc lacks to compile against this kernel, or ""."""
    build = Path("/lib/modules") / os.uname().release / "build"
    if not (build / "include").is_dir() and not (build / "Makefile").exists():
        return (f"bcc needs kernel headers at {build} (apt-get install linux-headers-amd64 and link "
                f"{build} and ../source to /usr/src/linux-headers-*-amd64 and -common; only UAPI headers are used)")
    return ""


# -- tc ----------------------------------------------------------------------------------------------

class TcError(RuntimeError):
    pass


def tc_filters(dev: str, direction: str) -> list[tuple[int, str, str]]:
    """(pref, handle, name) of every filter on a device's ingress or egress hook: for a bpf filter
    with a program, that program's name; for any other, its kind (u32, flower, a bytecode bpf ...)."""
    try:
        out = run(["tc", "filter", "show", "dev", dev, direction], timeout=30)
    except CommandError:
        return []
    found: dict[tuple[int, str], str] = {}
    for m in _FILTER.finditer(out):
        pref, kind, rest = int(m.group(1)), m.group(2), m.group(3)
        prog = _BPF_PROG.search(rest + " ") if kind == "bpf" else None
        if prog is not None and not prog.group(2).startswith(("not_in_hw", "bytecode", "direct-action")):
            named = _PROG_NAME.search(rest)  # the kernel's name of the program (tc's own label varies)
            found[(pref, prog.group(1))] = named.group(1) if named else prog.group(2)
        elif kind != "bpf" or "bytecode" in rest:
            found.setdefault((pref, ""), kind)
    return [(pref, handle or "0x1", name) for (pref, handle), name in sorted(found.items())]


def tc_attach(dev: str, direction: str, pinned: str, name: str) -> int:
    """Attach a pinned tc program to a device (clsact added if missing) at our priority, replacing
    only our own filter there; a priority taken by someone else moves ours to the next free one.
    Returns the priority used."""
    with contextlib.suppress(CommandError):
        run(["tc", "qdisc", "add", "dev", dev, "clsact"], timeout=30)
    qdiscs = run(["tc", "qdisc", "show", "dev", dev], check=False, timeout=30)
    if "qdisc clsact" not in qdiscs:  # e.g. an `ingress` qdisc holds its place: no egress hook at all
        raise TcError(f"cannot attach {name} to {dev} {direction}: the device has no clsact qdisc and cannot get "
                      f"one (its qdiscs: {' | '.join(ln.strip() for ln in qdiscs.splitlines()) or 'none'})")
    existing = tc_filters(dev, direction)
    taken = {pref for pref, _, prog in existing if not prog.startswith("kpa_")}
    pref = TC_PREF
    while pref in taken:
        pref += 1
    run(["tc", "filter", "replace", "dev", dev, direction, "pref", str(pref), "handle", "0x1", "bpf",
         "direct-action", "object-pinned", pinned], timeout=30)
    if not any(p == pref and prog == name for p, _, prog in tc_filters(dev, direction)):
        qdiscs = run(["tc", "qdisc", "show", "dev", dev], check=False, timeout=30).strip()
        raise TcError(f"tc program {name} is not on {dev} {direction} after attaching it (the device's qdiscs: "
                      f"{qdiscs or 'none'}; it needs clsact, which another qdisc may be holding off)")
    for old_pref, handle, prog in existing:  # ours at another priority (an older run's): gone
        if prog.startswith("kpa_") and old_pref != pref:
            tc_detach(dev, direction, old_pref, handle)
    log.debug("tc program %s on %s %s pref=%d", name, dev, direction, pref)
    return pref


def tc_detach(dev: str, direction: str, pref: int, handle: str = "0x1") -> None:
    with contextlib.suppress(CommandError):
        run(["tc", "filter", "del", "dev", dev, direction, "pref", str(pref), "handle", handle, "bpf"], timeout=30)


def tc_detach_ours(devices: Iterable[str]) -> int:
    n = 0
    for dev in devices:
        for direction in ("ingress", "egress"):
            for pref, handle, prog in tc_filters(dev, direction):
                if prog.startswith("kpa_"):
                    tc_detach(dev, direction, pref, handle)
                    n += 1
    return n


def all_devices() -> list[str]:
    """This network namespace's interfaces (not /sys/class/net: it shows the namespace /sys was
    mounted in, which `nsenter --net` does not change)."""
    import socket

    return sorted(name for _, name in socket.if_nameindex())


# -- sockets -----------------------------------------------------------------------------------------

def netns_paths() -> list[str]:
    """One path per network namespace on the node: named ones and those of running processes."""
    seen: set[tuple[int, int]] = set()
    out: list[str] = []
    candidates = [f"/proc/{p}/ns/net" for p in os.listdir("/proc") if p.isdigit()]
    with contextlib.suppress(OSError):
        candidates += [str(p) for p in Path("/run/netns").iterdir()]
    for path in candidates:
        try:
            st = os.stat(path)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            out.append(path)
    return out


def destroy_udp_sockets(targets: Iterable[tuple[str, int]]) -> int:
    """Destroy UDP sockets connected to any (ip, port) in every network namespace (sock_diag
    destroy, through `ss -K`): their applications get an error and reconnect, to a live backend."""
    pairs = sorted(set(targets))
    if not pairs or not have("ss") or not have("nsenter"):
        return 0
    expr: list[str] = []
    for i, (ip, port) in enumerate(pairs):
        host = f"[{ip}]" if ":" in ip else ip
        expr += (["or"] if i else []) + ["(", "dst", f"{host}:{port}", ")"]
    killed = 0
    for ns in netns_paths():
        try:
            out = run(["nsenter", f"--net={ns}", "ss", "-K", "-u", "-n", *expr], timeout=30)
        except (CommandError, OSError):
            continue
        killed += max(0, len(out.splitlines()) - 1)
    return killed
