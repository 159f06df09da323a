"""Which iptables variant (nft or legacy) this node uses, and reading what is programmed.

Like kube-proxy's images, pick the variant that already holds rules, so a node's rules are never
split across the two; nft wins a tie (Debian's default).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

from agent.kernel.commands import CommandError, have, run

VARIANTS = ("nft", "legacy")


@dataclass(frozen=True, slots=True)
class Tools:
    variant: str  # "nft", "legacy" or "" (plain binaries)

    def binary(self, family: int, what: str) -> str:
        base = "iptables" if family == 4 else "ip6tables"
        suffix = f"-{self.variant}" if self.variant else ""
        return f"{base}{suffix}-{what}" if what else f"{base}{suffix}"


def count_rules(save_output: str) -> int:
    return sum(1 for line in save_output.splitlines() if line.startswith("-A "))


def detect_variant() -> tuple[Tools, str]:
    """Return the tools to use and a sentence saying why."""
    counts: dict[str, int] = {}
    for v in VARIANTS:
        tools = Tools(v)
        if not have(tools.binary(4, "restore")):
            continue
        total = 0
        for fam in (4, 6):
            with contextlib.suppress(CommandError, OSError):
                total += count_rules(run([tools.binary(fam, "save")], timeout=30))
        counts[v] = total
    if not counts:
        return Tools(""), "no iptables-nft/iptables-legacy binaries; using plain iptables"
    if counts.get("legacy", 0) > counts.get("nft", 0):
        return Tools("legacy"), f"iptables-legacy holds {counts['legacy']} rules, nft {counts.get('nft', 0)}"
    pick = "nft" if "nft" in counts else "legacy"
    return Tools(pick), f"rules found: {counts}; nft preferred on a tie"


@dataclass(slots=True)
class SavedTables:
    """Our chains and the jump rules into them, from one iptables-save."""

    chains: dict[str, set[str]] = field(default_factory=dict)
    hooks: dict[str, list[str]] = field(default_factory=dict)  # table -> "-A CHAIN ... -j KPA-..." lines
    rules: dict[tuple[str, str], int] = field(default_factory=dict)  # (table, our chain) -> rule count
    # (table, our chain) -> a digest of its rules as the kernel prints them (order-sensitive; only
    # comparable within one process: it finds a rule edited in place, count unchanged)
    digests: dict[tuple[str, str], int] = field(default_factory=dict)


_TABLE = re.compile(r"^\*(\w+)")


def _lines(text: str) -> Iterator[str]:
    """The lines of `text` one at a time: no list of all of them (tens of MB at 10k Services)."""
    start = 0
    while start < len(text):
        end = text.find("\n", start)
        if end < 0:
            end = len(text)
        yield text[start:end]
        start = end + 1


def parse_save(text: str, prefix: str) -> SavedTables:
    out = SavedTables()
    table = ""
    for line in _lines(text):
        m = _TABLE.match(line)
        if m:
            table = m.group(1)
            out.chains.setdefault(table, set())
            out.hooks.setdefault(table, [])
        elif line.startswith(":" + prefix):
            name = line[1:].split(" ", 1)[0]
            out.chains[table].add(name)
            out.rules.setdefault((table, name), 0)
        elif line.startswith("-A " + prefix):
            key = (table, line[3:].split(" ", 1)[0])
            out.rules[key] = out.rules.get(key, 0) + 1
            out.digests[key] = hash((out.digests.get(key, 0), line))
        elif line.startswith("-A ") and f"-j {prefix}" in line:
            out.hooks[table].append(line)
    return out
