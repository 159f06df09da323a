"""The IPVS mode on the real control plane: two nodes that are user-mode-linux guests (this machine's
kernel has no IPVS; theirs has), one running kube-proxy-agent --proxy-mode ipvs, the other upstream
kube-proxy --proxy-mode ipvs, both watching the harness's apiserver over a tap device. The same
Services, the same pods (on both nodes), the same connections from each node; the results must be
equal, or the difference documented. The table is printed in the e2e summary."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.cluster.harness import CLIENT_IP, Harness, Pod
from tests.e2e.conftest import REPORTS
from tests.netlab import probe, who
from tests.uml import why_no_uml

pytestmark = pytest.mark.e2e
NS = "ipvs-uml"
HTTP = [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]
DOCUMENTED: dict[str, str] = {}


@dataclass
class Pair:
    h: Harness
    kpa: Any  # UmlNode with the agent
    kp: Any  # UmlNode with kube-proxy
    pods: dict[str, Pod]
    clients: dict[str, Pod]  # node name -> its client pod


@pytest.fixture(scope="module")
def pair(harness: Harness, request: pytest.FixtureRequest) -> Iterator[Pair]:
    chosen = list(request.config.getoption("--e2e-mode", default=[]) or [])
    if chosen and "ipvs" not in chosen:
        pytest.skip(f"--e2e-mode {','.join(chosen)} given")
    why = why_no_uml()
    if why:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI=true: no UML guest for the IPVS e2e nodes: {why}", pytrace=False)
        pytest.skip(f"no UML guest for the IPVS e2e nodes: {why}")
    from tests.cluster.umlnode import start_uml_node

    kpa = start_uml_node(harness, "uvs-kpa", 7, "agent", "ipvs")
    kp = None
    try:
        kp = start_uml_node(harness, "uvs-kp", 8, "kube-proxy", "ipvs", peers=[kpa])
        kpa.exec("ip", "route", "add", kp.sim.pod_cidr, "via", kp.sim.ip)
        harness.namespace(NS)
        pods = {}
        for n, tag in ((kpa, "kpa"), (kp, "kp")):
            pods[f"s-{tag}"] = n.create_pod(NS, f"s-{tag}", {"app": "s"})
            pods[f"l-{tag}"] = n.create_pod(NS, f"l-{tag}", {"app": f"l-{tag}"})
            pods[f"u-{tag}"] = n.create_pod(NS, f"u-{tag}", {"app": "u"}, ports=(("dns", 8080, "UDP"),))
        clients = {n.name: n.create_pod(NS, f"client-{n.name}", {"role": "client"}, ports=()) for n in (kpa, kp)}
        yield Pair(harness, kpa, kp, pods, clients)
    finally:
        harness.cleanup_namespace(NS)
        if kp is not None:
            kp.close()
        kpa.close()


def _tag(pair: Pair, node: Any) -> str:
    return "kpa" if node is pair.kpa else "kp"


def _norm(pair: Pair, node: Any, replies: list[str]) -> str:
    """Who answered and which client address they saw, in node-independent words."""
    me = _tag(pair, node)
    names = {pair.kpa.sim.ip: "node", pair.kp.sim.ip: "node", pair.kpa.sim.gateway: "node-br0",
             pair.kp.sim.gateway: "node-br0", CLIENT_IP: "client"}
    names.update({c.ip: "client-pod" for c in pair.clients.values()})
    names.update({p.ip: "itself" for p in pair.pods.values()})
    out = set()
    for r in replies:
        parts = r.split()
        if len(parts) != 2:
            out.add(r)
            continue
        server, peer = parts
        base, _, where = server.rpartition("-")
        if where in ("kpa", "kp"):
            server = f"{base}@{'local' if where == me else 'remote'}"
        out.add(f"{server} <- {names.get(peer, peer)}")
    return ", ".join(sorted(out))


def _svc(pair: Pair, name: str, app: str, ports: list[dict[str, Any]] | None = None, **spec: Any) -> dict[str, Any]:
    svc = pair.h.create_service(NS, name, ports or HTTP, {"app": app}, **spec)
    time.sleep(0.5)
    return svc


def _until(fn: Callable[[], str], ok: Callable[[str], bool], timeout: float = 20) -> str:
    end = time.monotonic() + timeout
    while True:
        r = fn()
        if ok(r) or time.monotonic() > end:
            return r
        time.sleep(0.2)


def _steady(fn: Callable[[], str], ok: Callable[[str], bool], times: int = 15, timeout: float = 90) -> None:
    """Wait until `times` answers in a row are good: one good answer is not a baseline (kube-proxy in
    the guest can still be adding real servers, and a first answer may come from a backend already
    there while the next connection lands on one not yet reachable: one TIMEOUT of the baseline phase
    in a CI run)."""
    end, streak, last = time.monotonic() + timeout, 0, ""
    while streak < times:
        if time.monotonic() > end:
            raise AssertionError(f"no steady baseline: {streak} good answer(s) in a row, last {last!r}")
        last = fn()
        streak = streak + 1 if ok(last) else 0
        if streak < times:
            time.sleep(0.1)


def test_ipvs_side_by_side_with_upstream_kube_proxy_ipvs(pair: Pair) -> None:
    h = pair.h
    s = _svc(pair, "s", "s")
    cip = s["spec"]["clusterIP"]
    np_svc = _svc(pair, "np", "s", [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}],
                  type="NodePort")
    nport = np_svc["spec"]["ports"][0]["nodePort"]
    loc = {t: _svc(pair, f"loc-{t}", f"l-{t}", type="NodePort", externalTrafficPolicy="Local") for t in ("kpa", "kp")}
    lport = {t: svc["spec"]["ports"][0]["nodePort"] for t, svc in loc.items()}
    other = {"kpa": "kp", "kp": "kpa"}
    empty = _svc(pair, "empty", "nothing")
    aff = _svc(pair, "aff", "s", sessionAffinity="ClientIP")
    dns = _svc(pair, "dns", "u", [{"name": "dns", "port": 53, "targetPort": 8080, "protocol": "UDP"}])
    hp = {t: _svc(pair, f"hp-{t}", f"l-{t}") for t in ("kpa", "kp")}

    def from_client(node: Any, ip: str, port: int, proto: str = "tcp", n: int = 12) -> list[str]:
        c = pair.clients[node.name].name
        _until(lambda: node.probe(c, ip, port, proto), lambda r: r.split()[0] not in ("TIMEOUT", "REFUSED"))
        return [node.probe(c, ip, port, proto) for _ in range(n)]

    scenarios: list[tuple[str, Callable[[Any], str]]] = [
        ("ClusterIP from a pod", lambda n: _norm(pair, n, from_client(n, cip, 80))),
        ("ClusterIP from the node itself", lambda n: _norm(pair, n, [n.probe("node", cip, 80) for _ in range(12)])),
        ("no endpoints: from a pod", lambda n: n.probe(pair.clients[n.name].name, empty["spec"]["clusterIP"], 80)),
        ("NodePort from outside via this node", lambda n: _norm(
            pair, n, [probe(h.client, n.sim.ip, nport, timeout=2) for _ in range(12)])),
        ("ETP Local, endpoint on this node: from outside", lambda n: _norm(
            pair, n, [probe(h.client, n.sim.ip, lport[_tag(pair, n)], timeout=2) for _ in range(4)])),
        ("ETP Local, endpoint on the other node: from outside", lambda n: _norm(
            pair, n, [probe(h.client, n.sim.ip, lport[other[_tag(pair, n)]], timeout=1) for _ in range(2)])),
        ("sessionAffinity ClientIP from a pod", lambda n: f"{len(who(from_client(n, aff['spec']['clusterIP'], 80)))} "
                                                         "backend(s)"),
        ("UDP ClusterIP from a pod", lambda n: _norm(pair, n, from_client(n, dns["spec"]["clusterIP"], 53, "udp"))),
        ("hairpin: the only endpoint calls its own Service", lambda n: _norm(
            pair, n, [n.probe(f"l-{_tag(pair, n)}", hp[_tag(pair, n)]["spec"]["clusterIP"], 80)])),
    ]
    rows = []
    for title, observe in scenarios:
        a, b = observe(pair.kp), observe(pair.kpa)
        for _ in range(2):  # a difference must reproduce
            if a == b:
                break
            time.sleep(2)
            a, b = observe(pair.kp), observe(pair.kpa)
        rows.append((title, a, b))
    # a change reaching each node: scale the Service up, time to the first answer from the new pod
    t0 = time.monotonic()
    extra = pair.kpa.create_pod(NS, "s2-kpa", {"app": "s"})
    seen: dict[str, float] = {}
    while len(seen) < 2 and time.monotonic() - t0 < 30:
        for node in (pair.kp, pair.kpa):
            if node.name not in seen and "s2" in node.probe(pair.clients[node.name].name, cip, 80, timeout=0.5):
                seen[node.name] = time.monotonic() - t0
    verdicts = ["same" if a == b else ("documented" if t in DOCUMENTED else "DIFFERENT") for t, a, b in rows]
    w = max(len(t) for t, _, _ in rows)
    lines = ["side by side in UML guests (IPVS kernel): upstream kube-proxy --proxy-mode ipvs (node uvs-kp) vs "
             "kube-proxy-agent --proxy-mode ipvs (node uvs-kpa)"]
    for (t, a, b), v in zip(rows, verdicts, strict=True):
        lines.append(f"| {t:<{w}} | {a} | {b} | {v} |")
    lines.append(f"new endpoint answering after: kube-proxy {seen.get(pair.kp.name, float('nan')):.1f}s, "
                 f"kube-proxy-agent {seen.get(pair.kpa.name, float('nan')):.1f}s (API change to first answer, "
                 "the guests' slow system calls included)")
    REPORTS.append("\n".join(lines))
    pair.kpa.delete_pod(extra)
    assert "DIFFERENT" not in verdicts, "\n".join(lines) + "\n\nagent log:\n" + pair.kpa.log()[-3000:]
    assert pair.kpa.name in seen, pair.kpa.log()[-3000:]
    # IPVS state as ipvsadm shows it, on the agent's node: a virtual server per frontend
    table = pair.kpa.exec("ipvsadm", "-Ln")
    assert cip in table and f":{nport}" in table, table


def _guest_state(node: Any) -> dict[str, Any]:
    """What of kube-proxy's and of the agent's IPVS mode is in the guest's kernel."""
    from agent.backends.ipvs.takeover import SET_NAMES
    from agent.kernel import kubeproxy

    links = node.exec("ip", "-o", "link", "show")
    sets = set(node.exec("ipset", "list", "-n").split())
    save = node.exec("iptables-save")
    return {"kube-ipvs0": " kube-ipvs0:" in links, "kpa-ipvs0": " kpa-ipvs0:" in links,
            "kube-proxy ipsets": sorted(sets & SET_NAMES),
            "agent ipsets": sorted(s for s in sets if s.startswith("KPAV-")),
            "kube-proxy chains": sorted(c for cs in kubeproxy.parse(save).chains.values() for c in cs),
            "agent chains": sorted({ln.split()[0][1:] for ln in save.splitlines() if ln.startswith(":KPAV-")}),
            "ipvs": node.exec("ipvsadm", "-Ln")}


def test_takeover_from_kube_proxy_ipvs_and_back(pair: Pair) -> None:
    """The kube-proxy node (IPVS mode) taken over by the agent in IPVS mode with
    --cleanup-kube-proxy, then handed back (kube-proxy started, then `kube-proxy-agent --cleanup
    --proxy-mode ipvs`), new TCP and UDP connections from a pod (in the guest) and TCP from outside
    to a NodePort running the whole time: none may fail."""
    import dataclasses

    from tests.cluster.harness import agent_binary, wait_until
    from tests.cluster.umlnode import _synced
    from tests.e2e.traffic import Traffic

    h, node = pair.h, pair.kp
    svc = _svc(pair, "tk", "s", type="NodePort")
    udp = _svc(pair, "tku", "u", [{"name": "dns", "port": 53, "targetPort": 8080, "protocol": "UDP"}])
    cip, nport, uip = svc["spec"]["clusterIP"], svc["spec"]["ports"][0]["nodePort"], udp["spec"]["clusterIP"]
    client = pair.clients[node.name].name
    for ip, port, proto in ((cip, 80, "tcp"), (uip, 53, "udp")):
        _steady(lambda ip=ip, port=port, proto=proto: node.probe(client, ip, port, proto),
                lambda r: r.startswith(("s-", "u-")))
    # and from outside, to the NodePort (kube-proxy in the guest can take many seconds to program it)
    _steady(lambda: probe(h.client, node.sim.ip, nport, timeout=1), lambda r: r.startswith("s-"))
    before = _guest_state(node)
    assert before["kube-ipvs0"] and before["kube-proxy ipsets"] and before["kube-proxy chains"], before
    agent = dataclasses.replace(node.sim, proxy_kind="agent", mode="ipvs", extra_args=["--cleanup-kube-proxy"])
    guest_targets = [["pod->ClusterIP TCP", client, cip, 80, "tcp"], ["pod->ClusterIP UDP", client, uip, 53, "udp"]]
    node.rpc("traffic", action="start", targets=guest_targets, rate=20, phase="kube-proxy")
    outside = Traffic([("outside->NodePort TCP", h.client, node.sim.ip, nport, "tcp")], "kube-proxy", backend="s-",
                      rate=20)
    try:
        with outside:
            time.sleep(3)

            def phase(name: str) -> None:
                outside.phase = name
                node.rpc("traffic", action="phase", phase=name)
            phase("kube-proxy stopped, the agent started with --cleanup-kube-proxy")
            node.rpc("proxy", action="stop")
            node.rpc("proxy", action="start", argv=h.proxy_argv(agent))
            wait_until(lambda: _synced(node), 120, 0.5, what="the agent to sync in the guest")
            ends = ("takeover from kube-proxy: removed ipsets", "could not remove kube-proxy",
                    "nothing of kube-proxy's")
            wait_until(lambda: any(e in node.log() for e in ends), 60, 0.5, what="the takeover's last log line")
            taken = _guest_state(node)
            phase("the agent serving")
            time.sleep(3)
            phase("the agent stopped, kube-proxy started")
            node.rpc("proxy", action="stop")
            node.rpc("proxy", action="start")
            wait_until(lambda: _synced(node), 120, 0.5, what="kube-proxy to sync again in the guest")
            phase("kube-proxy-agent --cleanup --proxy-mode ipvs")
            cleaned = node.rpc("exec", wait=300, argv=[agent_binary(), "--cleanup", "--proxy-mode", "ipvs"])
            back = _guest_state(node)
            phase("kube-proxy again")
            time.sleep(3)
    finally:
        guest = node.rpc("traffic", action="stop", title="takeover from kube-proxy (ipvs, UML guest)")
    log = node.log()
    lines = [guest["table"], outside.table("takeover from kube-proxy (ipvs, UML guest): from outside"),
             *(ln.split("msg=", 1)[-1] for ln in log.splitlines() if "takeover from kube-proxy:" in ln),
             "back: " + str(cleaned.get("out", "")).strip().replace("\n", "; ")[:600]]
    REPORTS.append("\n".join(lines))
    assert not taken["kube-ipvs0"] and not taken["kube-proxy ipsets"] and not taken["kube-proxy chains"], (taken, lines)
    assert taken["kpa-ipvs0"] and f"{cip}:80" in taken["ipvs"] and f":{nport}" in taken["ipvs"], taken
    assert "could not remove kube-proxy" not in log, log[-3000:]
    assert not back["kpa-ipvs0"] and not back["agent ipsets"] and not back["agent chains"], (back, cleaned)
    assert back["kube-ipvs0"] and f"{cip}:80" in back["ipvs"], back
    failed = guest["failed"] + outside.failed
    assert not failed, f"{len(failed)} connections failed: {failed[:10]}\n" + "\n".join(lines)
