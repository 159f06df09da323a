"""The nftables render: DesiredState in, exact nft transaction text out (no kernel).

Each case: the scenario in words, the service ports (ServicePlans as the model would build them),
and the statements the mode loads for them. Chain and set names are hashes of the service port
name, so the expected text names them `$svc`, `$ext`, ... and the test fills them in.
"""

from __future__ import annotations

import dataclasses
import random
import re
from string import Template
from typing import Any

import pytest

from agent.backends.base import SyncError, UnsupportedMode
from agent.backends.nftables import names as N
from agent.backends.nftables.render import Existing, NftRenderer, render_service
from agent.backends.nftables.writer import NftablesBackend, offending
from agent.model.desired import Changes, DesiredState, NodeContext, ServicePlan
from agent.model.endpoints import EndpointInfo
from agent.model.serviceport import ServicePortInfo, ServicePortName

T4 = "ip kube-proxy-agent"
NODE4 = NodeContext(family=4, node_name="node-a", cluster_cidrs=("10.244.0.0/16",))
NODE6 = NodeContext(family=6, node_name="node-a", cluster_cidrs=("fd00:244::/64",))


def spn(name: str, port: str = "http", proto: str = "TCP") -> ServicePortName:
    return ServicePortName("default", name, port, proto)


def ep(ip: str, node: str = "node-a", port: int = 8080) -> EndpointInfo:
    return EndpointInfo(ip, port, node_name=node)


def info(
    name: str, cluster_ip: str = "10.96.0.10", family: int = 4, port: int = 80, **kw: Any
) -> ServicePortInfo:
    return ServicePortInfo(spn(name), family, "TCP", port, cluster_ip, **kw)


def state(node: NodeContext, *plans: ServicePlan) -> DesiredState:
    st = DesiredState(node)
    for p in plans:
        st.services[p.name] = p
    return st


def names(name: str, *endpoints: EndpointInfo, affinity: int = 0) -> dict[str, str]:
    s = str(spn(name))
    out = {kind: N.service_chain(kind, s, "TCP") for kind in ("svc", "svl", "ext", "fw")}
    out["esvc"], out["esvl"] = N.endpoint_map(out["svc"]), N.endpoint_map(out["svl"])
    for i, e in enumerate(endpoints, 1):
        out[f"aff{i}"] = N.affinity_set(s, "TCP", e.address, affinity)
    return out


def full_text(node: NodeContext, *plans: ServicePlan) -> str:
    return NftRenderer(node.family).render(state(node, *plans), (), full=True).text


PRELUDE_LINES = len(full_text(NODE4).splitlines())


def service_section(text: str) -> str:
    """What a full render adds for its services, after the fixed maps and chains."""
    return "\n".join(text.splitlines()[PRELUDE_LINES:]) + "\n"


# -- the fixed part -------------------------------------------------------------------------------

PRELUDE = """\
add table ip kube-proxy-agent
flush table ip kube-proxy-agent
add map ip kube-proxy-agent service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; }
flush map ip kube-proxy-agent service-ips
add map ip kube-proxy-agent service-nodeports { type inet_proto . inet_service : verdict ; }
flush map ip kube-proxy-agent service-nodeports
add map ip kube-proxy-agent no-endpoint-services { type ipv4_addr . inet_proto . inet_service : verdict ; }
flush map ip kube-proxy-agent no-endpoint-services
add map ip kube-proxy-agent no-endpoint-external { type ipv4_addr . inet_proto . inet_service : verdict ; }
flush map ip kube-proxy-agent no-endpoint-external
add map ip kube-proxy-agent no-endpoint-nodeports { type inet_proto . inet_service : verdict ; }
flush map ip kube-proxy-agent no-endpoint-nodeports
add map ip kube-proxy-agent firewall-ips { type ipv4_addr . inet_proto . inet_service : verdict ; }
flush map ip kube-proxy-agent firewall-ips
add set ip kube-proxy-agent hairpin { type ipv4_addr . ipv4_addr ; }
flush set ip kube-proxy-agent hairpin
add set ip kube-proxy-agent cluster-ips { type ipv4_addr ; }
flush set ip kube-proxy-agent cluster-ips
""" + "".join(
    f"add map ip kube-proxy-agent {m} {{ typeof numgen random mod 1 : ip daddr ; }}\n"
    f"flush map ip kube-proxy-agent {m}\n" for m in N.ENDPOINT_MAPS
) + """\
add chain ip kube-proxy-agent mark-for-masquerade
add rule ip kube-proxy-agent mark-for-masquerade meta mark set meta mark | 0x4000
add chain ip kube-proxy-agent masquerading
add rule ip kube-proxy-agent masquerading meta mark & 0x4000 == 0 return
add rule ip kube-proxy-agent masquerading meta mark set meta mark ^ 0x4000
add rule ip kube-proxy-agent masquerading masquerade fully-random
add chain ip kube-proxy-agent reject-chain
add rule ip kube-proxy-agent reject-chain reject
add chain ip kube-proxy-agent cluster-ips-check
add rule ip kube-proxy-agent cluster-ips-check ip daddr @cluster-ips reject comment "no such port on this cluster IP"
add chain ip kube-proxy-agent services
add rule ip kube-proxy-agent services ip daddr @cluster-ips ip saddr != 10.244.0.0/16 jump mark-for-masquerade
add rule ip kube-proxy-agent services ip daddr . meta l4proto . th dport vmap @service-ips
add rule ip kube-proxy-agent services ip daddr != 127.0.0.0/8 fib daddr type local meta l4proto . th dport \
vmap @service-nodeports
add chain ip kube-proxy-agent nat-prerouting { type nat hook prerouting priority -100 ; }
add rule ip kube-proxy-agent nat-prerouting jump services
add chain ip kube-proxy-agent nat-output { type nat hook output priority -100 ; }
add rule ip kube-proxy-agent nat-output jump services
add chain ip kube-proxy-agent nat-postrouting { type nat hook postrouting priority 100 ; }
add rule ip kube-proxy-agent nat-postrouting jump masquerading
add chain ip kube-proxy-agent firewall-prerouting { type filter hook prerouting priority -110 ; }
add rule ip kube-proxy-agent firewall-prerouting ip daddr . meta l4proto . th dport vmap @firewall-ips
add chain ip kube-proxy-agent firewall-output { type filter hook output priority -110 ; }
add rule ip kube-proxy-agent firewall-output ip daddr . meta l4proto . th dport vmap @firewall-ips
add chain ip kube-proxy-agent filter-input { type filter hook input priority 0 ; }
add rule ip kube-proxy-agent filter-input ct state new ip daddr . meta l4proto . th dport vmap @no-endpoint-external
add rule ip kube-proxy-agent filter-input ct state new fib daddr type local meta l4proto . th dport \
vmap @no-endpoint-nodeports
add chain ip kube-proxy-agent filter-forward { type filter hook forward priority 0 ; }
add rule ip kube-proxy-agent filter-forward ct state new ip daddr . meta l4proto . th dport vmap @no-endpoint-external
add rule ip kube-proxy-agent filter-forward ct state new fib daddr type local meta l4proto . th dport \
vmap @no-endpoint-nodeports
add rule ip kube-proxy-agent filter-forward ct state new ip daddr . meta l4proto . th dport vmap @no-endpoint-services
add rule ip kube-proxy-agent filter-forward ct state new jump cluster-ips-check
add rule ip kube-proxy-agent filter-forward ct state new ct status dnat ip saddr . ip daddr @hairpin \
jump mark-for-masquerade
add rule ip kube-proxy-agent filter-forward meta mark & 0x4000 == 0x4000 accept
add rule ip kube-proxy-agent filter-forward ct state established,related accept
add chain ip kube-proxy-agent filter-output { type filter hook output priority 0 ; }
add rule ip kube-proxy-agent filter-output ct state new ip daddr . meta l4proto . th dport vmap @no-endpoint-services
add rule ip kube-proxy-agent filter-output ct state new jump cluster-ips-check
add rule ip kube-proxy-agent filter-output ct state new ct status dnat ip saddr . ip daddr @hairpin \
jump mark-for-masquerade
"""


def test_empty_state_is_the_fixed_table() -> None:
    """No services: one table with empty maps, the dispatch chains hooked, masquerading and the
    no-endpoint checks in place. Full syncs flush and refill, so affinity sets survive them."""
    assert full_text(NODE4) == PRELUDE


def test_node_port_addresses_and_several_cluster_cidrs_use_named_sets() -> None:
    """--nodeport-addresses: node ports only on those IPs. Two cluster CIDRs: one interval set,
    not an anonymous set in every service chain. --masquerade-all: every cluster IP client."""
    node = dataclasses.replace(
        NODE4, nodeport_ips=("192.168.1.10",), cluster_cidrs=("10.244.0.0/16", "10.250.0.0/16")
    )
    text = full_text(node)
    assert "add set ip kube-proxy-agent nodeport-ips { type ipv4_addr ; }\n" in text
    assert "add element ip kube-proxy-agent nodeport-ips { 192.168.1.10 }\n" in text
    assert (
        "add rule ip kube-proxy-agent services ip daddr @nodeport-ips meta l4proto . th dport "
        "vmap @service-nodeports\n" in text
    )
    assert "fib daddr type local meta l4proto . th dport vmap @service-nodeports" not in text
    assert (
        "add set ip kube-proxy-agent cluster-cidrs { type ipv4_addr ; flags interval ; }\n"
        "flush set ip kube-proxy-agent cluster-cidrs\n"
        "add element ip kube-proxy-agent cluster-cidrs { 10.244.0.0/16, 10.250.0.0/16 }\n" in text
    )
    # cluster IP clients outside the pod network: one rule for every cluster IP, none per port
    assert ("add rule ip kube-proxy-agent services ip daddr @cluster-ips ip saddr != @cluster-cidrs "
            "jump mark-for-masquerade\n" in text)
    plan = ServicePlan(info("web", node_port=30080, external_policy_local=True), (ep("10.244.1.2"),),
                       (ep("10.244.1.2"),), True)
    rules = dict(render_service(plan, node).chains)
    n = names("web")
    assert not any("mark-for-masquerade" in r for r in rules[n["svc"]])
    assert rules[n["ext"]][0] == f"ip saddr @cluster-cidrs goto {n['svc']}"
    everyone = full_text(dataclasses.replace(node, masquerade_all=True))
    assert "add rule ip kube-proxy-agent services ip daddr @cluster-ips jump mark-for-masquerade\n" in everyone
    no_cidr = full_text(dataclasses.replace(node, cluster_cidrs=()))
    assert "services ip daddr @cluster-ips" not in no_cidr


# -- one service port per case --------------------------------------------------------------------

A, B, R = ep("10.244.1.2"), ep("10.244.1.3"), ep("10.244.9.9", node="node-b")

CASES: list[tuple[str, NodeContext, ServicePlan, dict[str, str], str]] = [
    (
        "ClusterIP with two endpoints: one map element to the service chain, which masquerades "
        "clients from outside the cluster CIDR and picks an endpoint uniformly (1/2, then the other)",
        NODE4,
        ServicePlan(info("web"), (A, B), has_any=True),
        names("web"),
        """\
add chain ip kube-proxy-agent $svc
add rule ip kube-proxy-agent $svc meta l4proto tcp dnat ip to numgen random mod 2 offset 0 map @$esvc : 8080
add element ip kube-proxy-agent service-ips {
\t10.96.0.10 . tcp . 80 comment "default/web:http cluster IP" : jump $svc,
}
add element ip kube-proxy-agent hairpin {
\t10.244.1.2 . 10.244.1.2,
\t10.244.1.3 . 10.244.1.3,
}
add element ip kube-proxy-agent cluster-ips {
\t10.96.0.10,
}
add element ip kube-proxy-agent $esvc {
\t0 : 10.244.1.2,
\t1 : 10.244.1.3,
}
""",
    ),
    (
        "NodePort (externalTrafficPolicy Cluster): the node port enters the ext chain, which "
        "masquerades every external client and goes to the service chain",
        NODE4,
        ServicePlan(info("np", node_port=30080), (A,), has_any=True),
        names("np"),
        """\
add chain ip kube-proxy-agent $svc
add rule ip kube-proxy-agent $svc meta l4proto tcp dnat ip to numgen random mod 1 offset 0 map @$esvc : 8080
add chain ip kube-proxy-agent $ext
add rule ip kube-proxy-agent $ext jump mark-for-masquerade
add rule ip kube-proxy-agent $ext goto $svc
add element ip kube-proxy-agent service-ips {
\t10.96.0.10 . tcp . 80 comment "default/np:http cluster IP" : jump $svc,
}
add element ip kube-proxy-agent service-nodeports {
\ttcp . 30080 comment "default/np:http node port" : goto $ext,
}
add element ip kube-proxy-agent hairpin {
\t10.244.1.2 . 10.244.1.2,
}
add element ip kube-proxy-agent cluster-ips {
\t10.96.0.10,
}
add element ip kube-proxy-agent $esvc {
\t0 : 10.244.1.2,
}
""",
    ),
    (
        "No endpoints at all: no chains; the cluster IP, external IP and node port are rejected "
        "(ICMP port unreachable) from the filter hooks",
        NODE4,
        ServicePlan(info("empty", node_port=30081, external_ips=("192.0.2.5",))),
        names("empty"),
        """\
add element ip kube-proxy-agent no-endpoint-services {
\t10.96.0.10 . tcp . 80 comment "default/empty:http has no endpoints" : goto reject-chain,
}
add element ip kube-proxy-agent no-endpoint-external {
\t192.0.2.5 . tcp . 80 comment "default/empty:http has no endpoints" : goto reject-chain,
}
add element ip kube-proxy-agent no-endpoint-nodeports {
\ttcp . 30081 comment "default/empty:http has no endpoints" : goto reject-chain,
}
add element ip kube-proxy-agent cluster-ips {
\t10.96.0.10,
}
""",
    ),
    (
        "sessionAffinity ClientIP (30s): a dynamic set per endpoint, checked before the random "
        "choice and refreshed by whichever rule DNATs",
        NODE4,
        ServicePlan(info("sticky", affinity_seconds=30), (A, B), has_any=True),
        names("sticky", A, B, affinity=30),
        """\
add set ip kube-proxy-agent $aff1 { typeof ip saddr ; flags dynamic,timeout ; timeout 30s ; }
add set ip kube-proxy-agent $aff2 { typeof ip saddr ; flags dynamic,timeout ; timeout 30s ; }
add chain ip kube-proxy-agent $svc
add rule ip kube-proxy-agent $svc ip saddr @$aff1 meta l4proto tcp update @$aff1 { ip saddr } dnat to 10.244.1.2:8080
add rule ip kube-proxy-agent $svc ip saddr @$aff2 meta l4proto tcp update @$aff2 { ip saddr } dnat to 10.244.1.3:8080
add rule ip kube-proxy-agent $svc numgen random mod 2 == 0 meta l4proto tcp update @$aff1 { ip saddr } \
dnat to 10.244.1.2:8080
add rule ip kube-proxy-agent $svc meta l4proto tcp update @$aff2 { ip saddr } dnat to 10.244.1.3:8080
add element ip kube-proxy-agent service-ips {
\t10.96.0.10 . tcp . 80 comment "default/sticky:http cluster IP" : jump $svc,
}
add element ip kube-proxy-agent hairpin {
\t10.244.1.2 . 10.244.1.2,
\t10.244.1.3 . 10.244.1.3,
}
add element ip kube-proxy-agent cluster-ips {
\t10.96.0.10,
}
""",
    ),
    (
        "externalTrafficPolicy Local with a local endpoint: pods and the node itself short-circuit "
        "to all endpoints (the node masqueraded), external clients go to the local one, unmasqueraded",
        NODE4,
        ServicePlan(info("local", node_port=30082, external_policy_local=True), (A, R), (A,), True),
        names("local"),
        """\
add chain ip kube-proxy-agent $svc
add rule ip kube-proxy-agent $svc meta l4proto tcp dnat ip to numgen random mod 2 offset 0 map @$esvc : 8080
add chain ip kube-proxy-agent $svl
add rule ip kube-proxy-agent $svl meta l4proto tcp dnat ip to numgen random mod 1 offset 4 map @$esvl : 8080
add chain ip kube-proxy-agent $ext
add rule ip kube-proxy-agent $ext ip saddr 10.244.0.0/16 goto $svc
add rule ip kube-proxy-agent $ext fib saddr type local jump mark-for-masquerade
add rule ip kube-proxy-agent $ext fib saddr type local goto $svc
add rule ip kube-proxy-agent $ext goto $svl
add element ip kube-proxy-agent service-ips {
\t10.96.0.10 . tcp . 80 comment "default/local:http cluster IP" : jump $svc,
}
add element ip kube-proxy-agent service-nodeports {
\ttcp . 30082 comment "default/local:http node port" : goto $ext,
}
add element ip kube-proxy-agent hairpin {
\t10.244.1.2 . 10.244.1.2,
\t10.244.9.9 . 10.244.9.9,
}
add element ip kube-proxy-agent cluster-ips {
\t10.96.0.10,
}
add element ip kube-proxy-agent $esvl {
\t4 : 10.244.1.2,
}
add element ip kube-proxy-agent $esvc {
\t0 : 10.244.1.2,
\t1 : 10.244.9.9,
}
""",
    ),
    (
        "externalTrafficPolicy Local with endpoints only elsewhere: the short-circuits stay, other "
        "external traffic falls through the ext chain undnatted and is dropped (not rejected)",
        NODE4,
        ServicePlan(info("elsewhere", node_port=30083, external_policy_local=True), (R,), (), True),
        names("elsewhere"),
        """\
add chain ip kube-proxy-agent $svc
add rule ip kube-proxy-agent $svc meta l4proto tcp dnat ip to numgen random mod 1 offset 0 map @$esvc : 8080
add chain ip kube-proxy-agent $ext
add rule ip kube-proxy-agent $ext ip saddr 10.244.0.0/16 goto $svc
add rule ip kube-proxy-agent $ext fib saddr type local jump mark-for-masquerade
add rule ip kube-proxy-agent $ext fib saddr type local goto $svc
add element ip kube-proxy-agent service-ips {
\t10.96.0.10 . tcp . 80 comment "default/elsewhere:http cluster IP" : jump $svc,
}
add element ip kube-proxy-agent service-nodeports {
\ttcp . 30083 comment "default/elsewhere:http node port" : goto $ext,
}
add element ip kube-proxy-agent no-endpoint-nodeports {
\ttcp . 30083 comment "default/elsewhere:http has no local endpoints" : drop,
}
add element ip kube-proxy-agent hairpin {
\t10.244.9.9 . 10.244.9.9,
}
add element ip kube-proxy-agent cluster-ips {
\t10.96.0.10,
}
add element ip kube-proxy-agent $esvc {
\t0 : 10.244.9.9,
}
""",
    ),
    (
        "internalTrafficPolicy Local with no endpoint on this node: the cluster IP drops",
        NODE4,
        ServicePlan(info("itp", internal_policy_local=True), (), (), True),
        names("itp"),
        """\
add element ip kube-proxy-agent no-endpoint-services {
\t10.96.0.10 . tcp . 80 comment "default/itp:http has no endpoints" : drop,
}
add element ip kube-proxy-agent cluster-ips {
\t10.96.0.10,
}
""",
    ),
    (
        "LoadBalancer with loadBalancerSourceRanges: the LB IP enters the ext chain; before DNAT "
        "the firewall map sends it to a chain dropping sources outside the (collapsed) ranges",
        NODE4,
        ServicePlan(
            info("lb", node_port=30443, port=443, load_balancer_ips=("198.51.100.7",),
                 load_balancer_source_ranges=("203.0.113.0/24", "203.0.113.128/25", "192.0.2.0/24")),
            (B,),
            has_any=True,
        ),
        names("lb"),
        """\
add chain ip kube-proxy-agent $svc
add rule ip kube-proxy-agent $svc meta l4proto tcp dnat ip to numgen random mod 1 offset 0 map @$esvc : 8080
add chain ip kube-proxy-agent $ext
add rule ip kube-proxy-agent $ext jump mark-for-masquerade
add rule ip kube-proxy-agent $ext goto $svc
add chain ip kube-proxy-agent $fw
add rule ip kube-proxy-agent $fw ip saddr != { 192.0.2.0/24, 203.0.113.0/24 } drop comment "default/lb:http source \
not in loadBalancerSourceRanges"
add element ip kube-proxy-agent service-ips {
\t10.96.0.10 . tcp . 443 comment "default/lb:http cluster IP" : jump $svc,
\t198.51.100.7 . tcp . 443 comment "default/lb:http load balancer IP" : jump $ext,
}
add element ip kube-proxy-agent service-nodeports {
\ttcp . 30443 comment "default/lb:http node port" : goto $ext,
}
add element ip kube-proxy-agent firewall-ips {
\t198.51.100.7 . tcp . 443 comment "default/lb:http" : goto $fw,
}
add element ip kube-proxy-agent hairpin {
\t10.244.1.3 . 10.244.1.3,
}
add element ip kube-proxy-agent cluster-ips {
\t10.96.0.10,
}
add element ip kube-proxy-agent $esvc {
\t0 : 10.244.1.3,
}
""",
    ),
    (
        "IPv6: the same shapes in table ip6, with ip6 matches and address . port DNAT targets",
        NODE6,
        ServicePlan(info("web", "fd00:96::10", 6, node_port=30080), (ep("fd00:244::2"),), has_any=True),
        names("web"),
        """\
add chain ip6 kube-proxy-agent $svc
add rule ip6 kube-proxy-agent $svc meta l4proto tcp dnat ip6 to numgen random mod 1 offset 0 map @$esvc : 8080
add chain ip6 kube-proxy-agent $ext
add rule ip6 kube-proxy-agent $ext jump mark-for-masquerade
add rule ip6 kube-proxy-agent $ext goto $svc
add element ip6 kube-proxy-agent service-ips {
\tfd00:96::10 . tcp . 80 comment "default/web:http cluster IP" : jump $svc,
}
add element ip6 kube-proxy-agent service-nodeports {
\ttcp . 30080 comment "default/web:http node port" : goto $ext,
}
add element ip6 kube-proxy-agent hairpin {
\tfd00:244::2 . fd00:244::2,
}
add element ip6 kube-proxy-agent cluster-ips {
\tfd00:96::10,
}
add element ip6 kube-proxy-agent $esvc {
\t0 : fd00:244::2,
}
""",
    ),
]


@pytest.mark.parametrize(("scenario", "node", "plan", "subst", "expected"), CASES, ids=lambda v: None)
def test_service_port_renders_exactly(
    scenario: str, node: NodeContext, plan: ServicePlan, subst: dict[str, str], expected: str
) -> None:
    got = service_section(full_text(node, plan))
    assert got == Template(expected).substitute(subst), scenario


def test_ipv6_prelude_uses_ip6_and_loopback() -> None:
    text = full_text(NODE6)
    assert text.startswith("add table ip6 kube-proxy-agent\nflush table ip6 kube-proxy-agent\n")
    assert "add map ip6 kube-proxy-agent service-ips { type ipv6_addr . inet_proto . inet_service : verdict ; }" in text
    assert "add set ip6 kube-proxy-agent hairpin { type ipv6_addr . ipv6_addr ; }" in text
    assert "ip6 daddr != ::1/128 fib daddr type local meta l4proto . th dport vmap @service-nodeports" in text
    assert " ip " not in text.replace("ip6 ", "")


# -- partial syncs ---------------------------------------------------------------------------------


def synced(*plans: ServicePlan) -> tuple[NftRenderer, DesiredState]:
    st = state(NODE4, *plans)
    r = NftRenderer(4)
    r.render(st, (), full=True)
    return r, st


def test_partial_render_holds_only_the_changed_service() -> None:
    """One endpoint of `web` replaced among three services: no chain is rewritten, only web's
    endpoint map element and the hairpin elements of the endpoints that came and went change."""
    other = ServicePlan(info("other", "10.96.0.20"), (A,), has_any=True)
    third = ServicePlan(info("third", "10.96.0.30", node_port=30090), (B,), has_any=True)
    web = ServicePlan(info("web"), (A, B), has_any=True)
    r, st = synced(other, third, web)
    C = ep("10.244.1.4")
    st.services[web.name] = dataclasses.replace(web, cluster=(A, C))
    out = r.render(st, {web.name}, full=False)
    n = names("web")
    assert not out.full
    assert out.text == Template("""\
delete element ip kube-proxy-agent $esvc {
\t9,
}
add element ip kube-proxy-agent hairpin {
\t10.244.1.4 . 10.244.1.4,
}
add element ip kube-proxy-agent $esvc {
\t9 : 10.244.1.4,
}
""").substitute(n)  # 10.244.1.3 stays: `third` still uses it; web's block starts at 8
    for name in ("other", "third"):
        assert all(c not in out.text for c in names(name).values())
    assert out.written["chains"] == 0 and out.written["rules"] == 0 and out.written["hairpin"] == 1
    assert out.written["endpoints"] == 2
    assert out.totals["service-ips"] == 3 and out.totals["hairpin"] == 3
    # the same changes, for a writer that applies element changes without the nft language
    assert out.elements == ((False, n["esvc"], "9", ""), (True, "hairpin", "10.244.1.4 . 10.244.1.4", ""),
                            (True, n["esvc"], "9", "10.244.1.4"))


def test_only_endpoint_element_changes_are_offered_as_elements() -> None:
    """A change that touches a chain, another map or set (a rule's modulus, a verdict map, a new
    Service), a periodic check, or no change at all: no element list, only the text."""
    web = ServicePlan(info("web"), (A, B), has_any=True)
    r, st = synced(web)
    st.services[web.name] = dataclasses.replace(web, cluster=tuple(ep(f"10.244.2.{i}") for i in range(5)))
    assert r.render(st, {web.name}, full=False).elements is None  # the block of 4 outgrown: the rule changes
    st.services[web.name] = dataclasses.replace(web, cluster=())
    assert r.render(st, {web.name}, full=False).elements is None  # no endpoints: reject verdict, chain gone
    new = ServicePlan(info("new", "10.96.0.40"), (A,), has_any=True)
    st.services[new.name] = new
    assert r.render(st, {new.name}, full=False).elements is None
    assert r.render(st, {new.name}, full=False).elements is None and r.render(st, (), full=False).text == ""
    st.services[new.name] = dataclasses.replace(new, cluster=(B,))
    periodic = r.render(st, {new.name}, full=True, existing=_existing(NftRenderer(4), st))
    assert periodic.elements is None and periodic.text


def test_element_changes_encode_as_the_kernel_stores_them() -> None:
    """Endpoint map keys are numbers in host order (the type of `numgen`), addresses in network
    order, hairpin keys two addresses; runs of the same map and verb are one write."""
    import socket
    import struct

    from agent.backends.nftables.elements import element_writes

    writes = element_writes(4, [(False, "endpoints-03", "9", ""), (False, "endpoints-03", "10", ""),
                                (True, "hairpin", "10.244.1.4 . 10.244.1.4", ""),
                                (True, "endpoints-03", "9", "10.244.1.4")])
    assert [(w.add, w.family, w.table, w.set) for w in writes] == [
        (False, 4, N.TABLE, "endpoints-03"), (True, 4, N.TABLE, "hairpin"), (True, 4, N.TABLE, "endpoints-03")]
    assert writes[0].elements == ((struct.pack("=I", 9), None), (struct.pack("=I", 10), None))
    assert writes[1].elements == ((socket.inet_aton("10.244.1.4") * 2, None),)
    assert writes[2].elements == ((struct.pack("=I", 9), socket.inet_aton("10.244.1.4")),)
    six = element_writes(6, [(True, "endpoints-00", "4", "fd00::1"), (True, "hairpin", "fd00::1 . fd00::1", "")])
    assert six[0].elements[0][1] == socket.inet_pton(socket.AF_INET6, "fd00::1")
    assert len(six[1].elements[0][0]) == 32


def test_partial_render_of_a_removed_service_deletes_its_chains_and_elements() -> None:
    web = ServicePlan(info("web", node_port=30080), (A,), has_any=True)
    r, st = synced(web)
    del st.services[web.name]
    out = r.render(st, {web.name}, full=False)
    assert out.text == Template("""\
delete element ip kube-proxy-agent service-ips {
\t10.96.0.10 . tcp . 80,
}
delete element ip kube-proxy-agent service-nodeports {
\ttcp . 30080,
}
delete element ip kube-proxy-agent hairpin {
\t10.244.1.2 . 10.244.1.2,
}
delete element ip kube-proxy-agent cluster-ips {
\t10.96.0.10,
}
delete element ip kube-proxy-agent $esvc {
\t0,
}
flush chain ip kube-proxy-agent $svc
flush chain ip kube-proxy-agent $ext
delete chain ip kube-proxy-agent $svc
delete chain ip kube-proxy-agent $ext
""").substitute(names("web"))
    assert out.totals == {**{N.map_label(m): 0 for m, _, _ in N.MAPS}, "chains": 13, "rules": 26}


def test_partial_render_endpoints_gone_swaps_dnat_for_reject() -> None:
    """Last endpoint gone: the cluster IP moves from service-ips to no-endpoint-services, and the
    affinity sets go after the chain that used them."""
    web = ServicePlan(info("web", affinity_seconds=60), (A,), has_any=True)
    r, st = synced(web)
    st.services[web.name] = ServicePlan(web.info)
    n = names("web", A, affinity=60)
    assert r.render(st, {web.name}, full=False).text == Template("""\
delete element ip kube-proxy-agent service-ips {
\t10.96.0.10 . tcp . 80,
}
delete element ip kube-proxy-agent hairpin {
\t10.244.1.2 . 10.244.1.2,
}
add element ip kube-proxy-agent no-endpoint-services {
\t10.96.0.10 . tcp . 80 comment "default/web:http has no endpoints" : goto reject-chain,
}
flush chain ip kube-proxy-agent $svc
delete chain ip kube-proxy-agent $svc
delete set ip kube-proxy-agent $aff1
""").substitute(n)


def test_unchanged_plan_writes_nothing() -> None:
    web = ServicePlan(info("web"), (A,), has_any=True)
    r, st = synced(web)
    out = r.render(st, {web.name, spn("never-existed")}, full=False)
    assert out.text == "" and not out.full


def test_shared_external_ip_goes_to_the_first_service_and_passes_on() -> None:
    """Two services claim 192.0.2.9:80 (externalIPs are user-set): the map can hold one, so the
    first by name wins (as the first iptables rule would); when it goes the other takes over."""
    a = ServicePlan(info("a", "10.96.0.1", external_ips=("192.0.2.9",)), (A,), has_any=True)
    b = ServicePlan(info("b", "10.96.0.2", external_ips=("192.0.2.9",)), (B,), has_any=True)
    r, st = synced(a, b)
    full = full_text(NODE4, a, b)
    assert full.count("192.0.2.9 . tcp . 80") == 1
    assert f'192.0.2.9 . tcp . 80 comment "default/a:http external IP" : jump {names("a")["ext"]}' in full
    del st.services[a.name]
    text = r.render(st, {a.name}, full=False).text
    gone = "delete element ip kube-proxy-agent service-ips {\n\t10.96.0.1 . tcp . 80,\n\t192.0.2.9 . tcp . 80,\n}"
    assert gone in text
    assert f'\t192.0.2.9 . tcp . 80 comment "default/b:http external IP" : jump {names("b")["ext"]},' in text


def test_node_change_or_unknown_kernel_makes_the_render_full() -> None:
    web = ServicePlan(info("web"), (A,), has_any=True)
    r, st = synced(web)
    st.node = dataclasses.replace(NODE4, masquerade_all=True)
    assert r.render(st, {web.name}, full=False).full
    r.reset(full=False)
    out = r.render(st, (), full=False)
    assert out.full and out.text.startswith(f"add table {T4}\nflush table {T4}\n")
    r.reset(full=True)  # a failed full sync: the next one deletes and recreates the table
    out = r.render(st, (), full=True)
    assert out.text.startswith(f"add table {T4}\ndelete table {T4}\nadd table {T4}\nadd map ")
    assert "flush map" not in out.text


def test_full_render_deletes_leftovers_listed_from_the_kernel() -> None:
    web = ServicePlan(info("web"), (A,), has_any=True)
    st = state(NODE4, web)
    existing = Existing(
        chains=frozenset({"services", names("web")["svc"], "sep-old"}),
        sets=frozenset({"hairpin", "aff-old-10"}),
        maps=frozenset({"service-ips", "old-map"}),
    )
    text = NftRenderer(4).render(st, (), full=True, existing=existing).text
    deletes = [ln for ln in text.splitlines() if ln.startswith("delete")]
    assert deletes == [f"delete map {T4} old-map", f"delete chain {T4} sep-old", f"delete set {T4} aff-old-10"]


def apply_endpoint_statements(kernel: dict[tuple[str, str], str], text: str) -> None:
    """What a transaction does to the endpoint maps, applied to `kernel` ((map, number) -> address)."""
    block: tuple[str, str] | None = None
    for line in text.splitlines():
        words = line.split()
        if line.startswith("flush map ") and words[-1].startswith(N.ENDPOINTS):
            for key in [k for k in kernel if k[0] == words[-1]]:
                del kernel[key]
        elif line.endswith("{") and words[1] == "element" and words[4].startswith(N.ENDPOINTS):
            block = (words[0], words[4])
        elif line == "}":
            block = None
        elif block is not None and line.startswith("\t"):
            verb, mapname = block
            key, _, value = line.strip().rstrip(",").partition(" : ")
            if verb == "delete":
                assert (mapname, key) in kernel, (mapname, key)
                del kernel[(mapname, key)]
            else:
                assert (mapname, key) not in kernel, (mapname, key)
                kernel[(mapname, key)] = value


def test_random_partial_renders_agree_with_a_full_render() -> None:
    """Any sequence of partial renders leaves the renderer (and so the kernel) holding exactly the
    elements, chains and counts a full render of the final state would."""
    rng = random.Random(7)
    ips = [f"10.244.1.{i}" for i in range(2, 12)]
    shared = ["192.0.2.1", "192.0.2.2"]

    def plan(i: int) -> ServicePlan:
        eps = tuple(sorted({ep(x) for x in rng.sample(ips, rng.randint(0, 3))}))
        inf = info(f"s{i}", f"10.96.0.{i + 1}", node_port=rng.choice([0, 30000 + i]),
                   external_ips=tuple(rng.sample(shared, rng.randint(0, 1))),
                   affinity_seconds=rng.choice([0, 60]))
        return ServicePlan(inf, eps, (), bool(eps))

    st0 = state(NODE4, *(plan(i) for i in range(8)))
    r = NftRenderer(4)
    kernel: dict[tuple[str, str], str] = {}  # the endpoint maps, as the transactions leave them
    apply_endpoint_statements(kernel, r.render(st0, (), full=True).text)
    st = st0
    for _ in range(200):
        changed = set()
        for _ in range(rng.randint(1, 3)):
            i = rng.randint(0, 9)
            name = spn(f"s{i}")
            if rng.random() < 0.3:
                st.services.pop(name, None)
            else:
                st.services[name] = plan(i)
            changed.add(name)
        apply_endpoint_statements(kernel, r.render(st, changed, full=False).text)
    fresh = NftRenderer(4)
    full = fresh.render(st, (), full=True)
    assert r._kernel == fresh._kernel
    # the endpoint maps' numbers depend on the order blocks were taken; what the transactions left
    # in them is exactly what the chains point at, no two chains share a number, and the same
    # endpoints are there as after a full render
    pointed = [(m, k, v) for s in r._memo.values() for m, k, v, _ in s.elements if m.startswith(N.ENDPOINTS)]
    assert len({(m, k) for m, k, _ in pointed}) == len(pointed)
    assert kernel == {(m, k): v for m, k, v in pointed}
    fresh_kernel: dict[tuple[str, str], str] = {}
    apply_endpoint_statements(fresh_kernel, full.text)
    assert sorted(kernel.values()) == sorted(fresh_kernel.values())
    assert r._totals() == full.totals


# -- the writer, with a fake nft -------------------------------------------------------------------


class FakeNft:
    name = "fake"

    def __init__(self, rc: int = 0, err: str = "") -> None:
        self.rc, self.err, self.texts = rc, err, []  # type: ignore[var-annotated]

    def run(self, text: str) -> tuple[int, str, str]:
        self.texts.append(text)
        return self.rc, "", self.err

    def list_json(self, what: str) -> object:
        return {"nftables": [{"chain": {"family": "ip", "table": N.TABLE, "name": "sep-old"}}]}

    def release(self) -> None:
        pass


def test_writer_one_transaction_totals_per_family_and_leftovers() -> None:
    nft = FakeNft()
    backend = NftablesBackend(nft, families=(4, 6))
    web = ServicePlan(info("web"), (A,), has_any=True)
    result = backend.sync({4: state(NODE4, web), 6: state(NODE6)}, {}, full=True)
    assert len(nft.texts) == 1  # both families, one transaction
    assert f"delete chain {T4} sep-old" in nft.texts[0]
    assert result.totals["service-ips"] == 1 and result.totals["service-ips6"] == 0
    assert result.totals["chains"] == 14 and result.written["rules"] == 27


def test_writer_failure_names_the_statement_and_forces_a_full_sync() -> None:
    text = f"add table {T4}\nadd element {T4} service-ips {{\n\t10.96.0.1 . tcp . 80 : jump svc-x,\n}}\n"
    err = "/proc/self/fd/7:3:2-21: Error: Could not process rule: No such file or directory\n"
    assert offending(text, err) == (
        "Could not process rule: No such file or directory",
        f"add element {T4} service-ips {{ 10.96.0.1 . tcp . 80 : jump svc-x }}",
    )
    web = ServicePlan(info("web"), (A,), has_any=True)
    desired = {4: state(NODE4, web)}
    backend = NftablesBackend(FakeNft(), families=(4,))
    backend.sync(desired, {}, full=True)
    backend._nft = FakeNft(1, "/dev/stdin:1:1-5: Error: Could not process rule: Device or resource busy\n")
    desired[4].services[web.name] = dataclasses.replace(web, cluster=(B,))
    with pytest.raises(SyncError) as exc:
        backend.sync(desired, {4: Changes(frozenset({web.name}))}, full=False)
    assert exc.value.partial
    # the mode counts its own failures, under kube-proxy's name and ours
    assert backend.metrics.sync_failures._value.get() == 1
    assert backend.metrics.transaction_failures._value.get() == 1
    assert str(exc.value).endswith(
        "Device or resource busy; offending statement: delete element ip kube-proxy-agent hairpin {"
    )
    backend._nft = FakeNft()
    assert backend.sync(desired, {}, full=False).detail == "IPv4=full"


def test_check_supported_without_nft_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import agent.backends.nftables.writer as W

    monkeypatch.setattr(W, "detect_nft", lambda: None)
    with pytest.raises(UnsupportedMode, match="python3-nftables"):
        NftablesBackend().check_supported()
    refused = FakeNft(1, "/proc/self/fd/3:2:1-9: Error: Could not process rule: Operation not supported\n")
    with pytest.raises(UnsupportedMode, match="Operation not supported"):
        NftablesBackend(refused, families=(4,)).check_supported()
    assert refused.texts[-1] == "add table ip kube-proxy-agent-probe\ndelete table ip kube-proxy-agent-probe\n"


def test_backend_render_is_the_full_load_per_family() -> None:
    web = ServicePlan(info("web"), (A,), has_any=True)
    out = NftablesBackend(FakeNft()).render({4: state(NODE4, web), 6: state(NODE6)})
    assert out.startswith("# IPv4: input for nft -f\n" + PRELUDE)
    assert "# IPv6: input for nft -f\nadd table ip6 kube-proxy-agent\n" in out


# -- the periodic check (issue 15: a periodic full resync rewrote the whole table, and every change
# waited behind it: seconds at 10k Services) ----------------------------------------------------


def _existing(r: NftRenderer, st: DesiredState) -> Existing:
    """What the kernel lists after r's last full render went in (names only)."""
    text = r.render(st, (), full=True).text
    r.known = True
    chains = frozenset(re.findall(r"^add chain \S+ \S+ (\S+)", text, flags=re.M))
    sets = frozenset(re.findall(r"^add set \S+ \S+ (\S+)", text, flags=re.M))
    maps = frozenset(re.findall(r"^add map \S+ \S+ (\S+)", text, flags=re.M))
    return Existing(chains, sets, maps)


def test_periodic_check_is_one_small_transaction_with_the_changes_in_it() -> None:
    """A periodic sync while the kernel holds what was written: no table flush; the fixed chains
    rewritten, the maps declared (a no-op when present), this sync's change, and the ports of this
    slice re-asserted (chains flushed and refilled, their map elements added again)."""
    web = ServicePlan(info("web", node_port=30080), (A,), has_any=True)
    db = ServicePlan(info("db", "10.96.0.20"), (B,), has_any=True)
    st = state(NODE4, web, db)
    r = NftRenderer(4)
    existing = _existing(r, st)
    st.services[web.name] = dataclasses.replace(web, cluster=(A, B))
    out = r.render(st, {web.name}, full=True, existing=existing)
    assert not out.full and not out.missing and out.reasserted == 2
    assert f"flush table {T4}" not in out.text and f"flush map {T4}" not in out.text
    assert f"flush chain {T4} {N.SERVICES}\n" in out.text
    assert out.text.index(": 10.244.1.3,") < out.text.index(f"add chain {T4} {N.SERVICES}")
    n = names("db")
    assert f"add chain {T4} {n['svc']}\nflush chain {T4} {n['svc']}\n" in out.text
    assert f"10.96.0.20 . tcp . 80 comment \"default/db:http cluster IP\" : jump {n['svc']}," in out.text
    # the result is what a full render would leave: a later partial diff starts from it
    assert r.render(st, {web.name}, full=False).text == ""


def test_periodic_check_sweeps_all_ports_in_slices_and_repairs_missing_chains_at_once() -> None:
    plans = [ServicePlan(info(f"s{i:02}", f"10.96.0.{i + 10}"), (A,), has_any=True) for i in range(10)]
    st = state(NODE4, *plans)
    r = NftRenderer(4)
    existing = _existing(r, st)
    r.SWEEP_MIN, r.SWEEP_CHECKS = 1, 4  # 10 ports: 3 per check, all within 4 checks
    seen: list[set[str]] = []
    for _ in range(4):
        out = r.render(st, (), full=True, existing=existing)
        seen.append({p.name.name for p in plans if f"flush chain {T4} {names(p.name.name)['svc']}" in out.text})
        assert out.reasserted == 3 or (out.reasserted == 1 and len(seen) == 4)
    assert set().union(*seen) == {p.name.name for p in plans}
    # a service chain deleted by hand: its port is rewritten by the next check, whatever the slice
    gone = names("s07")["svc"]
    out = r.render(st, (), full=True, existing=dataclasses.replace(existing, chains=existing.chains - {gone}))
    assert out.missing == (gone,) and f"add chain {T4} {gone}\n" in out.text and not out.full


def test_periodic_check_rewrites_the_table_when_a_fixed_part_is_gone() -> None:
    web = ServicePlan(info("web"), (A,), has_any=True)
    st = state(NODE4, web)
    r = NftRenderer(4)
    existing = _existing(r, st)
    out = r.render(st, (), full=True, existing=dataclasses.replace(existing, maps=existing.maps - {N.SERVICE_IPS}))
    assert out.full and out.missing == (N.SERVICE_IPS,) and f"flush table {T4}" in out.text
    out = r.render(st, (), full=True, existing=Existing())  # the table deleted
    assert out.full and N.SERVICES in out.missing


def test_generation_is_recorded_after_a_write_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """The periodic check may skip reading back only while nf_tables is as our last write left it.
    A sync that writes nothing must not take a foreign commit made since for its own."""
    import agent.kernel.nfgen as nfgen

    gen = [1]
    monkeypatch.setattr(nfgen, "generation", lambda: gen[0])
    web = ServicePlan(info("web"), (A,), has_any=True)
    backend = NftablesBackend(FakeNft(), families=(4,))
    backend.sync({4: state(NODE4, web)}, {}, full=True)
    gen[0] = 2  # someone else commits
    backend.sync({4: state(NODE4, web)}, {}, full=False)  # nothing to write
    assert not backend.untouched.holds()


def test_a_foreign_commit_before_our_next_write_is_not_taken_for_ours(monkeypatch: pytest.MonkeyPatch) -> None:
    """Someone commits, then we write: the generation read after our write includes their commit,
    but the read before it saw it, so the next check still reads back (and says someone moved)."""
    import agent.kernel.nfgen as nfgen

    gen = [1]
    monkeypatch.setattr(nfgen, "generation", lambda: gen[0])
    untouched = nfgen.Untouched()
    untouched.before_write()
    untouched.wrote()
    assert untouched.holds() and not untouched.moved
    gen[0] = 2  # someone else commits
    untouched.before_write()
    gen[0] = 3  # our write
    untouched.wrote()
    assert not untouched.holds() and untouched.moved
    untouched.before_write()
    untouched.wrote()  # nobody else since the check
    assert untouched.holds()
    gen[0] = 4  # someone else commits; the next check reads back (and sees it), then we write
    assert not untouched.holds() and untouched.moved
    untouched.before_write()
    gen[0] = 5
    untouched.wrote()
    assert untouched.holds() and not untouched.moved


def test_element_batches_split_long_runs_and_refuse_too_many() -> None:
    """One message's element list is one netlink attribute (64 KiB at most): a long run of one map
    is split over several messages of the same batch; far too many elements for one send are
    refused before anything is encoded, for the writer to use nft instead."""
    from agent.kernel import nftelements

    key6 = bytes(16)
    many = nftelements.ElementWrite(True, 6, N.TABLE, "hairpin", tuple((key6 * 2, None) for _ in range(1500)))
    requests = nftelements.requests([many])
    assert len(requests) == -(-1500 // nftelements.MAX_PER_MESSAGE)
    assert all(len(r.payload) < 65535 for r in requests)
    with pytest.raises(nftelements.BatchTooBig):
        nftelements.requests([many, many])


def test_cluster_ips_check_rejects_other_ports_and_drops_unallocated_addresses() -> None:
    """As kube-proxy's nftables mode: after DNAT, new traffic still addressed to a cluster IP found
    no port of it (rejected); traffic to an address of the service CIDRs (ServiceCIDR objects) that
    no Service holds is dropped. Every port of a Service shares its cluster IP element, which goes
    only with the last of them."""
    node = dataclasses.replace(NODE4, service_cidrs=("10.96.0.0/16", "10.97.0.0/16"))
    text = full_text(node)
    assert ("add rule ip kube-proxy-agent cluster-ips-check ip daddr 10.96.0.0/15 drop "
            'comment "no Service holds this address"\n') in text
    assert "cluster-ips-check ip daddr @cluster-ips reject" in text
    http = ServicePlan(info("web"), (A,), has_any=True)
    dns = ServicePlan(ServicePortInfo(spn("web", "dns", "UDP"), 4, "UDP", 53, "10.96.0.10"), (A,), has_any=True)
    r, st = synced(http, dns)
    del st.services[dns.name]
    assert "cluster-ips" not in r.render(st, {dns.name}, full=False).text
    del st.services[http.name]
    last = r.render(st, {http.name}, full=False).text
    assert "delete element ip kube-proxy-agent cluster-ips {\n\t10.96.0.10,\n}" in last


def test_loopback_never_takes_node_ports() -> None:
    """--nodeport-addresses holding 127.0.0.1: left out of nodeport-ips (kube-proxy's nftables mode
    serves no localhost NodePorts; a DNAT from loopback would be black-holed)."""
    text = full_text(dataclasses.replace(NODE4, nodeport_ips=("127.0.0.1", "192.168.1.10")))
    assert "add element ip kube-proxy-agent nodeport-ips { 192.168.1.10 }\n" in text


def test_load_balancer_ips_join_the_source_ranges_when_the_node_is_in_them() -> None:
    lb = ServicePlan(info("lb", load_balancer_ips=("203.0.113.7",), load_balancer_source_ranges=("192.168.0.0/16",)),
                     (A,), has_any=True, node_in_source_ranges=True)
    rules = dict(render_service(lb, NODE4).chains)
    assert rules[names("lb")["fw"]] == (
        'ip saddr != { 192.168.0.0/16, 203.0.113.7/32 } drop comment "default/lb:http source not in '
        'loadBalancerSourceRanges"',)


# -- endpoint maps ------------------------------------------------------------------------------------


def test_slots_keep_a_block_while_the_endpoints_fit_and_reuse_released_ones() -> None:
    from agent.backends.nftables.render import Slots

    s = Slots()
    assert s.place("svc-a", 1) == 0 and s.place("svc-b", 3) == 4  # blocks of at least 4
    assert s.place("svc-a", 4) == 0  # still fits
    assert s.place("svc-a", 5) == 8  # outgrew it: a block of 8; 0..3 is free again
    assert s.place("svc-c", 2) == 0
    s.release(["svc-b", "svc-gone"])
    assert s.place("svc-d", 1) == 4 and len(s) == 3


def test_endpoint_count_change_rewrites_the_rule_and_elements_in_one_transaction() -> None:
    """Two endpoints become five: the block of four is outgrown, so the rule (its modulus and
    offset) and every element move together; a later swap at five touches elements only."""
    other = ServicePlan(info("other", "10.96.0.20"), (A,), has_any=True)
    web = ServicePlan(info("web"), (A, B), has_any=True)
    r, st = synced(other, web)
    more = tuple(ep(f"10.244.2.{i}") for i in range(5))
    st.services[web.name] = dataclasses.replace(web, cluster=more)
    out = r.render(st, {web.name}, full=False)
    n = names("web")
    rule = f"meta l4proto tcp dnat ip to numgen random mod 5 offset 8 map @{n['esvc']} : 8080"
    assert f"add rule {T4} {n['svc']} {rule}\n" in out.text
    assert f"delete element {T4} {n['esvc']} {{\n\t4,\n\t5,\n}}" in out.text
    assert "\t12 : 10.244.2.4," in out.text
    st.services[web.name] = dataclasses.replace(web, cluster=(*more[:4], ep("10.244.3.1")))
    out = r.render(st, {web.name}, full=False)
    assert out.written["rules"] == 0 and out.written["endpoints"] == 2 and "\t12 : 10.244.3.1," in out.text


def test_endpoints_on_different_ports_take_the_cascade() -> None:
    """A named port resolving to different numbers on different pods: the map holds addresses
    only, so such a Service DNATs through per-endpoint rules."""
    plan = ServicePlan(info("mixed"), (A, ep("10.244.1.3", port=9090)), has_any=True)
    s = render_service(plan, NODE4)
    rules = dict(s.chains)[names("mixed")["svc"]]
    assert rules == ("numgen random mod 2 == 0 meta l4proto tcp dnat to 10.244.1.2:8080",
                         "meta l4proto tcp dnat to 10.244.1.3:9090")
    assert not s.slots and not [e for e in s.elements if e[0].startswith(N.ENDPOINTS)]
