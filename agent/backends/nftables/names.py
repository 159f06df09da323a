"""Names of everything the nftables mode owns: one table per family, fixed maps and chains, and
per-service-port chains (and per-endpoint affinity sets) named from a hash of the ServicePortName
(like iptables/chains.py). Names must not be nft keywords ("fwd", "ne", ...): every name here has
a dash or a hash in it.
"""

from __future__ import annotations

import base64
import hashlib
import zlib

TABLE = "kube-proxy-agent"
PROBE_TABLE = "kube-proxy-agent-probe"
MASQ_MARK = "0x4000"

# Maps and sets whose elements come from service ports, in the order they are declared.
SERVICE_IPS = "service-ips"  # daddr . proto . port -> cluster IP, external IP and load-balancer IP chains
SERVICE_NODEPORTS = "service-nodeports"  # proto . port -> external chain
NO_ENDPOINT_SERVICES = "no-endpoint-services"  # cluster IPs with nothing to DNAT to -> reject / drop
NO_ENDPOINT_EXTERNAL = "no-endpoint-external"  # external and load-balancer IPs likewise
NO_ENDPOINT_NODEPORTS = "no-endpoint-nodeports"  # node ports likewise
FIREWALL_IPS = "firewall-ips"  # load-balancer IP . proto . port -> loadBalancerSourceRanges chain
HAIRPIN = "hairpin"  # set of endpoint . endpoint: a DNATed packet an endpoint sent to itself
CLUSTER_IPS = "cluster-ips"  # set of every Service's cluster IP: other ports of it are rejected
# Node-wide sets.
NODEPORT_IPS = "nodeport-ips"  # addresses taking node ports, only with --nodeport-addresses
CLUSTER_CIDRS = "cluster-cidrs"  # interval set, only when a family has several cluster CIDRs

# Endpoint maps: number -> endpoint address . port, the DNAT targets of every svc-/svl- chain
# (`dnat to numgen random mod N offset BASE map @endpoints-NN`). Changing a Service's endpoints is
# then an element update, which the kernel takes without revalidating the table (a changed rule
# with a dnat or jump in it costs ~90 ms of validation at 10k Services). Sharded by chain: the
# kernel checks each added element against every rule bound to its map (one map at 10k Services:
# a full sync took 16 s), and finds a map by name by walking the table's list of sets.
ENDPOINT_SHARDS = 64
ENDPOINTS = "endpoints"  # the shards' common prefix, and the name their counts are reported under
ENDPOINT_MAPS = tuple(f"{ENDPOINTS}-{i:02d}" for i in range(ENDPOINT_SHARDS))

# (name, key, map?) where key is "addr.proto.port", "proto.port", "addr.addr", "addr" (verdict maps
# and sets) or "endpoint" (the endpoint maps: number : address . port).
MAPS: tuple[tuple[str, str, bool], ...] = (
    (SERVICE_IPS, "addr.proto.port", True),
    (SERVICE_NODEPORTS, "proto.port", True),
    (NO_ENDPOINT_SERVICES, "addr.proto.port", True),
    (NO_ENDPOINT_EXTERNAL, "addr.proto.port", True),
    (NO_ENDPOINT_NODEPORTS, "proto.port", True),
    (FIREWALL_IPS, "addr.proto.port", True),
    (HAIRPIN, "addr.addr", False),
    (CLUSTER_IPS, "addr", False),
    *((name, "endpoint", True) for name in ENDPOINT_MAPS),
)

# Regular chains shared by all services.
SERVICES = "services"
MARK_MASQ = "mark-for-masquerade"
MASQUERADING = "masquerading"
REJECT = "reject-chain"
# After DNAT, new traffic still addressed to a cluster IP matched no port of it: rejected; to an
# address of the service CIDRs that no Service holds: dropped (kube-proxy's nftables mode).
CLUSTER_IPS_CHECK = "cluster-ips-check"

# Base chains: name -> (type, hook, priority). Priorities are numeric because nft 1.0 only accepts
# the names (dstnat, srcnat, filter) on some hooks.
#  - nat at dstnat (-100) / srcnat (100), as kube-proxy;
#  - the loadBalancerSourceRanges firewall at -110 so it sees the destination before DNAT
#    (iptables mode uses mangle, at -150);
#  - the no-endpoint checks and the forward accept at filter priority (0), after DNAT, where the
#    iptables filter table sits.
NAT_PREROUTING = "nat-prerouting"
NAT_OUTPUT = "nat-output"
NAT_POSTROUTING = "nat-postrouting"
FIREWALL_PREROUTING = "firewall-prerouting"
FIREWALL_OUTPUT = "firewall-output"
FILTER_INPUT = "filter-input"
FILTER_FORWARD = "filter-forward"
FILTER_OUTPUT = "filter-output"
BASE_CHAINS: tuple[tuple[str, str, str, int], ...] = (
    (NAT_PREROUTING, "nat", "prerouting", -100),
    (NAT_OUTPUT, "nat", "output", -100),
    (NAT_POSTROUTING, "nat", "postrouting", 100),
    (FIREWALL_PREROUTING, "filter", "prerouting", -110),
    (FIREWALL_OUTPUT, "filter", "output", -110),
    (FILTER_INPUT, "filter", "input", 0),
    (FILTER_FORWARD, "filter", "forward", 0),
    (FILTER_OUTPUT, "filter", "output", 0),
)
FIXED_CHAINS: frozenset[str] = frozenset(
    {SERVICES, MARK_MASQ, MASQUERADING, REJECT, CLUSTER_IPS_CHECK} | {c[0] for c in BASE_CHAINS}
)


def family_keyword(family: int) -> str:
    return "ip" if family == 4 else "ip6"


def table_ref(family: int) -> str:
    """`ip kube-proxy-agent` or `ip6 kube-proxy-agent`."""
    return f"{family_keyword(family)} {TABLE}"


def _hash(*parts: str) -> str:
    digest = hashlib.sha256("".join(parts).encode()).digest()
    return base64.b32encode(digest)[:16].decode().lower()


def service_hash(spn: str, protocol: str) -> str:
    return _hash(spn, protocol)


def endpoint_hash(spn: str, protocol: str, endpoint: str) -> str:
    return _hash(spn, protocol, endpoint)


def service_chain(kind: str, spn: str, protocol: str) -> str:
    """svc- (cluster endpoints), svl- (local endpoints), ext- (external traffic) or fw- (source
    ranges) chain of one service port. Endpoints have no chains: their DNAT sits in svc/svl."""
    return f"{kind}-{service_hash(spn, protocol)}"


def affinity_set(spn: str, protocol: str, endpoint: str, seconds: int) -> str:
    """The timeout is part of the name, so a changed timeout is a new set, never a redefinition."""
    return f"aff-{endpoint_hash(spn, protocol, endpoint)}-{seconds}"


def endpoint_map(chain: str) -> str:
    """The endpoint map shard a svc-/svl- chain's endpoints live in."""
    return ENDPOINT_MAPS[zlib.crc32(chain.encode()) % ENDPOINT_SHARDS]


def map_label(name: str) -> str:
    """The name a map's counts are reported under: the endpoint shards as one."""
    return ENDPOINTS if name.startswith(ENDPOINTS + "-") else name
