"""Reading iptables-nft's chains back over netlink: per chain, its rule count and a digest.

`iptables-nft-save` of a 10k-Service nat table (434k lines) is a child of about 250 MB. This asks
nf_tables for the table's chains, then for each chain of ours its rules (one dump per chain: the
kernel's dump of a whole table restarts from its first rule for every datagram, which took 30 s
there), and keeps a digest of each chain's rules, not the rules: about 50 MB, as fast as the child.

A digest covers what the kernel holds of each rule (its expressions, comment, handle) except the
counters, which traffic changes: it is only comparable with another from this module, like
iptables-save text digests are only comparable with each other.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterable, Iterator

from agent.kernel.netlink import Socket, cstr, nla_str, parse_attrs
from agent.kernel.nfgen import NETLINK_NETFILTER, NFGENMSG, NFNL_SUBSYS_NFTABLES

NFT_MSG_GETCHAIN = 4
NFT_MSG_GETRULE = 7
NFTA_CHAIN_TABLE = 1
NFTA_CHAIN_NAME = 3
NFTA_RULE_TABLE = 1
NFTA_RULE_CHAIN = 2
FAMILY = {4: socket.AF_INET, 6: socket.AF_INET6}

# The first attribute of an expression named "counter" (NFTA_EXPR_NAME): its packet and byte
# counts are all that traffic changes in a rule. The list element (NFTA_LIST_ELEM, the nested flag
# set or not: dumps leave it out) holding it is cut out whole.
_COUNTER = struct.pack("=HH", 12, 1) + b"counter\0"
_ELEMENT = struct.Struct("=HH")
_LIST_ELEM = 1


def without_counters(blob: bytes) -> bytes:
    """`blob` (rule messages) with every counter expression cut out."""
    parts = []
    start = 0
    at = blob.find(_COUNTER, _ELEMENT.size)
    while at >= 0:
        size, kind = _ELEMENT.unpack_from(blob, at - _ELEMENT.size)
        if kind & 0x3FFF == _LIST_ELEM and size >= _ELEMENT.size + len(_COUNTER):
            parts.append(blob[start:at - _ELEMENT.size])
            start = at - _ELEMENT.size + ((size + 3) & ~3)
        at = blob.find(_COUNTER, max(start + _ELEMENT.size, at + 1))
    parts.append(blob[start:])
    return b"".join(parts)


def _chains(sock: Socket, fam: int) -> Iterator[tuple[str, str]]:
    """(table, chain) of every chain of the family (a chain dump has every table's: the kernel
    filters rule dumps by table and chain, not chain dumps)."""
    for body in sock.stream((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETCHAIN, NFGENMSG.pack(fam, 0, 0)):
        attrs = parse_attrs(body, NFGENMSG.size)
        if NFTA_CHAIN_NAME in attrs and NFTA_CHAIN_TABLE in attrs:
            yield cstr(attrs[NFTA_CHAIN_TABLE]), cstr(attrs[NFTA_CHAIN_NAME])


def any_chain(family: int, prefix: str) -> bool | None:
    """Whether a chain of any IPv`family` table is named `prefix`*, from chain names alone (`nft
    list chains` was a 116 MB child at 10k Services); None when nf_tables cannot be read."""
    try:
        with Socket(NETLINK_NETFILTER, timeout=30.0) as sock:
            return any(name.startswith(prefix) for _, name in _chains(sock, FAMILY[family]))
    except (OSError, ValueError, struct.error):
        return None


def chain_digests(family: int, tables: Iterable[str], prefix: str) -> dict[str, dict[str, tuple[int, int]]] | None:
    """Table -> chain name -> (rule count, digest) for each chain of `tables` (IPv`family`) whose
    name starts with `prefix` (a table that does not exist has none); None when nf_tables cannot
    be read."""
    fam = FAMILY[family]
    out: dict[str, dict[str, tuple[int, int]]] = {t: {} for t in tables}
    try:
        with Socket(NETLINK_NETFILTER, timeout=30.0) as sock:
            names = [(t, name) for t, name in _chains(sock, fam) if t in out and name.startswith(prefix)]
            for table, name in names:
                request = NFGENMSG.pack(fam, 0, 0) + nla_str(NFTA_RULE_TABLE, table) + nla_str(NFTA_RULE_CHAIN, name)
                # after the nfgenmsg, whose res_id carries the ruleset generation; a chain deleted
                # since it was listed dumps no rules (drift for a chain of ours, rewritten)
                rules = [bytes(body[NFGENMSG.size:])
                         for body in sock.stream((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETRULE, request)]
                out[table][name] = (len(rules), hash(without_counters(b"".join(rules))))
    except (OSError, ValueError, struct.error):
        return None
    return out
