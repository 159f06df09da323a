"""A partial sync's element changes (RenderResult.elements) encoded for agent.kernel.nftelements:
the endpoint maps (`typeof numgen random mod 1 : ip daddr`: a number in host order -> an
address) and the hairpin set (address . address)."""

from __future__ import annotations

import itertools
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
    return [ElementWrite(add, family, N.TABLE, mapname,
                         tuple(_encode(family, mapname, key, value if add else "") for _, _, key, value in run))
            for (add, mapname), run in itertools.groupby(changes, key=lambda c: (c[0], c[1]))]
