"""This node's own IP addresses, read from the kernel over netlink (one dump, decoded with struct:
a node in IPVS mode holds one address per Service on its dummy interface)."""

from __future__ import annotations

import socket
from collections.abc import Iterable

from agent.kernel.netlink import NETLINK_ROUTE, Socket, dump_addresses


def local_ips(exclude_links: Iterable[str] = ()) -> list[str]:
    """Every address on the node, except those on `exclude_links` (a mode's own interfaces, such
    as the IPVS dummy interface holding service addresses). An address also held by another
    interface stays."""
    skip = set()
    for name in exclude_links:
        try:
            skip.add(socket.if_nametoindex(name))
        except OSError:
            continue  # not created (yet)
    with Socket(NETLINK_ROUTE) as sock:
        return sorted({a.address for a in dump_addresses(sock) if a.ifindex not in skip})
