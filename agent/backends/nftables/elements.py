"""A partial sync's element changes (RenderResult.elements) encoded for agent.kernel.nftelements:
the endpoint maps (`typeof numgen random mod 1 : ip daddr`: a number in host order -> an
address) and the hairpin set (address . address)."""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterable

from agent.backends.nftables import names as N
from agent.backends.nftables.render import ElementChange
from agent.kernel.nftelements import ElementWrite

_NUMBER = struct.Struct("=I")


def _address(family: int, text: str) -> bytes:
    return socket.inet_pton(socket.AF_INET if family == 4 else socket.AF_INET6, text.strip())


def _encode(family: int, mapname: str, key: str, value: str) -> tuple[bytes, bytes | None]:
    if mapname == N.HAIRPIN:
        return b"".join(_address(family, part) for part in key.split(" . ")), None
    return _NUMBER.pack(int(key)), _address(family, value) if value else None


def element_writes(family: int, changes: Iterable[ElementChange]) -> list[ElementWrite]:
    """One write per run of changes to the same map with the same verb, in the changes' order."""
    out: list[ElementWrite] = []
    run: list[tuple[bytes, bytes | None]] = []
    head: tuple[bool, str] | None = None
    for add, mapname, key, value in changes:
        if head != (add, mapname):
            if head is not None:
                out.append(ElementWrite(head[0], family, N.TABLE, head[1], tuple(run)))
            head, run = (add, mapname), []
        run.append(_encode(family, mapname, key, value if add else ""))
    if head is not None:
        out.append(ElementWrite(head[0], family, N.TABLE, head[1], tuple(run)))
    return out
