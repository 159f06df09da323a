"""Digests of rules read back over netlink leave out what traffic changes (nftrules.without_counters)."""

from __future__ import annotations

import struct

from agent.kernel.netlink import nla, nla_nested, nla_str
from agent.kernel.nftrules import without_counters


def _expr(name: str, data: bytes, nested_flag: bool) -> bytes:
    elem = nla_nested(1, [nla_str(1, name), nla_nested(2, [data])])
    if not nested_flag:  # a dump's list elements come without NLA_F_NESTED
        elem = elem[:2] + struct.pack("=H", 1) + elem[4:]
    return elem


def _rule(packets: int, nested_flag: bool, target: bytes = b"\x00\x00\x00\x01") -> bytes:
    counter = nla(2, struct.pack("!Q", packets)) + nla(1, struct.pack("!Q", packets * 60))
    exprs = [_expr("payload", nla(1, b"\x00\x00\x00\x01"), nested_flag),
             _expr("counter", counter, nested_flag),
             _expr("immediate", nla(1, target), nested_flag)]
    return nla_str(1, "nat") + nla_str(2, "KPA-SVC-X") + nla_nested(4, exprs)


def test_counters_are_cut_out_whatever_they_count() -> None:
    for flag in (False, True):
        assert without_counters(_rule(0, flag)) == without_counters(_rule(12345, flag))
        assert b"counter" not in without_counters(_rule(7, flag))
        assert b"immediate" in without_counters(_rule(7, flag))
        # two rules of a chain, each with its counter
        two = _rule(1, flag) + _rule(2, flag)
        assert without_counters(two) == without_counters(_rule(0, flag) + _rule(9, flag))


def test_anything_else_still_counts() -> None:
    assert without_counters(_rule(1, False)) != without_counters(_rule(1, False, target=b"\x00\x00\x00\x02"))
    assert without_counters(b"") == b""
    assert without_counters(b"counter\0") == b"counter\0"  # not an expression: left alone
