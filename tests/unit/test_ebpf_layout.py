"""The eBPF mode's pure parts: frontends to map entries (scopes, flags), the byte layout lb.c reads,
and reading tc's filter list (someone else's filters are never ours)."""

from __future__ import annotations

import struct
from unittest import mock

from agent.backends.ebpf import host
from agent.backends.ebpf import layout as L
from agent.model.frontends import FrontendKey
from tests.unit.test_tracker_state import EP_HTTP, HTTP, NODE, Cluster, endpoint, endpoint_slice, service

NP = [{"name": "http", "port": 80, "protocol": "TCP", "nodePort": 30080}]


def test_local_policy_sockets_see_every_endpoint_tc_only_local_ones_and_keeps_the_client() -> None:
    c = Cluster().apply(
        service("web", ["10.96.0.10"], NP, type="NodePort", externalTrafficPolicy="Local", sessionAffinity="ClientIP"),
        endpoint_slice("web-1", "web", [endpoint("10.244.1.5", node=NODE), endpoint("10.244.2.5")], EP_HTTP))
    c.model.set_local_ips(["192.168.1.10"])
    c.drain()
    np = c.model.desired[4].frontends.get(FrontendKey("192.168.1.10", 30080, "TCP"))
    assert np is not None
    e = L.entries_of(np)
    assert [x.ip for x in e[L.SCOPE_SOCKETS].endpoints] == ["10.244.1.5", "10.244.2.5"]  # short circuit
    assert [x.ip for x in e[L.SCOPE_TC].endpoints] == ["10.244.1.5"]
    assert e[L.SCOPE_TC].flags == 0 and e[L.SCOPE_TC].affinity == 10800  # no masquerade: client kept
    cip = c.model.desired[4].frontends.get(FrontendKey("10.96.0.10", 80, "TCP"))
    assert cip is not None and L.entries_of(cip)[L.SCOPE_TC].flags == L.F_MASQ_OUTSIDE


def test_no_endpoints_refuse_at_connect_and_local_without_local_endpoint_drops_outside() -> None:
    c = Cluster().apply(
        service("web", ["10.96.0.10"], NP, type="NodePort", externalTrafficPolicy="Local"),
        endpoint_slice("web-1", "web", [endpoint("10.244.2.5")], EP_HTTP),
        service("none", ["10.96.0.11"], HTTP))
    c.model.set_local_ips(["192.168.1.10"])
    c.drain()
    table = c.model.desired[4].frontends
    np = table.get(FrontendKey("192.168.1.10", 30080, "TCP"))
    none = table.get(FrontendKey("10.96.0.11", 80, "TCP"))
    assert np is not None and none is not None
    assert L.entries_of(np)[L.SCOPE_TC].flags == L.F_DROP
    assert L.entries_of(none)[L.SCOPE_SOCKETS].flags == L.F_REJECT


def test_byte_layout_matches_lb_c() -> None:
    key = L.svc_key(FrontendKey("10.96.0.10", 80, "TCP"), L.SCOPE_TC, 3)
    assert len(key) == 24 and key[:4] == bytes([10, 96, 0, 10]) and key[16:18] == b"\x00\x50"
    assert L.decode_svc_key(key) == (FrontendKey("10.96.0.10", 80, "TCP"), L.SCOPE_TC, 3)
    assert len(L.svc_val(7, 2, L.F_MASQ, 60, 9)) == 16
    assert L.decode_svc_val(L.svc_val(7, 2, L.F_MASQ, 60, 9)) == (7, 2, L.F_MASQ, 60, 9)
    v6 = L.svc_key(FrontendKey("fd00::1", 53, "UDP"), L.SCOPE_SOCKETS, 0)
    assert L.decode_svc_key(v6) == (FrontendKey("fd00::1", 53, "UDP"), 0, 0)
    lpm = L.lpm_key(5, "203.0.113.0/24")
    assert struct.unpack_from("=II", lpm) == (32 + 24, 5) and lpm[8:12] == bytes([203, 0, 113, 0])


def test_tc_filters_tell_ours_from_anyone_elses() -> None:
    out = ("filter protocol ip pref 49152 u32 chain 0 \n"
           "filter protocol ip pref 49152 u32 chain 0 fh 800::800 order 2048 key ht 800 bkt 0 *flowid 1:1 \n"
           "filter protocol all pref 49153 bpf chain 0 \n"
           "filter protocol all pref 49153 bpf chain 0 handle 0x1 not_in_hw bytecode '1,6 0 0 0'\n"
           "filter protocol all pref 49154 bpf chain 0 \n"
           "filter protocol all pref 49154 bpf chain 0 handle 0x1 kpa_tc_ingress:[*fsobj] direct-action not_in_hw "
           "id 938 name kpa_tc_ingress tag 58ed6acc498784d7 jited \n")
    with mock.patch.object(host, "run", return_value=out):
        assert host.tc_filters("eth0", "ingress") == [(49152, "0x1", "u32"), (49153, "0x1", "bpf"),
                                                       (49154, "0x1", "kpa_tc_ingress")]


def test_render_prints_the_map_entries_a_full_sync_writes() -> None:
    c = Cluster(cluster_cidrs=["10.244.0.0/16"]).apply(
        service("web", ["10.96.0.10"], HTTP), endpoint_slice("web-1", "web", [endpoint("10.244.1.5")], EP_HTTP))
    c.drain()
    text = L.render_family(c.model.desired[4])
    assert "svcs 10.96.0.10:80/TCP sockets slot=0 count=1 flags=- (ClusterIP shop/web:http)\n" in text
    assert "svcs 10.96.0.10:80/TCP sockets slot=1 -> backend 10.244.1.5:8080\n" in text
    assert "svcs 10.96.0.10:80/TCP tc slot=0 count=1 flags=masquerade-outside-cluster" in text
    assert "ranges cluster-cidr 10.244.0.0/16\n" in text
