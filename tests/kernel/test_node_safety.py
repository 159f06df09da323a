"""The agent never breaks a node: foreign rules untouched, drift repaired, failures contained,
restarts lossless, health and metrics as kube-proxy reports them."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time

from tests.kernel.conftest import AGENT, CLIENT, NODE_BR, NODE_EXT, Node, endpoint, fresh_node, service, slice_
from tests.kernel.test_behaviour import EP_HTTP, HTTP
from tests.netlab import probe, wait_for, who
from tests.uml import in_uml

UDP53 = [{"name": "dns", "port": 53, "protocol": "UDP"}]
EP_UDP = [{"name": "dns", "port": 8080, "protocol": "UDP"}]
BUILTIN = {"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"}
XTABLES = {"filter", "nat", "mangle", "raw", "security"}
# inside the UML guest nf_tables refuses every change: the xtables commands are the legacy ones
IPT, IP6T = ("iptables-legacy", "ip6tables-legacy") if in_uml() else ("iptables", "ip6tables")


def _snapshot(n: Node) -> str:
    """Every rule and chain in the node (iptables both variants, and nft tables other than the
    iptables-nft compat ones, which iptables-save already shows), in a stable order. Empty
    built-in tables that iptables-nft creates on first use are not rules and are left out."""
    out = []
    for tool in ("iptables-nft-save", "ip6tables-nft-save", "iptables-legacy-save", "ip6tables-legacy-save"):
        for ln in n.lab.exec(n.node, tool, check=False).splitlines():
            if ln.startswith("-A") or (ln.startswith(":") and ln[1:].split()[0] not in BUILTIN):
                out.append(f"{tool}: {ln}")
    for ln in n.lab.exec(n.node, "nft", "list", "tables", check=False).splitlines():
        family, name = ln.split()[1:3]
        if not (family in ("ip", "ip6") and name in XTABLES):
            out.append(n.lab.exec(n.node, "nft", "list", "table", family, name))
    # IPVS virtual servers, ipsets and links (empty where the kernel has no IPVS)
    out += [f"ipvs: {ln}" for ln in n.lab.exec(n.node, "ipvsadm", "-Sn", check=False).splitlines()]
    out += [f"ipset: {ln}" for ln in n.lab.exec(n.node, "ipset", "save", check=False).splitlines()]
    shown = n.lab.exec(n.node, "ip", "-o", "link", "show").splitlines()
    links = [ln.split()[1].rstrip(":").split("@")[0] for ln in shown]
    out += [f"link: {name}" for name in links]
    volatile = re.compile(r"id \d+|:\[\d+\]")  # program ids change when programs are reloaded
    for name in links:  # tc filters (the eBPF mode's programs, and anyone else's)
        for direction in ("ingress", "egress"):
            listed = n.lab.exec(n.node, "tc", "filter", "show", "dev", name, direction, check=False)
            out += [f"tc {name} {direction}: {volatile.sub('', ln)}" for ln in listed.splitlines()]
    return "\n".join(sorted(out))


def _delete_ebpf_service(n: Node, ip: str, port: int) -> None:
    """Delete the master entry (sockets scope) of a frontend from the pinned map, as a stray tool would."""
    import ctypes

    from bcc import libbcc

    from agent.backends.ebpf import layout as L
    from agent.model.frontends import FrontendKey

    pin = next(p for a in n.extra_args if a.startswith("/sys/fs/bpf/") for p in [a])
    fd = libbcc.lib.bpf_obj_get(f"{pin}/kube-proxy-agent/v{L.LAYOUT}/svcs".encode())
    assert fd >= 0
    key = ctypes.create_string_buffer(L.svc_key(FrontendKey(ip, port, "TCP"), L.SCOPE_SOCKETS, 0), 24)
    assert libbcc.lib.bpf_delete_elem(fd, key) == 0
    os.close(fd)


def _foreign_rules(n: Node) -> None:
    ex = n.lab.exec
    ex(n.node, IPT, "-t", "nat", "-N", "FOREIGN-CHAIN")
    ex(n.node, IPT, "-t", "nat", "-A", "FOREIGN-CHAIN", "-s", "192.0.2.0/24", "-j", "RETURN")
    ex(n.node, IPT, "-t", "nat", "-A", "POSTROUTING", "-j", "FOREIGN-CHAIN")
    ex(n.node, IPT, "-t", "filter", "-A", "INPUT", "-p", "tcp", "--dport", "2222", "-j", "ACCEPT")
    ex(n.node, IP6T, "-t", "filter", "-A", "FORWARD", "-p", "udp", "--dport", "5353", "-j", "ACCEPT")
    if n.mode == "ebpf":  # another tool's tc program at the priority we would use
        ex(n.node, "tc", "qdisc", "add", "dev", "ext0", "clsact")
        ex(n.node, "tc", "filter", "add", "dev", "ext0", "ingress", "pref", "49152", "protocol", "ip", "u32", "match",
           "ip", "dst", "192.0.2.99/32", "flowid", "1:1")
        ex(n.node, "tc", "filter", "add", "dev", "ext0", "ingress", "pref", "49153", "bpf", "bytecode", "1,6 0 0 0,")
    if n.mode == "ipvs":  # another tool's virtual server (on a node address) and ipset
        ex(n.node, "ipvsadm", "-A", "-t", "10.10.0.1:2224", "-s", "wlc")
        ex(n.node, "ipvsadm", "-a", "-t", "10.10.0.1:2224", "-r", "10.244.1.10:8080", "-m")
        ex(n.node, "ipset", "create", "FOREIGN-SET", "hash:ip")
    if not in_uml():
        ex(n.node, "nft", "add table inet foreign; add chain inet foreign c { type filter hook input priority 5; }; "
           "add rule inet foreign c tcp dport 2223 accept")


def test_foreign_rules_untouched_and_cleanup_is_exact(mode: str) -> None:
    with fresh_node(mode, start=False) as n:
        _foreign_rules(n)
        before = _snapshot(n)
        n.start()
        ips = n.cluster_ip()
        n.apply("svc", [service("svc", ips[0], HTTP), slice_("svc-1", "svc", [endpoint("pod-a")], EP_HTTP)])
        assert n.probe(ips[0], 80, src="pod-b").startswith("pod-a")
        during = _snapshot(n)
        during_lines = set(during.splitlines())
        assert "FOREIGN-CHAIN" in before and ("dport 2223" in before or in_uml())
        for line in before.splitlines():
            assert line in during_lines, f"foreign rule changed while the agent ran: {line}"
        n.stop()
        # Stopping keeps the rules: traffic keeps flowing while the agent is down.
        assert n.probe(ips[0], 80, src="pod-b").startswith("pod-a")
        for _ in range(2):  # cleanup twice is fine
            subprocess.run(["ip", "netns", "exec", n.node, AGENT, "--cleanup", "--proxy-mode", mode],
                           check=True, capture_output=True)
        assert _snapshot(n) == before


def test_drift_is_repaired_by_periodic_full_sync(mode: str) -> None:
    with fresh_node(mode, ["--sync-period", "2s"]) as n:
        ips = n.cluster_ip()
        n.apply("drift", [service("drift", ips[0], HTTP), slice_("drift-1", "drift", [endpoint("pod-c")], EP_HTTP)])
        assert n.probe(ips[0], 80, src="pod-a").startswith("pod-c")
        if mode == "iptables":
            n.lab.exec(n.node, "iptables", "-t", "nat", "-F", "KPA-SERVICES")
        elif mode == "ebpf":  # someone deletes our service entry and our tc programs
            _delete_ebpf_service(n, ips[0], 80)
            n.lab.exec(n.node, "tc", "filter", "del", "dev", "ext0", "ingress")
            n.lab.exec(n.node, "tc", "filter", "del", "dev", "ext0", "egress")
        elif mode == "ipvs":  # someone deletes our virtual server and our address
            n.lab.exec(n.node, "ipvsadm", "-D", "-t", f"{ips[0]}:80")
            n.lab.exec(n.node, "ip", "addr", "del", f"{ips[0]}/32", "dev", "kpa-ipvs0")
        else:
            n.lab.exec(n.node, "nft", "flush table ip kube-proxy-agent")
        assert n.probe(ips[0], 80, src="pod-a", timeout=0.5) != "pod-c"
        assert wait_for(lambda: n.probe(ips[0], 80, src="pod-a", timeout=0.5).startswith("pod-c"), 10)
        if mode == "ipvs":
            # A real server's weight set to 0 by hand, and a stranger added to our virtual server:
            # ours back to weight 1, the stranger drained (weight 0, deleted once its connections end)
            n.lab.exec(n.node, "ipvsadm", "-e", "-t", f"{ips[0]}:80", "-r", "10.244.1.12:8080", "-m", "-w", "0")
            n.lab.exec(n.node, "ipvsadm", "-a", "-t", f"{ips[0]}:80", "-r", "10.244.1.11:8080", "-m", "-w", "5")
            assert n.probe(ips[0], 80, src="pod-a", timeout=0.5).startswith("pod-b")

            def repaired() -> bool:
                table = n.lab.exec(n.node, "ipvsadm", "-Ln", "-t", f"{ips[0]}:80")
                return (re.search(r"10\.244\.1\.12:8080\s+Masq\s+1\s", table) is not None
                        and re.search(r"10\.244\.1\.11:8080\s+Masq\s+0\s", table) is not None)
            assert wait_for(repaired, 10), n.lab.exec(n.node, "ipvsadm", "-Ln")
            assert who(n.answers(ips[0], 80, n=6, src="pod-a")) == {"pod-c"}
        if mode == "iptables":
            # A service's own chain emptied by hand is found (rule counts differ) and rewritten.
            save = n.lab.exec(n.node, "iptables-save", "-t", "nat")
            svc_chain = re.search(rf"-d {ips[0]}/32 .* -j (KPA-SVC-\w+)", save)
            assert svc_chain
            n.lab.exec(n.node, "iptables", "-t", "nat", "-F", svc_chain.group(1))
            assert n.probe(ips[0], 80, src="pod-a", timeout=0.5) != "pod-c"
            assert wait_for(lambda: n.probe(ips[0], 80, src="pod-a", timeout=0.5).startswith("pod-c"), 10)
            assert "rules drifted" in n.log.read_text()
            # A rule edited in place (same count: someone points our DNAT at another pod) is found
            # too, once a periodic check has seen the chain as written.
            fulls = n.metric("kubeproxy_sync_full_proxy_rules_duration_seconds_count")
            assert wait_for(lambda: n.metric("kubeproxy_sync_full_proxy_rules_duration_seconds_count") >= fulls + 2,
                            10)
            save = n.lab.exec(n.node, "iptables-save", "-t", "nat").splitlines()
            dnat = next(ln for ln in save if ln.startswith("-A KPA-SEP-") and "--to-destination 10.244.1.12:8080" in ln)
            chain = dnat.split()[1]
            index = [ln for ln in save if ln.startswith(f"-A {chain} ")].index(dnat) + 1
            spec = shlex.split(dnat.replace("10.244.1.12:8080", "10.244.1.11:8080"))[2:]
            n.lab.exec(n.node, "iptables", "-t", "nat", "-R", chain, str(index), *spec)
            assert n.probe(ips[0], 80, src="pod-a", timeout=0.5).startswith("pod-b")
            assert wait_for(lambda: n.probe(ips[0], 80, src="pod-a", timeout=0.5).startswith("pod-c"), 10)
        if mode == "nftables":
            # A service's own chain emptied by hand: the periodic check re-asserts every port of a
            # small table each time (a slice of a big one), without rewriting the table.
            vmap = n.lab.exec(n.node, "nft", "list", "map", "ip", "kube-proxy-agent", "service-ips")
            svc_chain = re.search(rf"{re.escape(ips[0])} \. tcp \. 80 .*: jump (\S+)", vmap)
            assert svc_chain, vmap
            n.lab.exec(n.node, "nft", "flush", "chain", "ip", "kube-proxy-agent", svc_chain.group(1))
            assert n.probe(ips[0], 80, src="pod-a", timeout=0.5) != "pod-c"
            assert wait_for(lambda: n.probe(ips[0], 80, src="pod-a", timeout=0.5).startswith("pod-c"), 10)
            assert "IPv4=check(reasserted=" in n.log.read_text()


def test_kernel_refusal_keeps_rules_counts_and_retries_full(mode: str) -> None:
    if mode != "iptables":
        return  # the nftables refusal path is the test below
    with fresh_node(mode, ["--sync-period", "60s"]) as n:
        ips, dns = n.cluster_ip(), n.cluster_ip()
        n.apply("ref", [service("ref", ips[0], HTTP),
                        slice_("ref-1", "ref", [endpoint("pod-a"), endpoint("pod-b")], EP_HTTP),
                        service("dns", dns[0], UDP53), slice_("dns-1", "dns", [endpoint("pod-a")], EP_UDP)])
        # a DNS-like client: one socket, so one conntrack entry, DNATed to pod-a
        assert n.probe(dns[0], 53, "udp", src="pod-r", src_port=40056).startswith("pod-a")
        # Someone else's rule jumps into one of our endpoint chains, so we cannot delete it.
        save = n.lab.exec(n.node, "iptables-save", "-t", "nat")
        sep = sorted(set(re.findall(r"KPA-SEP-\w+", save)))[0]
        n.lab.exec(n.node, "iptables", "-t", "nat", "-N", "FOREIGN")
        n.lab.exec(n.node, "iptables", "-t", "nat", "-A", "FOREIGN", "-j", sep)
        failures = n.metric("kubeproxy_sync_proxy_rules_iptables_restore_failures_total")
        (n.source / "ref.yaml").write_text((n.source / "ref.yaml").read_text().replace("10.244.1.11", "10.244.1.12")
                                           .replace("10.244.1.10", "10.244.1.12"))
        assert wait_for(lambda: n.metric("kubeproxy_sync_proxy_rules_iptables_restore_failures_total")
                        > failures, 10), n.log_tail()
        assert "offending line" in n.log.read_text()
        # The old rules are still there and still work.
        assert who(n.answers(ips[0], 80, n=10, src="pod-c")) <= {"pod-a", "pod-b"}
        # Once the obstacle goes, the retry (a full sync) succeeds.
        n.lab.exec(n.node, "iptables", "-t", "nat", "-F", "FOREIGN")
        assert wait_for(lambda: n.probe(ips[0], 80, src="pod-a", timeout=0.5).startswith("pod-c"), 10)
        n.lab.exec(n.node, "iptables", "-t", "nat", "-X", "FOREIGN")
        # The refused sync also moved dns from pod-a to pod-c: the conntrack cleanup that change
        # needs waited for the first sync that worked, so the same client socket moves on too.
        assert wait_for(lambda: n.probe(dns[0], 53, "udp", src="pod-r", src_port=40056, timeout=0.5)
                        .startswith("pod-c"), 10), n.log_tail()


def _nft_chains(n: Node) -> set[str]:
    out = n.lab.exec(n.node, "nft", "list", "chains", "ip")
    return set(re.findall(r"chain (\S+) \{", out.split("table ip kube-proxy-agent", 1)[1].split("table ", 1)[0]))


def test_nft_refusal_keeps_rules_counts_and_next_sync_is_full(mode: str) -> None:
    if mode != "nftables":
        return  # the iptables refusal path is the test above
    with fresh_node(mode, ["--sync-period", "60s"]) as n:
        a, b = n.cluster_ip(), n.cluster_ip()
        n.apply("a", [service("a", a[0], HTTP), slice_("a-1", "a", [endpoint("pod-a")], EP_HTTP)])
        before = _nft_chains(n)
        n.apply("b", [service("b", b[0], HTTP), slice_("b-1", "b", [endpoint("pod-b")], EP_HTTP)])
        b_chains = sorted(_nft_chains(n) - before)
        assert b_chains, "service b made no chain of its own"
        # Someone edits our table: a rule of theirs jumps into b's chain, so deleting that chain
        # (when b goes) is refused by the kernel (EBUSY) and the whole transaction with it.
        n.lab.exec(n.node, "nft", f"add chain ip kube-proxy-agent someone-else; "
                   f"add rule ip kube-proxy-agent someone-else jump {b_chains[0]}")
        failures = n.metric("kubeproxy_sync_proxy_rules_nftables_transaction_failures_total")
        stop, replies = threading.Event(), []

        def keep_asking() -> None:  # service a answers all along: a refused transaction changes nothing
            while not stop.is_set():
                replies.append(n.probe(a[0], 80, src="pod-c", timeout=1))
        t = threading.Thread(target=keep_asking)
        t.start()
        try:
            n.remove("b")  # returns after the next successful sync
        finally:
            stop.set()
            t.join()
        assert n.metric("kubeproxy_sync_proxy_rules_nftables_transaction_failures_total") == failures + 1
        log = n.log.read_text()
        failed = [ln for ln in log.splitlines() if "sync failed" in ln]
        assert failed and "offending statement: delete chain ip kube-proxy-agent" in failed[-1], n.log_tail()
        after = log.split(failed[-1], 1)[1]
        # the retry was a full sync: it owns the whole table, so the foreign chain is gone too
        assert "sync done mode=nftables full=True" in after, n.log_tail()
        assert who(replies) == {"pod-a"} and len(replies) > 0, replies
        chains = _nft_chains(n)
        assert "someone-else" not in chains and not set(b_chains) & chains, chains
        assert n.probe(b[0], 80, src="pod-c", timeout=0.5) != "pod-b"


def test_health_and_metrics_like_kube_proxy(mode: str) -> None:
    with fresh_node(mode) as n:
        code, body = n.http(10256, "/healthz")
        doc = json.loads(body)
        assert code == 200 and doc["lastUpdated"] and doc["currentTime"] and doc["nodeEligible"] is True
        assert n.http(10256, "/livez")[0] == 200
        metrics = n.metrics()
        for name in (
            "kubeproxy_sync_proxy_rules_duration_seconds_bucket",
            "kubeproxy_sync_full_proxy_rules_duration_seconds_bucket",
            "kubeproxy_sync_partial_proxy_rules_duration_seconds_bucket",
            "kubeproxy_network_programming_duration_seconds_bucket",
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
            "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
            "kubeproxy_sync_proxy_rules_endpoint_changes_total",
            "kubeproxy_sync_proxy_rules_service_changes_pending",
            "kubeproxy_sync_proxy_rules_service_changes_total",
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
        ):
            assert name in metrics, name
        assert 'le="0.001"' in metrics
        if mode == "iptables":
            assert 'kubeproxy_sync_proxy_rules_iptables_total{table="nat"}' in metrics
            assert "kubeproxy_sync_proxy_rules_iptables_restore_failures_total" in metrics
        if mode == "ipvs":
            assert "kubeproxyagent_ipvs_virtual_servers" in metrics
            assert "kubeproxy_sync_proxy_rules_iptables_restore_failures_total" in metrics
        # A change that carries the EndpointSlice trigger-time annotation is measured.
        ips = n.cluster_ip()
        es = slice_("npl-1", "npl", [endpoint("pod-a")], EP_HTTP)
        es["metadata"]["annotations"] = {"endpoints.kubernetes.io/last-change-trigger-time":
                                         time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        n.apply("npl", [service("npl", ips[0], HTTP), es])
        assert n.metric("kubeproxy_network_programming_duration_seconds_count") >= 1
        # Node being deleted: /healthz says 503, /livez stays 200.
        (n.source / "node.yaml").write_text(
            "kind: Node\napiVersion: v1\nmetadata: {name: node1, deletionTimestamp: '2026-01-01T00:00:00Z'}\n")
        assert wait_for(lambda: n.http(10256, "/healthz")[0] == 503, 10)
        assert n.http(10256, "/livez")[0] == 200


def test_restart_keeps_serving_and_catches_up(mode: str) -> None:
    with fresh_node(mode) as n:
        ips = n.cluster_ip()
        n.apply("rs", [service("rs", ips[0], HTTP), slice_("rs-1", "rs", [endpoint("pod-a")], EP_HTTP)])
        n.proc.kill()
        n.proc.wait()
        # Down: existing rules keep serving.
        assert n.probe(ips[0], 80, src="pod-b").startswith("pod-a")
        (n.source / "rs.yaml").write_text((n.source / "rs.yaml").read_text().replace("10.244.1.10", "10.244.1.12"))
        n.start()
        assert wait_for(lambda: n.probe(ips[0], 80, src="pod-b", timeout=0.5).startswith("pod-c"), 10)


def test_iptables_variant_follows_the_rules_already_on_the_node(mode: str) -> None:
    """Like kube-proxy's images: a node whose rules live in iptables-legacy gets legacy rules,
    so they are never split across the two backends."""
    if mode != "iptables":
        return
    with fresh_node(mode, start=False) as n:
        n.lab.exec(n.node, "iptables-legacy", "-A", "INPUT", "-p", "tcp", "--dport", "2222", "-j", "ACCEPT")
        n.start()
        ips = n.cluster_ip()
        n.apply("legacy", [service("legacy", ips[0], HTTP),
                           slice_("legacy-1", "legacy", [endpoint("pod-b")], EP_HTTP)])
        assert n.probe(ips[0], 80, src="pod-a").startswith("pod-b")
        assert "KPA-SERVICES" in n.lab.exec(n.node, "iptables-legacy-save", "-t", "nat")
        assert "KPA-" not in n.lab.exec(n.node, "iptables-nft-save")
        assert "variant=legacy" in n.log.read_text()


def test_periodic_check_reads_nothing_back_while_nf_tables_is_untouched(mode: str) -> None:
    """Issue 15 (idle CPU): a periodic check costs a ruleset read-back (iptables-save, or the
    nftables chain and set names plus a re-assert slice). While nobody has committed to nf_tables
    since our last write (its generation counter is unchanged) there is no drift to find, so the
    check reads nothing; a foreign commit makes the next one check for real."""
    if mode not in ("iptables", "nftables"):
        return  # ipvs and ebpf keep their state outside nf_tables
    with fresh_node(mode, ["--sync-period", "1s"]) as n:
        ips = n.cluster_ip()
        n.apply("quiet", [service("quiet", ips[0], HTTP), slice_("quiet-1", "quiet", [endpoint("pod-a")], EP_HTTP)])
        unchanged = "unchanged'"

        def syncs_since(mark: int, what: str) -> int:
            return sum(what in ln for ln in n.log.read_text().splitlines()[mark:] if "sync done" in ln)
        mark = len(n.log.read_text().splitlines())
        assert wait_for(lambda: syncs_since(mark, unchanged) >= 3, 15), n.log_tail()
        mark = len(n.log.read_text().splitlines())
        n.lab.exec(n.node, "nft", "add table ip someone-else")
        real = "check(" if mode == "nftables" else "checked("
        assert wait_for(lambda: syncs_since(mark, real) >= 1, 10), n.log_tail()
        assert n.probe(ips[0], 80, src="pod-b").startswith("pod-a")
        n.lab.exec(n.node, "nft", "delete table ip someone-else")


def test_legacy_periodic_check_reads_back_only_when_a_table_changed(mode: str) -> None:
    """Legacy iptables has no generation counter: a periodic check skips the read-back while no
    table changed its entry count or size since our last write (xtinfo), and a foreign rule added
    to a legacy table makes the next check read back for real; traffic still flows."""
    if mode != "iptables" or in_uml():
        return
    with fresh_node(mode, ["--sync-period", "1s"], start=False) as n:
        n.lab.exec(n.node, "iptables-legacy", "-A", "INPUT", "-p", "tcp", "--dport", "2222", "-j", "ACCEPT")
        n.start()
        ips = n.cluster_ip()
        n.apply("quiet", [service("quiet", ips[0], HTTP), slice_("quiet-1", "quiet", [endpoint("pod-a")], EP_HTTP)])
        assert "variant=legacy" in n.log.read_text()

        def syncs_since(mark: int, what: str) -> int:
            return sum(what in ln for ln in n.log.read_text().splitlines()[mark:] if "sync done" in ln)
        mark = len(n.log.read_text().splitlines())
        assert wait_for(lambda: syncs_since(mark, "unchanged'") >= 3, 15), n.log_tail()
        mark = len(n.log.read_text().splitlines())
        n.lab.exec(n.node, "iptables-legacy", "-A", "INPUT", "-p", "tcp", "--dport", "2223", "-j", "ACCEPT")
        assert wait_for(lambda: syncs_since(mark, "checked(") >= 1, 10), n.log_tail()
        assert n.probe(ips[0], 80, src="pod-b").startswith("pod-a")


def test_health_check_node_port_answers_through_a_host_firewall(mode: str) -> None:
    """Issue 14 item 3: a node whose INPUT policy drops unknown ports (loopback and established
    traffic allowed, as host firewalls do) still answers the load balancer's health checks, as with kube-proxy,
    which accepts every healthCheckNodePort in the filter table."""
    if mode != "iptables":
        return  # the iptables mode's filter rules; the other modes: issue 14
    with fresh_node(mode) as n:
        ips = n.cluster_ip()
        n.lab.exec(n.node, "iptables", "-A", "INPUT", "-i", "lo", "-j", "ACCEPT")
        n.lab.exec(n.node, "iptables", "-A", "INPUT", "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED",
                   "-j", "ACCEPT")
        n.lab.exec(n.node, "iptables", "-P", "INPUT", "DROP")
        ports = [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30091, "protocol": "TCP"}]
        n.apply("hc", [service("hc", ips[0], ports, type="LoadBalancer", externalTrafficPolicy="Local",
                               healthCheckNodePort=32091),
                       slice_("hc-1", "hc", [endpoint("pod-a")], EP_HTTP)])
        code, body = n.http(32091, "/", ip=NODE_EXT, ns=n.client)
        assert code == 200 and '"localEndpoints": 1' in body
        # the same firewall without our rule: the health check times out
        n.lab.exec(n.node, "iptables", "-F", "KPA-HEALTH-CHECKS")
        try:
            n.http(32091, "/", ip=NODE_EXT, ns=n.client, timeout=1)
            reached = True
        except OSError:
            reached = False
        assert not reached, "the firewall let the health check through without our rule: the test proves nothing"


def test_localhost_node_ports_and_their_guard(mode: str) -> None:
    """Issue 14 item 2 (iptables): NodePorts on 127.0.0.1 as kube-proxy serves them by default
    (route_localnet=1), with its CVE-2020-8558 guard: a neighbour that routes 127.0.0.0/8 to the
    node reaches nothing listening on the node's loopback. With --iptables-localhost-nodeports=false
    loopback is left alone: refused at once, never a black hole."""
    if mode != "iptables":
        return  # kube-proxy serves localhost NodePorts in its iptables mode only
    ports = [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30095, "protocol": "TCP"}]
    with fresh_node(mode) as n:
        ips = n.cluster_ip()
        n.apply("lh", [service("lh", ips[0], ports, type="NodePort"),
                       slice_("lh-1", "lh", [endpoint("pod-a")], EP_HTTP)])
        assert probe(n.node, "127.0.0.1", 30095, timeout=2) == f"pod-a {NODE_BR}"
        assert n.lab.exec(n.node, "sysctl", "-n", "net.ipv4.conf.all.route_localnet").strip() == "1"
        # a neighbour (the client) that routes 127.0.0.0/8 to the node, and a UDP service on the
        # node's loopback: route_localnet=1 alone would deliver the neighbour's datagrams to it
        n.lab.exec(n.client, "ip", "route", "del", "local", "127.0.0.1", "dev", "lo", "table", "local")
        n.lab.exec(n.client, "ip", "route", "del", "local", "127.0.0.0/8", "dev", "lo", "table", "local", check=False)
        n.lab.sysctl(n.client, "net.ipv4.conf.all.route_localnet=1", "net.ipv4.conf.eth0.route_localnet=1")
        n.lab.exec(n.client, "ip", "route", "add", "127.0.0.1/32", "via", NODE_EXT, "src", CLIENT)

        def neighbour_reaches_loopback() -> bool:
            listener = subprocess.Popen(
                ["ip", "netns", "exec", n.node, sys.executable, "-c",
                 "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
                 "s.bind(('127.0.0.1', 18099)); print('ready', flush=True); s.settimeout(2); "
                 "print(s.recvfrom(64)[0].decode(), flush=True)"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            assert listener.stdout is not None and listener.stdout.readline().strip() == "ready"
            n.lab.exec(n.client, sys.executable, "-c",
                       "import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM)"
                       ".sendto(b'probe', ('127.0.0.1', 18099))")
            out, _ = listener.communicate(timeout=10)
            return out.strip() == "probe"
        assert not neighbour_reaches_loopback()
        n.lab.exec(n.node, "iptables", "-F", "KPA-LOCALNET")
        assert neighbour_reaches_loopback(), "delivered without the guard, or the test proves nothing"
    with fresh_node(mode, ["--iptables-localhost-nodeports=false"]) as n:
        ips = n.cluster_ip()
        n.apply("lh", [service("lh", ips[0], ports, type="NodePort"),
                       slice_("lh-1", "lh", [endpoint("pod-a")], EP_HTTP)])
        assert probe(n.node, "127.0.0.1", 30095, timeout=2) == "REFUSED"
        assert probe(n.node, NODE_EXT, 30095, timeout=2) == f"pod-a {NODE_BR}"
