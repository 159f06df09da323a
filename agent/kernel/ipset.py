"""ipsets: sets created, destroyed and read with the `ipset` tool (`ipset restore`, `ipset save`);
entries added and deleted over netlink (`change`), many per send().

Entries go over netlink because starting a process is most of what a small change costs where
processes are slow to start (a user-mode-linux guest: ~500 ms of a 600 ms IPVS endpoint change at
10k Services); the tool remains the fallback when the netlink request cannot be built or sent."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterable

from agent.kernel.commands import CommandError, have, run
from agent.kernel.netlink import NLA_F_NESTED, KeptSocket, NetlinkError, Request, ip_bytes, nla, nla_str, nla_u8

log = logging.getLogger("agent.ipset")
NETLINK_NETFILTER = 12
NFNL_SUBSYS_IPSET = 6
CMD_ADD, CMD_DEL = 9, 10
PROTOCOL = 7  # IPSET_PROTOCOL
ATTR_PROTOCOL, ATTR_SETNAME, ATTR_DATA = 1, 2, 7
DATA_IP, DATA_PORT, DATA_PROTO, DATA_IP2, DATA_CIDR2 = 1, 4, 7, 20, 21
IPADDR_IPV4, IPADDR_IPV6 = 1, 2
NLA_F_NET_BYTEORDER = 1 << 14
_CHANGES = KeptSocket(NETLINK_NETFILTER, timeout=30.0)  # entry changes at every sync: one socket kept
L4 = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP, "sctp": 132}
# the kernel's own error numbers for ipset requests (include/uapi/linux/netfilter/ipset/ip_set.h)
ERRORS = {4097: "protocol error", 4098: "set type not found", 4102: "set type mismatch",
          4104: "invalid CIDR", 4106: "invalid family", 4109: "invalid IPv4 address",
          4110: "invalid IPv6 address", 4352: "set is full"}


class IpsetError(RuntimeError):
    pass


def available() -> bool:
    return have("ipset")


def restore(lines: Iterable[str]) -> None:
    """Apply `ipset restore -exist` lines (create, add, del, flush, destroy, swap) in one process.
    -exist: adding what is there or deleting what is not is no error."""
    text = "".join(line if line.endswith("\n") else line + "\n" for line in lines)
    if not text:
        return
    try:
        run(["ipset", "restore", "-exist"], stdin=text, timeout=120)
    except CommandError as exc:
        raise IpsetError(f"ipset restore failed: {exc.stderr or exc}") from exc


def members(prefix: str) -> dict[str, set[str]]:
    """Every set whose name starts with `prefix`, with its entries (as `ipset save` prints them)."""
    try:
        out = run(["ipset", "save"], timeout=120)
    except CommandError as exc:
        raise IpsetError(f"ipset save failed: {exc.stderr or exc}") from exc
    sets: dict[str, set[str]] = {}
    for line in out.splitlines():
        parts = line.split(" ", 2)
        if len(parts) < 3 or not parts[1].startswith(prefix):
            continue
        if parts[0] == "create":
            sets.setdefault(parts[1], set())
        elif parts[0] == "add":
            sets.setdefault(parts[1], set()).add(parts[2].split(" ", 1)[0])
    return sets


def destroy(names: Iterable[str]) -> None:
    restore(f"destroy {n}" for n in names)


def _addr(kind: int, address: str) -> tuple[int, bytes]:
    family, raw = ip_bytes(address)
    inner = IPADDR_IPV4 if family == socket.AF_INET else IPADDR_IPV6
    return family, nla(kind | NLA_F_NESTED, nla(inner | NLA_F_NET_BYTEORDER, raw))


def entry_request(line: str) -> Request:
    """The netlink request for one `add NAME ENTRY` or `del NAME ENTRY` line (ENTRY as `ipset`
    writes it for hash:ip, hash:ip,port, hash:ip,port,ip and hash:ip,port,net). Like
    `ipset -exist`: adding what is there or deleting what is not is no error. ValueError when the
    line is not such a line."""
    verb, name, entry = line.split()
    if verb not in ("add", "del"):
        raise ValueError(f"not an entry change: {line!r}")
    parts = entry.split(",")
    family, data = _addr(DATA_IP, parts[0])
    if len(parts) >= 2:
        proto, _, port = parts[1].partition(":")
        data += nla(DATA_PORT | NLA_F_NET_BYTEORDER, int(port).to_bytes(2, "big")) + nla_u8(DATA_PROTO, L4[proto])
    if len(parts) == 3:
        address, _, cidr = parts[2].partition("/")
        family2, ip2 = _addr(DATA_IP2, address)
        if family2 != family:
            raise ValueError(f"mixed families: {line!r}")
        data += ip2 + (nla_u8(DATA_CIDR2, int(cidr)) if cidr else b"")
    elif len(parts) > 3:
        raise ValueError(f"unknown entry shape: {line!r}")
    payload = (bytes([family, 0, 0, 0]) + nla_u8(ATTR_PROTOCOL, PROTOCOL) + nla_str(ATTR_SETNAME, name)
               + nla(ATTR_DATA | NLA_F_NESTED, data))
    return Request((NFNL_SUBSYS_IPSET << 8) | (CMD_ADD if verb == "add" else CMD_DEL), payload, line)


def change(lines: Iterable[str]) -> None:
    """Apply `add`/`del` entry lines: over netlink, many per send(); with `ipset restore` when
    a line is not one netlink can carry or netlink cannot be used here. IpsetError names the first
    refused line (the others took effect)."""
    todo = [ln.strip() for ln in lines if ln.strip()]
    if not todo:
        return
    try:
        requests = [entry_request(ln) for ln in todo]
    except (ValueError, KeyError):
        restore(todo)
        return
    try:
        with _CHANGES.use() as sock:
            errors = sock.apply(requests)
    except OSError as exc:  # no netlink here (or no permission): the tool may still work
        log.debug("ipset over netlink failed (%s); using ipset restore", exc)
        restore(todo)
        return
    if errors:
        first: NetlinkError = errors[0]
        code = first.errno or 0
        raise IpsetError(f"ipset refused {len(errors)} of {len(todo)} change(s), first: {first.what}: "
                         f"{ERRORS.get(code) or os.strerror(code)}")
