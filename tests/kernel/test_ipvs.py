"""What only the IPVS mode does, with real packets through real IPVS (inside the UML guest):
graceful termination, weights reset after a restart, O(changes) partial syncs, sysctls and
timeouts, --ipvs-exclude-cidrs, UDP real servers removed at once."""

from __future__ import annotations

import re
import socket
import struct

from tests.kernel.conftest import PODS, Node, endpoint, fresh_node, service, slice_
from tests.kernel.test_behaviour import EP_HTTP, HTTP
from tests.netlab import socket_in, wait_for

HELD_PORT = 7000  # a server in pod-a that keeps connections open


def _ipvs(n: Node, *args: str) -> str:
    return n.lab.exec(n.node, "ipvsadm", "-Ln", *args)


def _held_server(n: Node) -> socket.socket:
    srv = socket_in(n.pods["pod-a"], socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", HELD_PORT))
    srv.listen(16)
    return srv


def test_removed_tcp_endpoint_drains_gracefully(mode: str) -> None:
    """An endpoint removed while a TCP connection to it is open: its real server goes to weight 0
    (no new connections), the open connection keeps working, and the real server is deleted once
    the connection ends."""
    if mode != "ipvs":
        return
    with fresh_node(mode) as n:
        ips = n.cluster_ip()
        ports = [{"name": "held", "port": 70, "targetPort": HELD_PORT, "protocol": "TCP"}]
        ep_ports = [{"name": "held", "port": HELD_PORT, "protocol": "TCP"}]
        srv = _held_server(n)
        try:
            n.apply("held", [service("held", ips[0], ports), slice_("held-1", "held", [endpoint("pod-a")], ep_ports)])
            client = socket_in(n.pods["pod-c"], socket.AF_INET, socket.SOCK_STREAM)
            client.settimeout(3)
            client.connect((ips[0], 70))
            conn, _ = srv.accept()
            n.apply("held", [service("held", ips[0], ports), slice_("held-1", "held", [endpoint("pod-b")], ep_ports)])
            table = _ipvs(n, "-t", f"{ips[0]}:70")
            assert re.search(rf"{PODS['pod-a'][0]}:{HELD_PORT}\s+Masq\s+0\s+1", table), table  # weight 0, 1 active
            client.sendall(b"still there?")
            assert conn.recv(64) == b"still there?"  # the open connection goes on
            conn.sendall(b"yes")
            assert client.recv(64) == b"yes"
            # end it with a reset: IPVS then forgets it in seconds (after a FIN it keeps the
            # connection, inactive, for TIME_WAIT's two minutes, and so does the deletion)
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()
            conn.close()
            assert wait_for(lambda: PODS["pod-a"][0] not in _ipvs(n, "-t", f"{ips[0]}:70"), 30), _ipvs(n)
            assert "graceful deletion done" in n.log.read_text()
        finally:
            srv.close()


def test_endpoint_back_during_drain_gets_weight_1_again(mode: str) -> None:
    if mode != "ipvs":
        return
    with fresh_node(mode) as n:
        ips = n.cluster_ip()
        ports = [{"name": "held", "port": 71, "targetPort": HELD_PORT, "protocol": "TCP"}]
        ep_ports = [{"name": "held", "port": HELD_PORT, "protocol": "TCP"}]
        srv = _held_server(n)
        try:
            objs = [service("held", ips[0], ports), slice_("held-1", "held", [endpoint("pod-a")], ep_ports)]
            n.apply("held", objs)
            client = socket_in(n.pods["pod-c"], socket.AF_INET, socket.SOCK_STREAM)
            client.connect((ips[0], 71))
            conn, _ = srv.accept()
            n.apply("held", [service("held", ips[0], ports), slice_("held-1", "held", [], ep_ports)])
            assert re.search(rf"{PODS['pod-a'][0]}:{HELD_PORT}\s+Masq\s+0\s", _ipvs(n, "-t", f"{ips[0]}:71"))
            n.apply("held", objs)
            assert re.search(rf"{PODS['pod-a'][0]}:{HELD_PORT}\s+Masq\s+1\s", _ipvs(n, "-t", f"{ips[0]}:71"))
            client.close()
            conn.close()
        finally:
            srv.close()


def test_weights_left_at_zero_by_a_previous_run_are_reset(mode: str) -> None:
    """kube-proxy issue #92019: real servers left at weight 0 when the proxy stopped must not stay at
    weight 0 after it restarts, when their endpoints are still there."""
    if mode != "ipvs":
        return
    with fresh_node(mode) as n:
        ips = n.cluster_ip()
        n.apply("w", [service("w", ips[0], HTTP), slice_("w-1", "w", [endpoint("pod-a"), endpoint("pod-b")], EP_HTTP)])
        n.proc.kill()
        n.proc.wait()
        n.lab.exec(n.node, "ipvsadm", "-e", "-t", f"{ips[0]}:80", "-r", f"{PODS['pod-a'][0]}:8080", "-m", "-w", "0")
        n.start()
        table = _ipvs(n, "-t", f"{ips[0]}:80")
        assert re.search(rf"{PODS['pod-a'][0]}:8080\s+Masq\s+1\s", table), table
        assert "adopts" in n.log.read_text()


def test_one_endpoint_change_is_a_couple_of_netlink_requests(mode: str) -> None:
    """A partial sync writes only what changed: adding one endpoint is one netlink request (and an
    ipset entry when the endpoint is on this node), whatever the number of Services."""
    if mode != "ipvs":
        return
    with fresh_node(mode) as n:
        objs = []
        for i in range(20):
            ip = f"10.96.1.{i + 1}"
            objs += [service(f"s{i}", ip, HTTP), slice_(f"s{i}-1", f"s{i}", [endpoint("pod-a")], EP_HTTP)]
        n.apply("many", objs)
        objs[-1] = slice_("s19-1", "s19", [endpoint("pod-a"), endpoint("pod-b")], EP_HTTP)
        n.apply("many", objs)
        # the sync that took the change (the source's reload may queue an empty one after it)
        last = [ln for ln in n.log.read_text().splitlines() if "sync done" in ln and "changed_ports=0" not in ln][-1]
        # the real server, and (pod-b runs here) its hairpin ipset entry
        assert "full=False" in last and "written_operations=2" in last, last


def test_udp_real_server_removed_at_once_and_sysctls_set(mode: str) -> None:
    if mode != "ipvs":
        return
    with fresh_node(mode, ["--ipvs-udp-timeout", "45s", "--ipvs-tcp-timeout", "600s"]) as n:
        ips = n.cluster_ip()
        udp = [{"name": "dns", "port": 53, "protocol": "UDP"}]
        ep_udp = [{"name": "dns", "port": 8080, "protocol": "UDP"}]
        n.apply("u", [service("u", ips[0], udp), slice_("u-1", "u", [endpoint("pod-a")], ep_udp)])
        assert n.probe(ips[0], 53, "udp", src="pod-c").startswith("pod-a")
        n.apply("u", [service("u", ips[0], udp), slice_("u-1", "u", [endpoint("pod-b")], ep_udp)])
        assert PODS["pod-a"][0] not in _ipvs(n, "-u", f"{ips[0]}:53")
        for name, value in (("net/ipv4/vs/conntrack", "1"), ("net/ipv4/vs/expire_nodest_conn", "1"),
                            ("net/ipv4/vs/expire_quiescent_template", "1"), ("net/ipv4/ip_forward", "1")):
            assert n.lab.exec(n.node, "cat", f"/proc/sys/{name}").strip() == value, name
        assert "600" in n.lab.exec(n.node, "ipvsadm", "-L", "--timeout") and "45" in n.lab.exec(
            n.node, "ipvsadm", "-L", "--timeout")


def test_exclude_cidrs_and_foreign_virtual_servers_are_left_alone(mode: str) -> None:
    """A virtual server of another tool stays; so does one inside --ipvs-exclude-cidrs even when it
    sits on an address of ours."""
    if mode != "ipvs":
        return
    with fresh_node(mode, ["--ipvs-exclude-cidrs", "10.96.9.0/24"], start=False) as n:
        n.lab.exec(n.node, "ipvsadm", "-A", "-t", "10.10.0.1:2225", "-s", "rr")
        n.lab.exec(n.node, "ipvsadm", "-A", "-t", "10.96.9.9:80", "-s", "rr")
        n.lab.exec(n.node, "ip", "link", "add", "kpa-ipvs0", "type", "dummy")
        n.lab.exec(n.node, "ip", "addr", "add", "10.96.9.9/32", "dev", "kpa-ipvs0")
        n.start()  # the first sync is full: it removes what is ours and unwanted
        ips = n.cluster_ip()
        n.apply("x", [service("x", ips[0], HTTP), slice_("x-1", "x", [endpoint("pod-a")], EP_HTTP)])
        table = _ipvs(n)
        assert "10.10.0.1:2225" in table and "10.96.9.9:80" in table, table
        assert n.probe(ips[0], 80, src="pod-b").startswith("pod-a")
