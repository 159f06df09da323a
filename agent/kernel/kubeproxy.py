"""What upstream kube-proxy leaves on a node, and removing it (`--cleanup-kube-proxy`: a takeover).

The names are kube-proxy v1.37's own (pkg/proxy/iptables, ipvs and nftables CleanupLeftovers):
its fixed chains per table in its iptables and IPVS modes, its per-service chains
(KUBE-SVC-/SVL-/SEP-/EXT-/FW-, nat only), the jumps into them from the built-in chains, and its
nftables tables `ip kube-proxy` / `ip6 kube-proxy`. The kubelet's chains (KUBE-FIREWALL,
KUBE-KUBELET-CANARY, KUBE-MARK-DROP, KUBE-IPTABLES-HINT) and anything else are never touched.
"""

from __future__ import annotations

import re

from agent.kernel.commands import CommandError, have, run
from agent.kernel.xtables import SavedTables, cleanup_chains

FIXED_CHAINS: dict[str, frozenset[str]] = {
    "nat": frozenset({"KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-POSTROUTING", "KUBE-MARK-MASQ",
                      "KUBE-PROXY-CANARY", "KUBE-NODE-PORT", "KUBE-LOAD-BALANCER"}),
    "filter": frozenset({"KUBE-SERVICES", "KUBE-EXTERNAL-SERVICES", "KUBE-FORWARD", "KUBE-NODEPORTS",
                         "KUBE-PROXY-FIREWALL", "KUBE-PROXY-CANARY", "KUBE-NODE-PORT",
                         "KUBE-SOURCE-RANGES-FIREWALL", "KUBE-IPVS-FILTER", "KUBE-IPVS-OUT-FILTER"}),
    "mangle": frozenset({"KUBE-PROXY-CANARY"}),
}
SERVICE_PREFIXES = ("KUBE-SVC-", "KUBE-SVL-", "KUBE-SEP-", "KUBE-EXT-", "KUBE-FW-")
BUILTIN = frozenset({"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"})
NFT_TABLE = "kube-proxy"
_TABLE = re.compile(r"^\*(\w+)")
_JUMP = re.compile(r" -[jg] (\S+)")


def owned(table: str, chain: str) -> bool:
    """Whether kube-proxy made this chain of this table."""
    return chain in FIXED_CHAINS.get(table, ()) or (table == "nat" and chain.startswith(SERVICE_PREFIXES))


def parse(save: str) -> SavedTables:
    """kube-proxy's chains in an iptables-save, and the jumps into them from built-in chains."""
    out = SavedTables()
    table = ""
    for line in save.splitlines():
        m = _TABLE.match(line)
        if m:
            table = m.group(1)
        elif line.startswith(":"):
            name = line[1:].split(" ", 1)[0]
            if owned(table, name):
                out.chains.setdefault(table, set()).add(name)
        elif line.startswith("-A ") and line.split(" ", 2)[1] in BUILTIN:
            jump = _JUMP.search(line)
            if jump and owned(table, jump.group(1)):
                out.hooks.setdefault(table, []).append(line)
    return out


def cleanup_iptables(families: tuple[int, ...] = (4, 6)) -> list[str]:
    """Remove kube-proxy's chains from both iptables variants; one line per change made."""
    return cleanup_chains("kube-proxy's iptables", parse, families)


def cleanup_nftables() -> list[str]:
    """Delete kube-proxy's nftables tables (ip and ip6 kube-proxy)."""
    if not have("nft"):
        return []
    try:
        listed = run(["nft", "list", "tables"], timeout=60)
    except CommandError as exc:
        return [f"could not list nftables tables error={exc.stderr.strip()!r}"]
    done = []
    for family in ("ip", "ip6"):
        if f"table {family} {NFT_TABLE}\n" in listed + "\n":
            run(["nft", "delete", "table", family, NFT_TABLE], timeout=60)
            done.append(f"removed nftables table {family} {NFT_TABLE}")
    return done


def cleanup(families: tuple[int, ...] = (4, 6)) -> list[str]:
    """Everything kube-proxy's iptables and nftables modes leave; one line per change made."""
    return cleanup_iptables(families) + cleanup_nftables()
