"""The nf_tables ruleset generation of this network namespace, over netlink (NFT_MSG_GETGEN).

The kernel bumps it with every committed nf_tables transaction, whoever commits it: nft,
libnftables, iptables-nft, firewalld. A mode that reads it right after its own write and finds it
unchanged at its next periodic check knows nobody has touched nf_tables since, so there is no
drift to look for and the check can skip reading the ruleset back."""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import Callable, Hashable

from agent.kernel.netlink import KeptSocket, Socket, cstr, parse_attrs

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_GETTABLE = 1
NFT_MSG_GETGEN = 16
NFTA_TABLE_NAME = 1
NFTA_GEN_ID = 1
FAMILIES = {socket.AF_INET: "ip", socket.AF_INET6: "ip6", 1: "inet", 3: "arp", 7: "bridge", 5: "netdev"}
NFGENMSG = struct.Struct("=BBH")  # family, version, res_id (big endian: a batch's subsystem)


_GENERATION = KeptSocket(NETLINK_NETFILTER, timeout=2.0)  # read after every write: kept open


def generation() -> int | None:
    """The current generation, or None when it cannot be read (no nf_tables, no permission)."""
    with contextlib.suppress(OSError, ValueError, struct.error), _GENERATION.use() as sock:
        reply = sock.get((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETGEN,
                         NFGENMSG.pack(socket.AF_UNSPEC, 0, 0), "nf_tables generation")
        attrs = parse_attrs(reply, NFGENMSG.size)
        if NFTA_GEN_ID in attrs:
            return int(struct.unpack_from("!I", attrs[NFTA_GEN_ID])[0])
    return None


def tables() -> set[tuple[str, str]] | None:
    """(family keyword, name) of every nf_tables table, from a dump of table objects only (nft 1.0's
    `list tables` dumped every rule of every table, minutes with a big iptables-nft ruleset); None
    when nf_tables cannot be read."""
    with contextlib.suppress(OSError, ValueError, struct.error), Socket(NETLINK_NETFILTER, timeout=5.0) as sock:
        out: set[tuple[str, str]] = set()
        for msg in sock.dump((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETTABLE, NFGENMSG.pack(socket.AF_UNSPEC, 0, 0)):
            attrs = parse_attrs(msg, NFGENMSG.size)
            if NFTA_TABLE_NAME in attrs:
                out.add((FAMILIES.get(msg[0], str(msg[0])), cstr(attrs[NFTA_TABLE_NAME])))
        return out
    return None


class Untouched:
    """Tells a periodic check whether nf_tables is as the mode's last write left it.

    `before_write()` just before and `wrote()` just after every successful write (never after a
    failed one: `forget()`); `holds()` at a periodic check: True when nobody else has committed
    since (the generation is the one read after our last write, and was so before each later
    write), so the check may skip reading the ruleset back. Every `verify_every`-th check verifies
    anyway, which bounds the one blind spot: a foreign commit during our write. `probe` replaces
    the generation with another reading of the kernel's state (legacy iptables: xtinfo.state)."""

    def __init__(self, verify_every: int = 10, probe: Callable[[], Hashable | None] | None = None) -> None:
        self.verify_every = verify_every
        self._probe = probe
        self._gen: Hashable | None = None
        self._skipped = 0
        # at the last holds(): someone committed since our last write (not just a verifying check)
        self.moved = False
        self._foreign = False  # a commit by someone else seen just before one of our writes

    def _read(self) -> Hashable | None:
        return self._probe() if self._probe is not None else generation()

    def before_write(self) -> None:
        """Just before our own write: a commit by someone else since our last write would be taken
        in by the generation read after this one; remember it for the next check."""
        if self._gen is not None and not self._foreign and self._read() != self._gen:
            self._foreign = True

    def wrote(self) -> None:
        self._gen = self._read()

    def forget(self) -> None:
        self._gen = None
        self._foreign = False

    def holds(self) -> bool:
        now = self._read()
        self.moved = self._foreign or (self._gen is not None and now != self._gen)
        if self._gen is None or self._skipped + 1 >= self.verify_every or self.moved:
            # the check reads the ruleset back now: what others committed so far is seen by it
            self._skipped = 0
            self._foreign = False
            if self._gen is not None:
                self._gen = now
            return False
        self._skipped += 1
        return True
