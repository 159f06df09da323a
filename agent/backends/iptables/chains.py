"""Names of the chains the iptables mode owns. Every one starts with KPA-, never KUBE-."""

from __future__ import annotations

import base64
import hashlib

PREFIX = "KPA-"
SERVICES = "KPA-SERVICES"
NODEPORTS = "KPA-NODEPORTS"
EXTERNAL_SERVICES = "KPA-EXTERNAL-SERVICES"
POSTROUTING = "KPA-POSTROUTING"
MARK_MASQ = "KPA-MARK-MASQ"
MASQ_NOT_PODS = "KPA-MASQ-NOT-PODS"  # mark for masquerade unless the source is in a cluster CIDR
FORWARD = "KPA-FORWARD"
FIREWALL = "KPA-FIREWALL"
HEALTH_CHECKS = "KPA-HEALTH-CHECKS"  # filter: accepts health check node ports (a host firewall may drop the rest)
# filter: with NodePorts on 127.0.0.1 (route_localnet=1), drops what reaches 127.0.0.0/8 from outside
LOCALNET = "KPA-LOCALNET"
MASQ_MARK = "0x4000"

TABLES = ("filter", "nat", "mangle")

# (table, built-in chain, our chain, extra match) jump rules: the only lines we add outside our chains.
HOOKS: tuple[tuple[str, str, str, str], ...] = (
    ("nat", "PREROUTING", SERVICES, ""),
    ("nat", "OUTPUT", SERVICES, ""),
    ("nat", "POSTROUTING", POSTROUTING, ""),
    ("filter", "INPUT", EXTERNAL_SERVICES, "-m conntrack --ctstate NEW"),
    ("filter", "INPUT", HEALTH_CHECKS, ""),
    ("filter", "FORWARD", EXTERNAL_SERVICES, "-m conntrack --ctstate NEW"),
    ("filter", "FORWARD", SERVICES, "-m conntrack --ctstate NEW"),
    ("filter", "OUTPUT", SERVICES, "-m conntrack --ctstate NEW"),
    ("filter", "FORWARD", FORWARD, ""),
    ("filter", "INPUT", LOCALNET, ""),
    ("filter", "OUTPUT", LOCALNET, ""),
    ("mangle", "PREROUTING", FIREWALL, ""),
    ("mangle", "OUTPUT", FIREWALL, ""),
)

# Chains that exist whenever the mode runs, per table.
BASE_CHAINS: dict[str, tuple[str, ...]] = {
    "nat": (SERVICES, NODEPORTS, POSTROUTING, MARK_MASQ, MASQ_NOT_PODS),
    "filter": (SERVICES, EXTERNAL_SERVICES, FORWARD, HEALTH_CHECKS, LOCALNET),
    "mangle": (FIREWALL,),
}


def _hash(*parts: str) -> str:
    digest = hashlib.sha256("".join(parts).encode()).digest()
    return base64.b32encode(digest)[:16].decode()


def service_chain(kind: str, spn: str, protocol: str) -> str:
    """KPA-SVC-, KPA-SVL-, KPA-EXT- or KPA-FW- chain of one service port."""
    return f"{PREFIX}{kind}-{_hash(spn, protocol)}"


def endpoint_chain(spn: str, protocol: str, endpoint: str) -> str:
    return f"{PREFIX}SEP-{_hash(spn, protocol, endpoint)}"
