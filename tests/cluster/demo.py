"""`make demo`: kube-proxy-agent on a real control plane, two simulated nodes, three pods, a Service.

    PROXY_MODE=iptables|nftables .venv/bin/python -m tests.cluster.demo

Needs root. Builds (first time, ~6 min) or reuses kube-apiserver/kube-controller-manager/etcd, then
tears everything down at the end (also on Ctrl-C or an error).
"""

from __future__ import annotations

import os
import sys
import time

from tests.cluster.controlplane import ControlPlaneUnavailable, find_bins
from tests.cluster.harness import CLIENT_IP, Harness, ask, first_success

MODE = os.environ.get("PROXY_MODE", "iptables")


def step(msg: str) -> None:
    print(f"\n==> {msg}", flush=True)


def say(msg: str) -> None:
    print(f"    {msg}", flush=True)


def main() -> int:
    t_start = time.monotonic()
    if os.geteuid() != 0:
        print("make demo needs root: it creates network namespaces and programs iptables/nftables in them",
              file=sys.stderr)
        return 2
    from agent.backends.registry import make_backend

    try:
        make_backend(MODE).check_supported()
    except Exception as exc:
        print(f"PROXY_MODE={MODE} cannot run here: {exc}", file=sys.stderr)
        return 2

    step("control plane binaries (built once from the Go module proxy, then cached)")
    try:
        bins = find_bins()
    except ControlPlaneUnavailable as exc:
        print(str(exc), file=sys.stderr)
        return 1
    say(str(bins))

    step("starting etcd, kube-apiserver (RBAC, service CIDR 10.96.0.0/16) and kube-controller-manager "
         "(EndpointSlice controllers only)")
    with Harness(log=say, bins=bins) as h:
        assert h.cp is not None
        say(f"the agent runs as ServiceAccount kube-proxy-agent/kube-proxy-agent with the ClusterRole from "
            f"manifests/ (kubeconfig {h.cp.kubeconfigs['agent']})")

        step(f"two simulated nodes (network namespaces), each running kube-proxy-agent --proxy-mode {MODE}")
        n1 = h.add_node("node1", 1, "agent", MODE)
        n2 = h.add_node("node2", 2, "agent", MODE, peers=[n1])
        for n in (n1, n2):
            say(f"{n.name}: InternalIP {n.ip}, podCIDR {n.pod_cidr}, zone {n.zone}")

        step("three pods of a Deployment-like app=web (the harness plays kubelet: namespace, veth, "
             "echo server, status patched Ready)")
        ns = h.namespace("demo")
        client = h.create_pod(ns, "client", n1, {"role": "client"}, ports=[], serve=False)
        pods = [h.create_pod(ns, name, node, {"app": "web"})
                for name, node in (("web-7d4b9-abcde", n1), ("web-7d4b9-fghij", n1), ("web-7d4b9-klmno", n2))]
        for p in pods:
            say(f"pod {p.name} on {p.node.name}, IP {p.ip}, answers '<pod name> <client address it saw>'")

        step("Service web: ClusterIP port 80 -> targetPort 8080, type NodePort")
        t0 = time.monotonic()
        svc = h.create_service(ns, "web", [{"name": "http", "port": 80, "targetPort": 8080}], {"app": "web"},
                               type="NodePort")
        ip, port = svc["spec"]["clusterIP"], svc["spec"]["ports"][0]["nodePort"]
        say(f"allocated by the API server: ClusterIP {ip}, NodePort {port}")
        t_first, _reply = first_success(lambda: ask(client.netns, ip, 80, timeout=0.5),
                                       lambda r: r.startswith("web-"), 30, what="the Service to answer")
        say(f"first answer {(t_first - t0) * 1000:.0f} ms after the Service was created "
            "(EndpointSlice controller + agent sync + kernel)")
        for sl in h.endpoint_slices(ns, "web"):
            for e in sl["endpoints"]:
                say(f"EndpointSlice {sl['metadata']['name']}: {e['addresses'][0]} ({e['targetRef']['name']}) "
                    f"ready={e['conditions']['ready']} node={e['nodeName']}")

        step(f"connecting to {ip}:80 from pod client (on {n1.name})")
        for i in range(6):
            r = ask(client.netns, ip, 80)
            say(f"connection {i + 1}: answered by {r.split()[0]}, which saw {r.split()[1]}" if " " in r else r)

        step(f"from outside the cluster ({CLIENT_IP}) to NodePort {port} on each node")
        for n in (n1, n2):
            for i in range(3):
                r = ask(h.client, n.ip, port)
                say(f"{n.ip}:{port} #{i + 1}: answered by {r.split()[0]}, which saw {r.split()[1]} "
                    "(masqueraded: externalTrafficPolicy Cluster)" if " " in r else f"{n.ip}:{port}: {r}")

        step(f"one pod goes unready ({pods[0].name}): traffic moves away")
        h.set_ready(pods[0], False)
        t_first, _ = first_success(lambda: "ok" if all(ask(client.netns, ip, 80).split()[0] != pods[0].name
                                                       for _ in range(8)) else "no", lambda r: r == "ok", 30)
        say(f"no more connections to {pods[0].name} {(t_first - pods[0].changed_at) * 1000:.0f} ms after the "
            "status change")
        say("answers now: " + ", ".join(sorted({ask(client.netns, ip, 80).split()[0] for _ in range(12)})))

        if MODE == "nftables":
            step(f"rules programmed on {n1.name}: nft list table ip kube-proxy-agent")
            out = h.lab.exec(n1.netns, "nft", "list", "table", "ip", "kube-proxy-agent", check=False)
        else:
            step(f"rules programmed on {n1.name}: iptables-save | grep KPA")
            out = "\n".join(line for line in n1.rules().splitlines() if "KPA" in line)
        print(out.rstrip(), flush=True)

        step(f"the agent's metrics on {n1.name} (kubeproxy_* lines; histogram buckets and _created left out)")
        for line in n1.metrics().splitlines():
            if line.startswith("kubeproxy") and "_bucket{" not in line and "_created" not in line:
                print(f"    {line}")

        step("Events the agents posted about their Nodes (kubectl get events -n default "
             "--field-selector involvedObject.name=NODE)")
        for n in (n1, n2):
            items = h.api.get("/api/v1/namespaces/default/events",
                              fieldSelector=f"involvedObject.name={n.name}").get("items", [])
            for e in items:
                say(f"{n.name}: {e.get('type')} {e.get('reason')}: {e.get('message') or e.get('note', '')}")
            if not items:
                say(f"{n.name}: none yet (they are posted off the sync path)")

        step("tearing down (agents, control plane, namespaces, veths)")
    print(f"\ndemo finished in {time.monotonic() - t_start:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except KeyboardInterrupt:
        print("interrupted; everything was torn down", file=sys.stderr)
        raise SystemExit(130) from None
