"""DesiredState -> what the IPVS mode puts in the kernel. Pure: no I/O, no kernel.

Per frontend (`render_frontend`): one virtual server with its real servers, the address the dummy
interface must hold (cluster, external and load-balancer IPs; not node addresses), and the ipset
entries the few iptables rules match on. The rules themselves (`base_rules`) are a constant
handful whatever the number of Services: every per-Service fact lives in an ipset.

ipsets (per family; IPv6 names end in -V6):
  KPAV-FRONTENDS    hash:ip,port     every frontend served (also how a restart knows what is ours)
  KPAV-CLUSTER-IP   hash:ip,port     cluster IPs: masquerade traffic from outside the cluster CIDRs
  KPAV-EXTERNAL     hash:ip,port     external and load-balancer IPs, externalTrafficPolicy Cluster
  KPAV-NODE-PORT    hash:ip,port     NodePorts (node address, port), externalTrafficPolicy Cluster
  KPAV-LOOP-BACK    hash:ip,port,ip  local endpoint reaching itself through a Service (hairpin)
  KPAV-DROP         hash:ip,port     frontends with endpoints elsewhere but none for this traffic
  KPAV-FW           hash:ip,port     load-balancer IPs with loadBalancerSourceRanges
  KPAV-FW-SOURCES   hash:ip,port,net the allowed (load-balancer IP, port, source range)
  KPAV-DUMMY-IPS    hash:ip          addresses on the dummy interface: other ports are rejected
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from agent.backends.ipvs.servers import F_PERSISTENT, F_SCHED2, RealServer, ServiceKey, VirtualServer
from agent.model.desired import DesiredState, NodeContext
from agent.model.frontends import Frontend

PREFIX = "KPAV-"  # chains and ipsets; never a prefix of another mode's names (iptables uses KPA-)
DUMMY = "kpa-ipvs0"
MASQ_MARK = "0x4000"

SERVICES = "KPAV-SERVICES"
POSTROUTING = "KPAV-POSTROUTING"
MARK_MASQ = "KPAV-MARK-MASQ"
MASQ_NOT_PODS = "KPAV-MASQ-NOT-PODS"
FIREWALL = "KPAV-FIREWALL"
INPUT = "KPAV-INPUT"
FORWARD = "KPAV-FORWARD"

# (table, built-in chain, our chain, extra match): the only rules outside our chains.
HOOKS: tuple[tuple[str, str, str, str], ...] = (
    ("nat", "PREROUTING", SERVICES, ""),
    ("nat", "OUTPUT", SERVICES, ""),
    ("nat", "POSTROUTING", POSTROUTING, ""),
    ("mangle", "PREROUTING", FIREWALL, ""),
    ("mangle", "OUTPUT", FIREWALL, ""),
    ("filter", "INPUT", INPUT, ""),
    ("filter", "FORWARD", FORWARD, ""),
)
CHAINS: dict[str, tuple[str, ...]] = {
    "nat": (SERVICES, POSTROUTING, MARK_MASQ, MASQ_NOT_PODS),
    "mangle": (FIREWALL,),
    "filter": (INPUT, FORWARD),
}

# set base name -> ipset type
SETS: dict[str, str] = {
    "FRONTENDS": "hash:ip,port",
    "CLUSTER-IP": "hash:ip,port",
    "EXTERNAL": "hash:ip,port",
    "NODE-PORT": "hash:ip,port",
    "LOOP-BACK": "hash:ip,port,ip",
    "DROP": "hash:ip,port",
    "FW": "hash:ip,port",
    "FW-SOURCES": "hash:ip,port,net",
    "DUMMY-IPS": "hash:ip",
}
MAXELEM = 1048576  # ipset's default (65536) is below what 10k Services with NodePorts can need
# Which frontend kinds keep their address on the dummy interface (node addresses never go there).
ON_DUMMY = ("ClusterIP", "ExternalIP", "LoadBalancerIP")


def set_name(base: str, family: int) -> str:
    return f"{PREFIX}{base}" + ("" if family == 4 else "-V6")


def _ipset_family(family: int) -> str:
    return "inet" if family == 4 else "inet6"


@dataclass(frozen=True, slots=True)
class FrontendIpvs:
    """What one frontend puts in the kernel."""

    server: VirtualServer
    reals: tuple[RealServer, ...]  # weight 1, sorted, unique by address:port
    address: str | None  # held by the dummy interface
    entries: tuple[tuple[str, str], ...]  # (set base name, entry)


def _net(cidr: str) -> str:
    """A CIDR as `ipset list` prints it: a single address without its /32 or /128."""
    return cidr.rsplit("/", 1)[0] if cidr.endswith(("/32", "/128")) else cidr


def _entry(address: str, protocol: str, port: int) -> str:
    return f"{address},{protocol.lower()}:{port}"


def render_frontend(f: Frontend, node: NodeContext, scheduler: str) -> FrontendIpvs:
    key = ServiceKey(f.protocol, f.address, f.port)
    flags = F_SCHED2 if scheduler == "mh" else 0  # as kube-proxy: mh hashes the source port too
    if f.affinity_seconds:
        flags |= F_PERSISTENT
    server = VirtualServer(key, scheduler, flags, f.affinity_seconds)
    reals = tuple(sorted({(e.ip, e.port): RealServer(e.ip, e.port) for e in f.endpoints}.values()))
    me = _entry(f.address, f.protocol, f.port)
    entries: list[tuple[str, str]] = [("FRONTENDS", me)]
    if f.kind == "ClusterIP":
        entries.append(("CLUSTER-IP", me))
    elif not f.preserve_source:
        entries.append(("NODE-PORT" if f.kind == "NodePort" else "EXTERNAL", me))
    for e in f.endpoints:
        if e.node_name == node.node_name:
            entries.append(("LOOP-BACK", f"{e.ip},{f.protocol.lower()}:{e.port},{e.ip}"))
    if not f.endpoints and f.unserved == "drop":
        entries.append(("DROP", me))
    if f.source_ranges:
        entries.append(("FW", me))
        entries += [("FW-SOURCES", f"{me},{_net(cidr)}") for cidr in f.source_ranges]
    address = f.address if f.kind in ON_DUMMY else None
    if address is not None:
        entries.append(("DUMMY-IPS", address))
    return FrontendIpvs(server, reals, address, tuple(dict.fromkeys(entries)))


def base_rules(node: NodeContext) -> str:
    """iptables-restore input (with --noflush) for one family: our chains, whole."""
    fam = node.family
    s = {base: set_name(base, fam) for base in SETS}

    def match(base: str, dirs: str, negate: bool = False) -> str:
        return f"-m set {'! ' if negate else ''}--match-set {s[base]} {dirs}"

    if node.masquerade_all:
        masq_cluster = [f"-A {SERVICES} {match('CLUSTER-IP', 'dst,dst')} -j {MARK_MASQ}"]
    elif len(node.cluster_cidrs) == 1:
        masq_cluster = [f"-A {SERVICES} ! -s {node.cluster_cidrs[0]} {match('CLUSTER-IP', 'dst,dst')} -j {MARK_MASQ}"]
    elif node.cluster_cidrs:
        masq_cluster = [f"-A {SERVICES} {match('CLUSTER-IP', 'dst,dst')} -j {MASQ_NOT_PODS}"]
    else:
        masq_cluster = []
    comment = '-m comment --comment "kube-proxy-agent service traffic requiring SNAT"'
    nat = [
        *(f":{c} - [0:0]" for c in CHAINS["nat"]),
        f"-A {MARK_MASQ} -j MARK --or-mark {MASQ_MARK}",
        *(f"-A {MASQ_NOT_PODS} -s {cidr} -j RETURN" for cidr in node.cluster_cidrs),
        f"-A {MASQ_NOT_PODS} -j {MARK_MASQ}",
        *masq_cluster,
        f"-A {SERVICES} {match('EXTERNAL', 'dst,dst')} -j {MARK_MASQ}",
        f"-A {SERVICES} {match('NODE-PORT', 'dst,dst')} -j {MARK_MASQ}",
        f"-A {POSTROUTING} {match('LOOP-BACK', 'dst,dst,src')} -j MASQUERADE",
        f"-A {POSTROUTING} -m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN",
        f"-A {POSTROUTING} -j MARK --xor-mark {MASQ_MARK}",
        f"-A {POSTROUTING} {comment} -j MASQUERADE --random-fully",
    ]
    mangle = [
        *(f":{c} - [0:0]" for c in CHAINS["mangle"]),
        # before IPVS (LOCAL_IN for traffic from outside, LOCAL_OUT for the node's own) sees it
        f"-A {FIREWALL} {match('FW', 'dst,dst')} {match('FW-SOURCES', 'dst,dst,src', negate=True)} "
        '-m comment --comment "source not in loadBalancerSourceRanges" -j DROP',
    ]
    filt = [
        *(f":{c} - [0:0]" for c in CHAINS["filter"]),
        f"-A {INPUT} -m conntrack --ctstate NEW {match('DROP', 'dst,dst')} "
        '-m comment --comment "no local endpoints" -j DROP',
        f"-A {INPUT} -m conntrack --ctstate NEW {match('DUMMY-IPS', 'dst')} "
        f"{match('FRONTENDS', 'dst,dst', negate=True)} -m comment --comment \"not a service port\" -j REJECT",
        f"-A {FORWARD} -m mark --mark {MASQ_MARK}/{MASQ_MARK} -j ACCEPT",
        f"-A {FORWARD} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
    ]
    return "\n".join(["*nat", *nat, "COMMIT", "*mangle", *mangle, "COMMIT", "*filter", *filt, "COMMIT"]) + "\n"


def ipset_create(family: int) -> str:
    """`ipset restore -exist` input creating every set of a family (no-op for those that exist)."""
    return "".join(f"create {set_name(b, family)} {t} family {_ipset_family(family)} hashsize 1024 maxelem {MAXELEM}\n"
                   for b, t in SETS.items())


def _ipvsadm(vs: VirtualServer, reals: Iterable[RealServer]) -> list[str]:
    proto = {"TCP": "-t", "UDP": "-u", "SCTP": "--sctp-service"}[vs.key.protocol]
    host = f"[{vs.key.address}]" if ":" in vs.key.address else vs.key.address
    svc = f"{proto} {host}:{vs.key.port}"
    line = f"-A {svc} -s {vs.scheduler}"
    if vs.flags & F_PERSISTENT:
        line += f" -p {vs.timeout}"
    if vs.flags & F_SCHED2:
        line += " -b sh-port" if vs.scheduler == "sh" else " -b mh-port"
    out = [line]
    for r in reals:
        rhost = f"[{r.address}]" if ":" in r.address else r.address
        out.append(f"-a {svc} -r {rhost}:{r.port} -m -w {r.weight}")
    return out


def render_family(desired: DesiredState, scheduler: str) -> str:
    """What a full sync programs for one family, readable: `ipvsadm -Sn` lines, the dummy
    interface's addresses, `ipset restore` input, `iptables-restore --noflush` input."""
    node = desired.node
    fam = node.family
    rendered = [render_frontend(f, node, scheduler) for f in sorted(desired.frontends.values(), key=lambda f: f.key)]
    lines = [f"# IPv{fam}: IPVS virtual servers (ipvsadm -Sn)"]
    for r in sorted(rendered, key=lambda r: r.server.key):
        lines += _ipvsadm(r.server, r.reals)
    addresses = sorted({r.address for r in rendered if r.address is not None})
    lines.append(f"# IPv{fam}: addresses on {DUMMY} ({len(addresses)})")
    lines += [f"{a}/{32 if fam == 4 else 128}" for a in addresses]
    lines.append(f"# IPv{fam}: ipset restore")
    lines += ipset_create(fam).splitlines()
    entries = sorted({(set_name(b, fam), e) for r in rendered for b, e in r.entries})
    lines += [f"add {name} {entry}" for name, entry in entries]
    lines.append(f"# IPv{fam}: {'iptables' if fam == 4 else 'ip6tables'}-restore --noflush")
    lines += base_rules(node).splitlines()
    return "\n".join(lines) + "\n"


def render(desired: Mapping[int, DesiredState], families: Iterable[int], scheduler: str) -> str:
    return "".join(render_family(desired[f], scheduler) for f in families)
