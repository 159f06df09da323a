"""Kubernetes Service behaviour end to end, per proxy mode, on a real API server with the real
EndpointSlice controller: every scenario says what Kubernetes promises and checks it with real
connections from a client pod or from the outside client.

Every "converge" records the network programming latency (API change accepted -> first connection
that shows it), printed in the terminal summary.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Callable
from datetime import datetime

import pytest

from tests.cluster.harness import CLIENT_IP, CLIENT_IP2, SimNode, answered, wait_until
from tests.cluster.kubeapi import JSON
from tests.cluster.procs import sh
from tests.e2e.support import Kit, cluster_ip, names, node_port, now
from tests.netlab import http_get, who

pytestmark = pytest.mark.e2e


def test_cluster_ip_reachable_and_spread_over_backends(k: Kit) -> None:
    n1, n2 = k.c.n1, k.c.n2
    pods = [k.pod("web-a", n1), k.pod("web-b", n1), k.pod("web-c", n2)]
    t0 = now()
    ip = cluster_ip(k.service("web", selector={"app": "web"}))
    for node in (n1, n2):
        k.until_answered_by(f"new Service answers from a pod on {node.name}", t0,
                            lambda node=node: k.from_pod(node, ip, 80, timeout=0.3), names(pods))
    for node in (n1, n2):
        replies = k.many(lambda node=node: k.from_pod(node, ip, 80), 30)
        assert who(replies) == names(pods), replies
        # from a pod, no SNAT: the backend sees the client pod's own address
        assert {r.split()[1] for r in replies} == {k.c.client_of(node).ip}, replies


def test_scale_up_and_down(k: Kit) -> None:
    n1, n2 = k.c.n1, k.c.n2
    first = k.pod("web-0", n1)
    ip = cluster_ip(k.service("web", selector={"app": "web"}))
    k.until_answered_by("one replica", now(), lambda: k.from_pod(n2, ip, 80, timeout=0.3), {"web-0"},
                        record=False)
    # scale up: two more replicas become Ready
    more = [k.pod("web-1", n2), k.pod("web-2", n1)]
    k.until_answered_by("scale 1 -> 3", more[0].changed_at, lambda: k.from_pod(n2, ip, 80, timeout=0.3),
                        names([first, *more]), new=names(more))
    # scale down: graceful deletion, as a ReplicaSet does; terminating endpoints get no new
    # connections while a ready one exists
    for p in more:
        k.h.delete_pod(p, grace=30)
    for node in (n1, n2):
        # A long streak: while only one of the two deletions is published, half the answers still
        # come from web-0, and a short streak would pass by chance.
        k.until_only(f"scale 3 -> 1 (terminating get no traffic), via {node.name}", more[-1].changed_at,
                     lambda node=node: k.from_pod(node, ip, 80, timeout=0.3), {"web-0"}, streak=40)
    assert k.spread(lambda: k.from_pod(n2, ip, 80), 20) == {"web-0"}
    for p in more:
        k.h.finalize_pod(p)
    assert k.spread(lambda: k.from_pod(n1, ip, 80), 10) == {"web-0"}


def test_selector_matching_nothing_is_rejected_then_works(k: Kit) -> None:
    n1, n2 = k.c.n1, k.c.n2
    t0 = now()
    ip = cluster_ip(k.service("late", selector={"app": "late"}))
    # programmed as "no endpoints": refused at once (ICMP port unreachable), never a blackhole
    for node in (n1, n2):
        k.first_is(f"Service without endpoints is rejected on {node.name}", t0,
                   lambda node=node: k.from_pod(node, ip, 80, timeout=0.3), "REFUSED")
    for node in (n1, n2):
        start = time.monotonic()
        assert k.from_pod(node, ip, 80, timeout=3) == "REFUSED"
        assert time.monotonic() - start < 1.0, "rejected, but not fast"
    p = k.pod("late-1", n2, {"app": "late"})
    for node in (n1, n2):
        k.until_answered_by(f"first matching pod, via {node.name}", p.changed_at,
                            lambda node=node: k.from_pod(node, ip, 80, timeout=0.3), {"late-1"})


def test_readiness_flapping_moves_traffic(k: Kit) -> None:
    n1, n2 = k.c.n1, k.c.n2
    a, b = k.pod("flap-a", n1), k.pod("flap-b", n2)
    ip = cluster_ip(k.service("flap", selector={"app": "web"}))
    k.until_answered_by("both ready", now(), lambda: k.from_pod(n1, ip, 80, timeout=0.3), {"flap-a", "flap-b"},
                        record=False)
    for round_ in range(2):
        k.h.set_ready(a, False)
        k.until_only(f"flap-a unready (round {round_ + 1})", a.changed_at,
                     lambda: k.from_pod(n2, ip, 80, timeout=0.3), {"flap-b"})
        k.h.set_ready(a, True)
        k.until_answered_by(f"flap-a ready again (round {round_ + 1})", a.changed_at,
                            lambda: k.from_pod(n2, ip, 80, timeout=0.3), {"flap-a"})
    k.h.set_ready(b, False)
    k.h.set_ready(a, False)
    k.first_is("no ready endpoint left: rejected", a.changed_at, lambda: k.from_pod(n1, ip, 80, timeout=0.3),
               "REFUSED")
    k.h.set_ready(b, True)
    k.until_only("flap-b back", b.changed_at, lambda: k.from_pod(n1, ip, 80, timeout=0.3), {"flap-b"})


def test_node_port_from_outside_via_every_node(k: Kit) -> None:
    n1, n2 = k.c.n1, k.c.n2
    pods = [k.pod("np-a", n1), k.pod("np-b", n2)]
    t0 = now()
    svc = k.service("np", selector={"app": "web"}, type="NodePort")
    port = node_port(svc)
    for node in (n1, n2):
        k.until_answered_by(f"NodePort via {node.name}", t0,
                            lambda node=node: k.from_outside(node.ip, port, timeout=0.3), names(pods))
    for node in (n1, n2):
        replies = k.many(lambda node=node: k.from_outside(node.ip, port), 24)
        assert who(replies) == names(pods), replies
        # externalTrafficPolicy Cluster: masqueraded, the backend sees this node, not the client
        assert {r.split()[1] for r in replies} <= {node.ip, node.gateway}, replies
    # and the ClusterIP of the same Service still works from pods
    assert k.spread(lambda: k.from_pod(n2, cluster_ip(svc), 80)) == names(pods)


def test_external_traffic_policy_local_keeps_client_ip(k: Kit) -> None:
    n1, n2 = k.c.n1, k.c.n2
    k.pod("local-a", n1)
    t0 = now()
    # LoadBalancer (no cloud here, so no ingress IP): the type that gets a healthCheckNodePort
    svc = k.service("local", selector={"app": "web"}, type="LoadBalancer", externalTrafficPolicy="Local")
    port, hc = node_port(svc), int(svc["spec"]["healthCheckNodePort"])
    k.first_is("ETP Local NodePort", t0, lambda: k.from_outside(n1.ip, port, timeout=0.3), f"local-a {CLIENT_IP}")
    # the client address is preserved, from either client address
    assert k.from_outside(n1.ip, port, src_ip=CLIENT_IP2) == f"local-a {CLIENT_IP2}"
    # (node2 has programmed the Service: its ClusterIP answers from pods there)
    k.first_is("ETP Local Service: ClusterIP via node2", t0, lambda: k.from_pod(n2, cluster_ip(svc), 80, timeout=0.3),
               f"local-a {k.c.client_of(n2).ip}")
    # a node without a local endpoint drops (it does not forward to another node)
    assert k.from_outside(n2.ip, port, timeout=1.0) == "TIMEOUT"
    # healthCheckNodePort tells load balancers which nodes to use
    code1, body1 = http_get(k.h.client, n1.ip, hc, "/healthz")
    code2, body2 = http_get(k.h.client, n2.ip, hc, "/healthz")
    assert code1 == 200 and json.loads(body1)["localEndpoints"] == 1, body1
    assert code2 == 503 and json.loads(body2)["localEndpoints"] == 0, body2
    # a local endpoint appears on node2: it starts answering there too
    p = k.pod("local-b", n2)
    k.first_is("ETP Local: new local endpoint on node2", p.changed_at,
               lambda: k.from_outside(n2.ip, port, timeout=0.3), f"local-b {CLIENT_IP}")
    assert who(k.many(lambda: k.from_outside(n2.ip, port), 10)) == {"local-b"}


def test_session_affinity_client_ip(k: Kit) -> None:
    n1, n2 = k.c.n1, k.c.n2
    pods = [k.pod("aff-a", n1), k.pod("aff-b", n1), k.pod("aff-c", n2)]
    t0 = now()
    svc = k.service("aff", selector={"app": "web"}, type="NodePort", sessionAffinity="ClientIP")
    ip, port = cluster_ip(svc), node_port(svc)
    for node in (n1, n2):
        k.first(f"affinity Service answers via {node.name}", t0,
                lambda node=node: k.from_pod(node, ip, 80, timeout=0.3), answered)
    for node in (n1, n2):
        seen = k.spread(lambda node=node: k.from_pod(node, ip, 80), 15)
        assert len(seen) == 1 and seen <= names(pods), seen
    for src in (CLIENT_IP, CLIENT_IP2):
        assert len(k.spread(lambda src=src: k.from_outside(n1.ip, port, src_ip=src), 10)) == 1


def test_named_target_port(k: Kit) -> None:
    n1, n2 = k.c.n1, k.c.n2
    # the same port name means 8080 in one pod and 9090 in another (the echo server tells which)
    k.pod("named-a", n1, ports=[("web", 8080, "TCP")])
    k.pod("named-b", n2, ports=[("web", 9090, "TCP")])
    t0 = now()
    ip = cluster_ip(k.service("named", [{"name": "http", "port": 80, "targetPort": "web"}], {"app": "web"}))
    k.until_answered_by("new Service with a named targetPort", t0, lambda: k.from_pod(n1, ip, 80, timeout=0.3),
                        {"named-a", "named-b:9090"})
    slices = k.h.endpoint_slices(k.ns, "named")
    assert sorted(s["ports"][0]["port"] for s in slices) == [8080, 9090]


def test_multi_port_service(k: Kit) -> None:
    n1, n2 = k.c.n1, k.c.n2
    ports = [("http", 8080, "TCP"), ("metrics", 9090, "TCP"), ("dns", 8080, "UDP")]
    pods = [k.pod("mp-a", n1, ports=ports), k.pod("mp-b", n2, ports=ports)]
    t0 = now()
    svc = k.service("mp", [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"},
                           {"name": "metrics", "port": 81, "targetPort": 9090, "protocol": "TCP"},
                           {"name": "dns", "port": 53, "targetPort": "dns", "protocol": "UDP"}],
                    {"app": "web"})
    ip = cluster_ip(svc)
    for node in (n1, n2):
        k.until_answered_by(f"multi-port: http via {node.name}", t0,
                            lambda node=node: k.from_pod(node, ip, 80, timeout=0.3), names(pods))
    assert k.spread(lambda: k.from_pod(n2, ip, 81)) == {f"{p.name}:9090" for p in pods}
    assert k.spread(lambda: k.from_pod(n2, ip, 53, "udp")) == names(pods)
    assert k.from_pod(n1, ip, 82, timeout=0.5) != "mp-a"  # no such Service port


def test_selectorless_service_with_handwritten_endpointslice(k: Kit) -> None:
    n1, n2 = k.c.n1, k.c.n2
    x, y = k.pod("ext-x", n1, labels={}), k.pod("ext-y", n2, labels={})
    ip = cluster_ip(k.service_without_selector("manual"))

    def slice_body(pods: list) -> dict:  # type: ignore[type-arg]
        return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": "manual-1", "namespace": k.ns,
                             "labels": {"kubernetes.io/service-name": "manual",
                                        "endpointslice.kubernetes.io/managed-by": "e2e.kube-proxy-agent"}},
                "addressType": "IPv4",
                "endpoints": [{"addresses": [p.ip], "conditions": {"ready": True}, "nodeName": p.node.name}
                              for p in pods],
                "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]}

    t0 = now()
    created = k.h.api.create(slice_body([x]))
    k.until_answered_by("hand-written EndpointSlice", t0, lambda: k.from_pod(n2, ip, 80, timeout=0.3), {"ext-x"})
    body = slice_body([x, y])
    body["metadata"]["resourceVersion"] = created["metadata"]["resourceVersion"]
    t1 = now()
    k.h.api.put(f"/apis/discovery.k8s.io/v1/namespaces/{k.ns}/endpointslices/manual-1", body)
    k.until_answered_by("EndpointSlice updated by hand", t1, lambda: k.from_pod(n1, ip, 80, timeout=0.3),
                        {"ext-x", "ext-y"}, new={"ext-y"})
    # the EndpointSlice controller leaves it alone (no selector): still ours, still two endpoints
    (only,) = k.h.endpoint_slices(k.ns, "manual")
    assert len(only["endpoints"]) == 2


def test_deleted_service_stops_answering(k: Kit) -> None:
    n1, n2 = k.c.n1, k.c.n2
    k.pod("gone-a", n2)
    svc = k.service("gone", selector={"app": "web"}, type="NodePort")
    ip, port = cluster_ip(svc), node_port(svc)
    for node in (n1, n2):
        k.until_answered_by("before deletion", now(), lambda node=node: k.from_pod(node, ip, 80, timeout=0.3),
                            {"gone-a"}, record=False)
        k.until_answered_by("before deletion", now(), lambda node=node: k.from_outside(node.ip, port, timeout=0.3),
                            {"gone-a"}, record=False)
    t0 = now()
    k.h.api.delete(k.h.service_path(k.ns, "gone"))
    for node in (n1, n2):
        k.until_not_answered(f"Service deleted: ClusterIP via {node.name}", t0,
                             lambda node=node: k.from_pod(node, ip, 80, timeout=0.3))
        k.until_not_answered(f"Service deleted: NodePort via {node.name}", t0,
                             lambda node=node: k.from_outside(node.ip, port, timeout=0.3))
    assert not answered(k.from_pod(n2, ip, 80, timeout=0.5))
    assert not answered(k.from_outside(n2.ip, port, timeout=0.5))


def test_terminating_endpoints_serve_only_when_nothing_is_ready(k: Kit) -> None:
    n1, n2 = k.c.n1, k.c.n2
    a, b = k.pod("term-a", n1), k.pod("term-b", n2)
    ip = cluster_ip(k.service("term", selector={"app": "web"}))
    k.until_answered_by("both ready", now(), lambda: k.from_pod(n1, ip, 80, timeout=0.3), {"term-a", "term-b"},
                        record=False)
    k.h.delete_pod(a, grace=60)
    k.until_only("terminating term-a gets no traffic", a.changed_at,
                 lambda: k.from_pod(n2, ip, 80, timeout=0.3), {"term-b"})
    slices = k.h.endpoint_slices(k.ns, "term")
    conds = {e["targetRef"]["name"]: e["conditions"] for s in slices for e in s["endpoints"]}
    assert conds["term-a"] == {"ready": False, "serving": True, "terminating": True}, conds
    # both terminating (still serving): kube-proxy keeps sending to them rather than failing
    k.h.delete_pod(b, grace=60)
    k.until_answered_by("only serving-terminating endpoints left: term-a used again", b.changed_at,
                        lambda: k.from_pod(n1, ip, 80, timeout=0.3), {"term-a", "term-b"}, new={"term-a"})
    t0 = now()
    k.h.finalize_pod(a)
    k.h.finalize_pod(b)
    k.first_is("all gone: rejected", t0, lambda: k.from_pod(n1, ip, 80, timeout=0.3), "REFUSED")


# -- failures: these two run last in a mode (they restart things) ----------------------------------

def test_agent_killed_and_restarted_keeps_serving_and_catches_up(k: Kit) -> None:
    n1, n2 = k.c.n1, k.c.n2
    a, b = k.pod("kill-a", n1), k.pod("kill-b", n2)
    ip = cluster_ip(k.service("kill", selector={"app": "web"}))
    for node in (n1, n2):
        k.until_answered_by("before the kill", now(), lambda node=node: k.from_pod(node, ip, 80, timeout=0.3),
                            names([a, b]), record=False)
    agent = n1.proxy
    assert agent is not None
    agent.kill()  # SIGKILL: no cleanup, no goodbye
    assert not agent.running()
    # the rules stay in the kernel while the agent is down
    assert k.spread(lambda: k.from_pod(n1, ip, 80), 20) == names([a, b])
    # changes while it is down: a new replica, one replica unready, a brand-new Service
    c = k.pod("kill-c", n1)
    k.h.set_ready(b, False)
    d = k.pod("fresh-d", n2, labels={"app": "fresh"})
    ip2 = cluster_ip(k.service("fresh", selector={"app": "fresh"}))
    # node2's agent shows the API state really changed...
    k.until_answered_by("node2 sees the new Service", now(), lambda: k.from_pod(n2, ip2, 80, timeout=0.3),
                        {"fresh-d"}, record=False)
    k.until_only("node2 sees the replica changes", now(), lambda: k.from_pod(n2, ip, 80, timeout=0.3),
                 names([a, c]))
    # ...which node1 has not programmed
    assert not answered(k.from_pod(n1, ip2, 80, timeout=0.5))
    assert "kill-c" not in k.spread(lambda: k.from_pod(n1, ip, 80), 12)
    t0 = now()
    k.h.start_proxy(n1, wait=False)
    k.until_answered_by("agent restarted (SIGKILLed while changes were made): first answer from the new Service",
                        t0, lambda: k.from_pod(n1, ip2, 80, timeout=0.3), names([d]))
    k.until_only("agent restarted: replicas caught up", t0, lambda: k.from_pod(n1, ip, 80, timeout=0.3),
                 names([a, c]), streak=16)
    assert k.spread(lambda: k.from_pod(n1, ip, 80), 20) == names([a, c])


def test_apiserver_restarted_mid_run(k: Kit) -> None:
    n1, n2 = k.c.n1, k.c.n2
    a = k.pod("api-a", n1)
    ip = cluster_ip(k.service("api", selector={"app": "web"}))
    for node in (n1, n2):
        k.until_answered_by("before the restart", now(), lambda node=node: k.from_pod(node, ip, 80, timeout=0.3),
                            {"api-a"}, record=False)
    starts = {node.name: node.proxy.starts for node in (n1, n2) if node.proxy is not None}
    # what the agents logged before this restart (other tests of the session may restart it too)
    logged = {node.name: len(node.proxy.log.read_text()) for node in (n1, n2) if node.proxy is not None}

    def while_down() -> None:
        # the API is gone: the agents keep running and the programmed rules keep serving
        for node in (n1, n2):
            assert node.proxy is not None and node.proxy.running()
            assert k.spread(lambda node=node: k.from_pod(node, ip, 80), 8) == {"api-a"}

    k.h.restart_apiserver(down=3, between=while_down)
    # 1. the agent's own path: a Service and a hand-written EndpointSlice made right after
    t0 = now()
    ip2 = cluster_ip(k.service_without_selector("api-manual"))
    k.h.api.create({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                    "metadata": {"name": "api-manual-1", "namespace": k.ns,
                                 "labels": {"kubernetes.io/service-name": "api-manual"}},
                    "addressType": "IPv4",
                    "endpoints": [{"addresses": [a.ip], "conditions": {"ready": True}, "nodeName": n1.name}],
                    "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]})
    for node in (n1, n2):
        k.until_answered_by(f"after an apiserver restart: new Service + EndpointSlice via {node.name}", t0,
                            lambda node=node: k.from_pod(node, ip2, 80, timeout=0.3), {"api-a"}, timeout=90)
    # 2. the whole path, EndpointSlice controller included
    b = k.pod("api-b", n2)
    svc = k.service("api-new", selector={"app": "web"}, type="NodePort")
    ip3, port = cluster_ip(svc), node_port(svc)
    for node in (n1, n2):
        k.until_answered_by(f"after an apiserver restart: new Service (selector) via {node.name}", b.changed_at,
                            lambda node=node: k.from_pod(node, ip3, 80, timeout=0.3), names([a, b]))
        k.until_answered_by(f"after an apiserver restart: new replica via {node.name}", b.changed_at,
                            lambda node=node: k.from_pod(node, ip, 80, timeout=0.3), names([a, b]), new={"api-b"})
    assert answered(k.from_outside(n1.ip, port))
    # and the agents are still the same processes (they rode it out, no restart)
    for node in (n1, n2):
        assert node.proxy is not None and node.proxy.running() and node.proxy.starts == starts[node.name]
    # Each agent noticed the outage and came back by one of two correct paths: a watch resumed from
    # an older resourceVersion got 410 Gone and relisted without flushing, or the apiserver answered
    # 403 / refused connections for a while (its authorizer not ready yet) and the watches then
    # resumed. Either way the rules kept serving and every change after it was programmed (above).
    for node in (n1, n2):
        assert node.proxy is not None
        log_text = node.proxy.log.read_text()[logged[node.name]:]
        assert ("watch expired (410 Gone); relisting without flushing rules" in log_text
                or "API call failed" in log_text), f"{node.name} never noticed the apiserver restart"
        # an outage is one streak: one warning for its first failed call (of any kind), one line
        # once every kind answers again (a kind whose retry is backing off may take a while); the
        # retries in between are counted, not logged
        streaks = log_text.count("msg=API call failed kind=")
        assert streaks <= 1, log_text[-3000:]
        wait_until(lambda node=node, streaks=streaks: node.proxy.log.read_text()[logged[node.name]:]
                   .count("msg=API calls succeed again") == streaks, 60, what=f"{node.name}: the streak's end logged")


def _agent_events(k: Kit, node: SimNode) -> list[JSON]:
    items = k.h.api.get("/apis/events.k8s.io/v1/namespaces/default/events").get("items", [])
    return [e for e in items if e.get("reportingController") == "kube-proxy-agent"
            and e.get("regarding", {}).get("kind") == "Node" and e["regarding"].get("name") == node.name]


def _since(e: JSON, t: float) -> bool:
    return datetime.fromisoformat(e["eventTime"]).timestamp() >= t


def _has_event(k: Kit, node: SimNode, type_: str, reason: str, after: float = 0.0) -> bool:
    return any(e.get("type") == type_ and e.get("reason") == reason and _since(e, after)
               for e in _agent_events(k, node))


def _obstruct(node: SimNode, pod_ip: str, cluster_ip: str) -> Callable[[], None]:
    """Someone else's rule jumps into the agent's chain for `pod_ip`'s Service, so deleting that
    chain is refused by the kernel. Returns how to take the obstacle away."""
    def run(*argv: str) -> str:
        return sh("ip", "netns", "exec", node.netns, *argv)
    if node.mode == "nftables":
        # the service's chain, from its cluster IP's element (its endpoints are in an endpoint map)
        vmap = run("nft", "list", "map", "ip", "kube-proxy-agent", "service-ips")
        m = re.search(rf"{re.escape(cluster_ip)} \. tcp \. 80 .*?: jump ([\w-]+)", vmap)
        assert m, vmap
        chain = m.group(1).rstrip(",")
        run("nft", f"add chain ip kube-proxy-agent someone-else; add rule ip kube-proxy-agent someone-else "
            f"jump {chain}")
        # the agent owns its table: the full sync after the refusal removes the stranger itself
        return lambda: None
    if node.mode == "ebpf":
        # someone swaps the node's clsact qdisc (our tc programs with it) for a plain ingress qdisc:
        # the next full sync cannot attach the egress program again, and is refused
        run("tc", "qdisc", "del", "dev", "eth0", "clsact")
        run("tc", "qdisc", "add", "dev", "eth0", "ingress")
        return lambda: run("tc", "qdisc", "del", "dev", "eth0", "ingress")
    save = run("iptables-save", "-t", "nat")
    sep = next(ln.split()[1] for ln in save.splitlines() if ln.startswith("-A ") and f"{pod_ip}:" in ln)
    run("iptables", "-t", "nat", "-N", "SOMEONE-ELSE")
    run("iptables", "-t", "nat", "-A", "SOMEONE-ELSE", "-j", sep)

    def remove() -> None:
        run("iptables", "-t", "nat", "-F", "SOMEONE-ELSE")
        run("iptables", "-t", "nat", "-X", "SOMEONE-ELSE")
    return remove


def test_agent_posts_events_about_its_node(k: Kit) -> None:
    n1, n2 = k.c.n1, k.c.n2
    # like kube-proxy: an Event about the Node when the agent starts (posted with the agent's own
    # ServiceAccount, so the shipped ClusterRole's create on events is what makes it work)
    for node in (n1, n2):
        wait_until(lambda node=node: _has_event(k, node, "Normal", "Starting"), 30,
                   what=f"a Starting event about {node.name}")
        # what the README's `kubectl get events -n default --field-selector involvedObject.name=NODE` asks
        core = k.h.api.get("/api/v1/namespaces/default/events", fieldSelector=f"involvedObject.name={node.name}")
        assert any(e["reason"] == "Starting" and e["involvedObject"]["kind"] == "Node"
                   and e.get("reportingComponent") == "kube-proxy-agent" for e in core["items"]), core
    since = time.time()
    p = k.pod("ev-a", n1)
    ip = cluster_ip(k.service("ev", selector={"app": "web"}))
    k.until_answered_by("events: Service answers", now(), lambda: k.from_pod(n1, ip, 80, timeout=0.3), {"ev-a"},
                        record=False)
    unblock = _obstruct(n1, p.ip, ip)
    try:
        k.h.api.delete(k.h.service_path(k.ns, "ev"))
        wait_until(lambda: _has_event(k, n1, "Warning", "SyncFailed", since), 30,
                   what="a SyncFailed warning about the refused sync")
    finally:
        unblock()
    wait_until(lambda: _has_event(k, n1, "Normal", "SyncRecovered", since), 30,
               what="a SyncRecovered event once the rules are written again")
    failed = [e for e in _agent_events(k, n1) if e["reason"] == "SyncFailed" and _since(e, since)]
    assert len(failed) == 1, failed  # one warning per failure streak, not one per retry
    assert "previous rules stay" in failed[0]["note"], failed[0]
    assert not _has_event(k, n2, "Warning", "SyncFailed", since)
    k.until_not_answered("events: deleted Service stops answering", now(), lambda: k.from_pod(n1, ip, 80, timeout=0.3))


def test_service_cidrs_from_the_api_close_unallocated_addresses(k: Kit) -> None:
    """Issue 14 items 4 and 5 (nftables, as kube-proxy's nftables mode): the agent reads the
    ServiceCIDR objects the API server serves (its default one from --service-cluster-ip-range, and
    any added), and its table drops traffic to addresses of them that no Service holds; a cluster
    IP on a port its Service lacks is refused at once. Other modes: the ServiceCIDR watch works
    (the agent lists them), nothing else changes."""
    n1 = k.c.n1
    p = k.pod("web-a", n1)
    ip = cluster_ip(k.service("web", selector={"app": "web"}))
    k.until_answered_by("Service answers", now(), lambda: k.from_pod(n1, ip, 80, timeout=0.3), {p.name},
                        record=False)
    if n1.mode != "nftables":
        return

    def check_chain(node: SimNode) -> str:
        return sh("ip", "netns", "exec", node.netns, "nft", "list", "chain", "ip", "kube-proxy-agent",
                  "cluster-ips-check")
    for node in (k.c.n1, k.c.n2):
        assert "ip daddr 10.96.0.0/16 drop" in check_chain(node), check_chain(node)
        start = time.monotonic()
        assert k.from_pod(node, ip, 81, timeout=3) == "REFUSED"
        assert time.monotonic() - start < 1.0
    extra = f"e2e-{k.ns}"
    k.h.api.create({"apiVersion": "networking.k8s.io/v1", "kind": "ServiceCIDR", "metadata": {"name": extra},
                    "spec": {"cidrs": ["10.97.0.0/16"]}})
    try:
        wait_until(lambda: "10.97.0.0/16" in check_chain(n1) or "10.96.0.0/15" in check_chain(n1), 30, 0.2,
                   "the new ServiceCIDR in the node's table")
    finally:
        k.h.api.delete(f"/apis/networking.k8s.io/v1/servicecidrs/{extra}")
    wait_until(lambda: "10.96.0.0/15" not in check_chain(n1) and "10.97.0.0/16" not in check_chain(n1), 60, 0.2,
               "the deleted ServiceCIDR gone from the node's table")


def test_explain_and_status_on_the_real_control_plane(k: Kit) -> None:
    """Issue 13: `kube-proxy-agent explain` asks the agent running on the node (no API calls): a
    Service whose selector matches nothing is named as such (the EndpointSlice controller writes an
    empty slice); once a pod matches, the Service is ok, its programmed state is read from the
    kernel and --probe connects; `status` sums the node up."""
    from tests.cluster.harness import agent_binary

    n1 = k.c.n1

    def ask(*args: str) -> tuple[int, JSON]:
        argv = ["ip", "netns", "exec", n1.netns, agent_binary(), *args, "-o", "json"]
        if n1.sockets is not None:  # the eBPF mode's socket hooks act on the node's cgroup
            argv = ["sh", "-c", f"echo $$ > {n1.sockets.cgroup}/cgroup.procs; exec " + " ".join(argv)]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        assert proc.returncode in (0, 1), proc.stderr
        return proc.returncode, json.loads(proc.stdout)

    ip = cluster_ip(k.service("web", selector={"app": "web"}))
    wait_until(lambda: ask("explain", f"{k.ns}/web")[0] == 1, 30, 0.5, "the new Service explained")
    rc, data = ask("explain", f"{k.ns}/web")
    assert "no endpoints" in data["verdict"], data
    p = k.pod("web-a", n1)
    k.until_answered_by("first pod", p.changed_at, lambda: k.from_pod(n1, ip, 80, timeout=0.3), {p.name},
                        record=False)
    rc, data = ask("explain", f"{k.ns}/web", "--probe")
    assert rc == 0 and data["ok"], data
    titles = [s["title"] for s in data["steps"]]
    assert any(t.startswith(f"what this node programmed ({n1.mode} mode") for t in titles), titles
    assert any("connected" in line for s in data["steps"] for line in s["lines"]), data
    rc, status = ask("status")
    assert rc == 0 and status["mode"] == n1.mode and status["ready"] and status["counts"]["services"] >= 1
    assert "watching" in status["source"]["Service"]["state"], status["source"]
    assert "ServiceCIDR" in status["source"], status["source"]
