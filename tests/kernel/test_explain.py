"""`kube-proxy-agent explain` and `status` against the running agent, in every mode: for each broken
case the first problem named is its cause; a healthy Service shows what is programmed and
`--probe` reaches a backend."""

from __future__ import annotations

import json
import os
import subprocess
from typing import Any

from agent.backends.ebpf import layout as L
from agent.model.frontends import FrontendKey
from tests.kernel.conftest import AGENT, Node, endpoint, service, slice_
from tests.kernel.test_behaviour import EP_HTTP, HTTP
from tests.netlab import HOOKED, wait_for


def ask(node: Node, *args: str) -> tuple[int, Any]:
    """Run the CLI inside the node (where the agent's metrics address is), JSON out; in the eBPF
    mode inside the node's cgroup too, where the socket hooks act (a real node hooks the root)."""
    hooked = HOOKED.get(node.node)
    enter = f"echo $$ > {hooked.cgroup}/cgroup.procs; " if hooked is not None else ""
    argv = " ".join(["exec ip netns exec", node.node, AGENT, *args, "-o", "json"])
    proc = subprocess.run(["sh", "-c", enter + argv], capture_output=True, text=True, timeout=120)
    assert proc.returncode in (0, 1), proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def delete_map_entry(node: Node, name: str, key: bytes) -> None:
    import ctypes

    from bcc import libbcc

    bpffs = node.extra_args[node.extra_args.index("--ebpf-bpffs-root") + 1]
    fd = libbcc.lib.bpf_obj_get(f"{bpffs}/kube-proxy-agent/v{L.LAYOUT}/{name}".encode())
    assert fd >= 0, "pinned map not found"
    try:
        buf = ctypes.create_string_buffer(key, len(key))
        assert libbcc.lib.bpf_delete_elem(fd, buf) == 0
    finally:
        os.close(fd)


def broken(data: dict[str, Any]) -> dict[str, Any] | None:
    return next((s for s in data["steps"] if not s["ok"]), None)


def test_explain_names_the_first_broken_link(node: Node) -> None:
    ips = [node.cluster_ip()[0] for _ in range(6)]  # IPv4 only: the slices are
    np_local = [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30191, "protocol": "TCP"}]
    node.apply("explain", [
        service("ex-ok", ips[0], HTTP), slice_("ex-ok-1", "ex-ok", [endpoint("pod-a")], EP_HTTP),
        service("ex-noslice", ips[1], HTTP),
        service("ex-unready", ips[2], HTTP),
        slice_("ex-unready-1", "ex-unready", [endpoint("pod-a", ready=False), endpoint("pod-b", ready=False)], EP_HTTP),
        service("ex-port", ips[3], HTTP),
        slice_("ex-port-1", "ex-port", [endpoint("pod-a")], [{"name": "web", "port": 8080, "protocol": "TCP"}]),
        service("ex-local", ips[4], np_local, type="NodePort", externalTrafficPolicy="Local"),
        slice_("ex-local-1", "ex-local", [endpoint("pod-r")], EP_HTTP),
        service("ex-headless", "None", HTTP),
    ])
    try:
        rc, ok = ask(node, "explain", "default/ex-ok", "--probe")
        assert rc == 0 and ok["ok"], ok
        programmed = ok["steps"][2]
        assert programmed["title"].startswith(f"what this node programmed ({node.mode} mode")
        assert programmed["lines"], programmed
        if node.mode == "ebpf":  # read back from the pinned maps, backends decoded
            assert any("backend(s): " + "10.244.1.10:8080" in line for line in programmed["lines"]), programmed
        probe = next(s for s in ok["steps"] if s["title"].startswith("a real connection"))
        assert any("connected" in line for line in probe["lines"]), probe

        expect = {
            "ex-noslice": "no EndpointSlice is labelled kubernetes.io/service-name=ex-noslice",
            "ex-unready": "none ready or serving",
            "ex-port": "no slice has a port named 'http'",
            "ex-local": "externalTrafficPolicy Local and no endpoint on this node",
            "ex-headless": "not proxied by design: headless",
            "ex-missing": "no such Service",
        }
        for name, cause in expect.items():
            rc, data = ask(node, "explain", f"default/{name}")
            step = broken(data)
            assert rc == 1 and step is not None and cause in step["problem"], (name, data)
            assert step["fix"], (name, step)
    finally:
        node.remove("explain")


def test_explain_finds_drift_and_status_sums_up(node: Node) -> None:
    """A service chain emptied by hand (or its virtual server deleted) is drift, named in step 3
    with when the periodic sync repairs it. `status` shows the mode, counts and health."""
    ip = node.cluster_ip()
    node.apply("drift", [service("ex-drift", ip[0], HTTP),
                         slice_("ex-drift-1", "ex-drift", [endpoint("pod-a"), endpoint("pod-b")], EP_HTTP)])
    try:
        rc, data = ask(node, "explain", "default/ex-drift")
        assert rc == 0, data
        healthy = data

        def drift() -> None:
            if node.mode == "iptables":
                chain = next(line.split()[1].rstrip(":") for line in healthy["steps"][2]["lines"]
                             if line.startswith("nat KPA-SVC-"))
                node.lab.exec(node.node, "iptables", "-t", "nat", "-F", chain)
            elif node.mode == "nftables":
                chain = next(line.split()[1].rstrip(":") for line in healthy["steps"][2]["lines"]
                             if line.startswith("chain svc-"))
                node.lab.exec(node.node, "nft", "flush", "chain", "ip", "kube-proxy-agent", chain)
            elif node.mode == "ipvs":
                node.lab.exec(node.node, "ipvsadm", "-D", "-t", f"{ip[0]}:80")
            else:  # the sockets scope's master entry deleted from the pinned map, as bpftool map delete would
                delete_map_entry(node, "svcs", L.svc_key(FrontendKey(ip[0], 80, "TCP"), L.SCOPE_SOCKETS, 0))

        # the periodic sync (every 20 s) may repair the drift before explain asks (a UML guest takes
        # seconds to start the CLI): then make it again
        for _ in range(4):
            drift()
            rc, data = ask(node, "explain", "default/ex-drift")
            if rc == 1:
                break
        step = broken(data)
        assert rc == 1 and step is not None and "drift" in step["problem"], data
        assert "periodic sync" in step["fix"]
        rc, status = ask(node, "status")
        assert status["mode"] == node.mode and status["health"]["healthy"] is True and status["features"]
        assert status["counts"]["servicePorts"] >= 1 and status["syncs"] >= 1
        assert wait_for(lambda: ask(node, "explain", "default/ex-drift")[0] == 0, 40), "never repaired"
    finally:
        node.remove("drift")


def test_explain_history_counts_udp_flows_cleaned(node: Node) -> None:
    """Step 5: when a UDP endpoint goes, the stale flows to it are handed to the mode's cleanup
    (conntrack, or socket destroy in the eBPF mode), counted per Service."""
    ip = node.cluster_ip()[0]
    dns = [{"name": "dns", "port": 53, "protocol": "UDP"}]
    ep_dns = [{"name": "dns", "port": 8080, "protocol": "UDP"}]
    node.apply("udp", [service("ex-udp", ip, dns), slice_("ex-udp-1", "ex-udp", [endpoint("pod-a"), endpoint("pod-b")],
                                                          ep_dns)])
    try:
        node.apply("udp", [service("ex-udp", ip, dns), slice_("ex-udp-1", "ex-udp", [endpoint("pod-a")], ep_dns)])
        _, data = ask(node, "explain", "default/ex-udp", "--all")
        history = data["steps"][-1]
        assert history["title"] == "recent history", data
        assert any("UDP conntrack cleanup: " in line for line in history["lines"]), history
    finally:
        node.remove("udp")
