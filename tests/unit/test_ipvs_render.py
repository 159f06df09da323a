"""The IPVS mode's pure parts: frontends to virtual servers and ipset entries, the readable render,
/proc/net/ip_vs parsing, and the netlink encoding (its traps: masquerade always sent, IPv6 netmask
as a prefix length, the kernel's HASHED flag masked)."""

from __future__ import annotations

import socket
import struct

from agent.backends.ipvs import ipvsnl
from agent.backends.ipvs import render as R
from agent.backends.ipvs.servers import F_PERSISTENT, F_SCHED2, RealServer, ServiceKey, VirtualServer, parse_proc_ip_vs
from agent.kernel.netlink import parse_attrs
from agent.model.frontends import FrontendKey
from tests.unit.test_tracker_state import EP_HTTP, HTTP, NODE, Cluster, endpoint, endpoint_slice, service

NP = [{"name": "http", "port": 80, "protocol": "TCP", "nodePort": 30080}]


def frontends(c: Cluster, family: int = 4) -> dict[str, R.FrontendIpvs]:
    state = c.model.desired[family]
    return {str(f.key): R.render_frontend(f, state.node, "rr") for f in state.frontends.values()}


def test_cluster_ip_is_a_virtual_server_on_the_dummy_interface() -> None:
    c = Cluster(cluster_cidrs=["10.244.0.0/16"]).apply(
        service("web", ["10.96.0.10"], HTTP, sessionAffinity="ClientIP"),
        endpoint_slice("web-1", "web", [endpoint("10.244.1.5", node=NODE), endpoint("10.244.2.5")], EP_HTTP))
    c.drain()
    (fr,) = frontends(c).values()
    assert fr.server == VirtualServer(ServiceKey("TCP", "10.96.0.10", 80), "rr", F_PERSISTENT, 10800)
    assert fr.reals == (RealServer("10.244.1.5", 8080), RealServer("10.244.2.5", 8080))
    assert fr.address == "10.96.0.10"
    assert set(fr.entries) == {
        ("FRONTENDS", "10.96.0.10,tcp:80"), ("CLUSTER-IP", "10.96.0.10,tcp:80"),
        ("LOOP-BACK", "10.244.1.5,tcp:8080,10.244.1.5"),  # only the local endpoint can hairpin
        ("DUMMY-IPS", "10.96.0.10"),
    }


def test_node_port_with_local_policy_keeps_the_client_and_drops_without_local_endpoints() -> None:
    c = Cluster().apply(
        service("web", ["10.96.0.10"], NP, type="NodePort", externalTrafficPolicy="Local"),
        endpoint_slice("web-1", "web", [endpoint("10.244.2.5")], EP_HTTP))
    c.model.set_local_ips(["192.168.1.10"])
    c.drain()
    fr = frontends(c)["192.168.1.10:30080/TCP"]
    assert fr.address is None  # node addresses never go on the dummy interface
    assert fr.reals == ()
    assert set(fr.entries) == {("FRONTENDS", "192.168.1.10,tcp:30080"), ("DROP", "192.168.1.10,tcp:30080")}
    # policy Cluster: masqueraded, no drop
    c.apply(service("web", ["10.96.0.10"], NP, type="NodePort"))
    c.drain()
    fr = frontends(c)["192.168.1.10:30080/TCP"]
    assert ("NODE-PORT", "192.168.1.10,tcp:30080") in fr.entries and not any(b == "DROP" for b, _ in fr.entries)


def test_load_balancer_source_ranges_as_ipset_entries() -> None:
    svc = service("lb", ["10.96.0.11"], HTTP, type="LoadBalancer",
                  loadBalancerSourceRanges=["203.0.113.0/24", "198.51.100.7/32"])
    svc["status"] = {"loadBalancer": {"ingress": [{"ip": "192.0.2.9"}]}}
    c = Cluster().apply(svc, endpoint_slice("lb-1", "lb", [endpoint("10.244.2.5")], EP_HTTP))
    c.drain()
    fr = frontends(c)["192.0.2.9:80/TCP"]
    assert ("FW", "192.0.2.9,tcp:80") in fr.entries and ("EXTERNAL", "192.0.2.9,tcp:80") in fr.entries
    assert ("FW-SOURCES", "192.0.2.9,tcp:80,203.0.113.0/24") in fr.entries
    assert ("FW-SOURCES", "192.0.2.9,tcp:80,198.51.100.7") in fr.entries  # as `ipset list` prints a /32


def test_mh_scheduler_hashes_the_source_port_as_kube_proxy_sets_it() -> None:
    c = Cluster().apply(service("web", ["fd00:96::10"], HTTP),
                        endpoint_slice("web-1", "web", [endpoint("fd00:244::5")], EP_HTTP, address_type="IPv6"))
    c.drain()
    f = c.model.desired[6].frontends.get(FrontendKey("fd00:96::10", 80, "TCP"))
    assert f is not None
    fr = R.render_frontend(f, c.model.desired[6].node, "mh")
    assert fr.server.flags == F_SCHED2 and fr.server.scheduler == "mh"
    assert ("FRONTENDS", "fd00:96::10,tcp:80") in fr.entries


def test_render_is_ipvsadm_lines_addresses_ipsets_and_a_constant_rule_set() -> None:
    c = Cluster(cluster_cidrs=["10.244.0.0/16"]).apply(
        service("web", ["10.96.0.10"], HTTP),
        endpoint_slice("web-1", "web", [endpoint("10.244.2.5")], EP_HTTP),
        service("dns", ["10.96.0.53"], [{"name": "dns", "port": 53, "protocol": "UDP"}]))
    c.drain()
    text = R.render_family(c.model.desired[4], "rr")
    assert "-A -t 10.96.0.10:80 -s rr\n-a -t 10.96.0.10:80 -r 10.244.2.5:8080 -m -w 1\n" in text
    assert "-A -u 10.96.0.53:53 -s rr\n" in text  # no endpoints: no real server (IPVS refuses)
    assert "# IPv4: addresses on kpa-ipvs0 (2)\n10.96.0.10/32\n10.96.0.53/32\n" in text
    assert "add KPAV-CLUSTER-IP 10.96.0.53,udp:53\n" in text
    rules = R.base_rules(c.model.desired[4].node)
    assert rules.count("\n-A ") == 15  # whatever the number of Services
    assert "-A KPAV-SERVICES ! -s 10.244.0.0/16 -m set --match-set KPAV-CLUSTER-IP dst,dst -j KPAV-MARK-MASQ" in rules


def test_proc_ip_vs_gives_every_real_server_with_weights_and_connections() -> None:
    text = """IP Virtual Server version 1.2.1 (size=4096)
Prot LocalAddress:Port Scheduler Flags
  -> RemoteAddress:Port Forward Weight ActiveConn InActConn
TCP  0A60000A:0050 rr persistent 10800 FFFFFFFF
  -> 0AF40105:1F90      Masq    1      2          3
  -> 0AF40205:1F90      Route   0      0          0
FWM  00000010 rr
  -> 0AF40305:1F90      Masq    1      0          0
UDP  [fd00:0096:0000:0000:0000:0000:0000:0001]:0035 rr
"""
    assert parse_proc_ip_vs(text) == {
        ServiceKey("TCP", "10.96.0.10", 80): [RealServer("10.244.1.5", 8080, 1, True, 2, 3),
                                             RealServer("10.244.2.5", 8080, 0, False)],
        ServiceKey("UDP", "fd00:96::1", 53): [],
    }


class _NoSocket(ipvsnl.Ipvs):
    def __init__(self) -> None:  # encoding only
        self.family = 42


def _service_attrs(payload: bytes) -> dict[int, memoryview]:
    outer = parse_attrs(payload, 4)
    return parse_attrs(outer[ipvsnl.ATTR_SERVICE])


def test_netlink_encoding_carries_masquerade_scheduler_and_the_ipv6_netmask() -> None:
    ipvs = _NoSocket()
    v4 = ipvs.add_service(VirtualServer(ServiceKey("TCP", "10.96.0.10", 80), "rr", F_PERSISTENT, 600))
    assert v4.type == 42 and v4.payload[0] == ipvsnl.CMD_NEW_SERVICE
    a = _service_attrs(v4.payload)
    assert struct.unpack("=H", a[ipvsnl.SVC_AF])[0] == socket.AF_INET
    assert bytes(a[ipvsnl.SVC_ADDR])[:4] == bytes([10, 96, 0, 10]) and struct.unpack("!H", a[ipvsnl.SVC_PORT]) == (80,)
    assert bytes(a[ipvsnl.SVC_SCHED]) == b"rr\0" and bytes(a[ipvsnl.SVC_NETMASK]) == b"\xff\xff\xff\xff"
    assert struct.unpack("=II", a[ipvsnl.SVC_FLAGS]) == (F_PERSISTENT, 0xFFFFFFFF)
    v6 = ipvs.add_service(VirtualServer(ServiceKey("UDP", "fd00::1", 53)))
    assert struct.unpack("=I", _service_attrs(v6.payload)[ipvsnl.SVC_NETMASK]) == (128,)
    dest = ipvs.add_dest(ServiceKey("TCP", "10.96.0.10", 80), RealServer("10.244.1.5", 8080))
    d = parse_attrs(parse_attrs(dest.payload, 4)[ipvsnl.ATTR_DEST])
    assert struct.unpack("=I", d[ipvsnl.DEST_FWD]) == (ipvsnl.CONN_F_MASQ,)  # never the kernel's direct routing
    assert struct.unpack("=I", d[ipvsnl.DEST_WEIGHT]) == (1,)


def test_decoding_reads_what_the_kernel_sent_and_masks_hashed() -> None:
    ipvs = _NoSocket()
    raw = ipvs.add_service(VirtualServer(ServiceKey("SCTP", "10.96.0.7", 9000), "sh", 0x2 | F_SCHED2)).payload
    vs = ipvsnl._decode_service(parse_attrs(raw, 4)[ipvsnl.ATTR_SERVICE])
    assert vs == VirtualServer(ServiceKey("SCTP", "10.96.0.7", 9000), "sh", F_SCHED2, 0)
