"""The size of each legacy iptables table, from the kernel (IPT_SO_GET_INFO / IP6T_SO_GET_INFO).

Legacy iptables has no ruleset generation to tell a periodic check that nobody changed anything
since the agent's last write (nf_tables has: nfgen). Every change to a legacy table replaces the
whole table, and nearly every change alters its entry count or size in bytes, which the kernel
reports without copying the table (at 10k Services `iptables-legacy-save` reads ~100 MB of it). A
change of the same size (a rule replaced in place by one as long) goes unseen by this; the
periodic check still reads back every few checks (nfgen.Untouched.verify_every).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import socket
import struct
from collections.abc import Iterable

SO_GET_INFO = 64  # IPT_SO_GET_INFO and IP6T_SO_GET_INFO
_INFO = struct.Struct("=32sI5I5III")  # name, valid_hooks, hook_entry, underflow, num_entries, size
_libc: ctypes.CDLL | None = None

State = tuple[tuple[int, ...], ...]


def _table_info(sock: socket.socket, level: int, table: str) -> tuple[int, ...]:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    buf = ctypes.create_string_buffer(_INFO.pack(table.encode(), 0, *[0] * 10, 0, 0), _INFO.size)
    size = ctypes.c_uint(_INFO.size)
    if _libc.getsockopt(sock.fileno(), level, SO_GET_INFO, buf, ctypes.byref(size)) != 0:
        raise OSError(ctypes.get_errno(), f"IPT_SO_GET_INFO {table}")
    return tuple(_INFO.unpack(buf.raw)[1:])


def state(families: Iterable[int], tables: Iterable[str]) -> State | None:
    """(hooks, entry count, size, ...) of each table in each family; None when one cannot be read
    (no legacy iptables in the kernel, no permission)."""
    out = []
    try:
        for fam in families:
            af, level = (socket.AF_INET, socket.IPPROTO_IP) if fam == 4 else (socket.AF_INET6, socket.IPPROTO_IPV6)
            with socket.socket(af, socket.SOCK_RAW, socket.IPPROTO_RAW) as sock:
                out += [(fam, *_table_info(sock, level, table)) for table in tables]
    except (OSError, AttributeError):
        return None
    return tuple(out)
