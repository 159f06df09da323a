"""What the e2e tests work with: a mode's two nodes (`Cluster`) and a per-test namespace (`Kit`).

    outside client (10.10.0.100) --LAN-- node1 (agent, MODE) --LAN-- node2 (agent, MODE)
                                            |                          |
                                 client-<node1> + pods          client-<node2> + pods
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.cluster.harness import (
    CLIENT_IP,
    Harness,
    Pod,
    SimNode,
    answered,
    ask,
    wait_until,
)
from tests.cluster.kubeapi import JSON
from tests.netlab import who

HTTP = [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]
CLIENTS_NS = "e2e-clients"


@dataclass
class Cluster:
    h: Harness
    mode: str
    nodes: list[SimNode]
    clients: dict[str, Pod]  # node name -> client pod on it (selected by no Service)
    _seq: int = 0

    @property
    def n1(self) -> SimNode:
        return self.nodes[0]

    @property
    def n2(self) -> SimNode:
        return self.nodes[1]

    def client_of(self, node: SimNode) -> Pod:
        return self.clients[node.name]


def build_cluster(h: Harness, mode: str, prefix: str, first_index: int = 1) -> Cluster:
    try:
        n1 = h.add_node(f"{prefix}-1", first_index, "agent", mode)
        n2 = h.add_node(f"{prefix}-2", first_index + 1, "agent", mode, peers=[n1])
        h.namespace(CLIENTS_NS)
        clients = {n.name: h.create_pod(CLIENTS_NS, f"client-{n.name}", n, {"role": "client"}, ports=[],
                                        serve=False) for n in (n1, n2)}
    except BaseException:
        teardown_nodes(h, prefix)
        raise
    return Cluster(h, mode, [n1, n2], clients)


def teardown_nodes(h: Harness, prefix: str) -> None:
    for name, node in list(h.nodes.items()):
        if name.startswith(prefix + "-"):
            h.remove_node(node)  # its pods (client pods included) go with it


def teardown_cluster(c: Cluster) -> None:
    for pod in c.clients.values():
        c.h.finalize_pod(pod)
    for n in c.nodes:
        c.h.remove_node(n)


def slug(text: str, limit: int = 40) -> str:
    s = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    return s[:limit].strip("-")


@dataclass
class Kit:
    """One test's namespace on one mode's cluster, with helpers that keep tests short."""

    c: Cluster
    ns: str
    test: str
    pods: list[Pod] = field(default_factory=list)

    @property
    def h(self) -> Harness:
        return self.c.h

    # -- objects
    def pod(self, name: str, node: SimNode, labels: dict[str, str] | None = None, **kw: Any) -> Pod:
        p = self.h.create_pod(self.ns, name, node, {"app": "web"} if labels is None else labels, **kw)
        self.pods.append(p)
        return p

    def service(self, name: str, ports: list[JSON] | None = None, selector: dict[str, str] | None = None,
                **spec: Any) -> JSON:
        return self.h.create_service(self.ns, name, ports or HTTP, selector, **spec)

    def service_without_selector(self, name: str, ports: list[JSON] | None = None, **spec: Any) -> JSON:
        return self.h.create_service(self.ns, name, ports or HTTP, None, **spec)

    # -- traffic
    # Probes that expect an answer wait 2 s: one lost SYN is retransmitted after 1 s, as a real
    # client would, and a loaded test machine gets slack. Probes that expect silence say so.
    def from_pod(self, node: SimNode, ip: str, port: int, proto: str = "tcp", timeout: float = 2.0) -> str:
        return ask(self.c.client_of(node).netns, ip, port, proto, timeout)

    def from_outside(self, ip: str, port: int, proto: str = "tcp", timeout: float = 2.0, src_ip: str = "") -> str:
        return ask(self.h.client, ip, port, proto, timeout, src_ip=src_ip)

    def many(self, fn: Callable[[], str], n: int = 24) -> list[str]:
        return [fn() for _ in range(n)]

    def spread(self, fn: Callable[[], str], n: int = 24) -> set[str]:
        return who(self.many(fn, n))

    # -- convergence, recorded as network programming latency
    def label(self, what: str) -> str:
        return f"{self.test}: {what}"

    def first(self, what: str, t0: float, fn: Callable[[], str], accept: Callable[[str], bool],
              timeout: float = 30, record: bool = True) -> str:
        """The first reply `accept` likes (attempts every 10 ms, concurrently); its latency since t0
        is recorded as network programming latency unless record=False (for waits that are not a
        change, e.g. "before ...")."""
        return self.h.first(self.c.mode, self.label(what), t0, fn, accept, timeout, record)[1]

    def first_is(self, what: str, t0: float, fn: Callable[[], str], expected: str, timeout: float = 30) -> str:
        return self.first(what, t0, fn, lambda r: r == expected, timeout)

    def until_answered_by(self, what: str, t0: float, fn: Callable[[], str], names: set[str],
                          timeout: float = 30, record: bool = True, new: set[str] | None = None) -> None:
        """Latency: until the first answer from one of `new` (default: `names`); then until every
        one of `names` has answered at least once."""
        r = self.first(what, t0, fn, lambda r: answered(r) and r.split()[0] in (new or names), timeout, record)
        seen = {r.split()[0]}

        def all_seen() -> bool:
            r = fn()
            if answered(r) and r.split()[0] in names:
                seen.add(r.split()[0])
            return seen == names
        wait_until(all_seen, timeout, 0.0, f"{what}: all of {sorted(names)} to answer (seen {sorted(seen)})")

    def _streak(self, what: str, t0: float, fn: Callable[[], str], ok: Callable[[str], bool], streak: int,
                timeout: float) -> float:
        """Until `streak` replies in a row satisfy ok(); returns the time from t0 to the start of
        that streak. Not recorded as programming latency: a removal has no "first successful
        connection", and a streak can start by chance before the change is in the kernel."""
        end = time.monotonic() + timeout
        run, start = 0, 0.0
        while True:
            ts = time.monotonic()
            r = fn()
            if ok(r):
                start = ts if run == 0 else start
                run += 1
                if run >= streak:
                    return start - t0
            else:
                run = 0
            if time.monotonic() > end:
                raise TimeoutError(f"{what}: no {streak} good replies in a row within {timeout:.0f}s (last {r!r})")

    def until_only(self, what: str, t0: float, fn: Callable[[], str], names: set[str], streak: int = 30,
                   timeout: float = 30) -> float:
        """Until `streak` answers in a row all come from `names`. 30: while the old endpoints are
        still programmed, a streak from a subset of them by chance is ~1 in 10^9 per try."""
        return self._streak(what, t0, fn, lambda r: answered(r) and r.split()[0] in names, streak, timeout)

    def until_not_answered(self, what: str, t0: float, fn: Callable[[], str], streak: int = 3,
                           timeout: float = 30) -> float:
        return self._streak(what, t0, fn, lambda r: not answered(r), streak, timeout)


def names(pods: Sequence[Pod]) -> set[str]:
    return {p.name for p in pods}


def node_port(svc: JSON, i: int = 0) -> int:
    return int(svc["spec"]["ports"][i]["nodePort"])


def cluster_ip(svc: JSON) -> str:
    return str(svc["spec"]["clusterIP"])


def now() -> float:
    return time.monotonic()


__all__ = ["CLIENT_IP", "HTTP", "Cluster", "Kit", "build_cluster", "cluster_ip", "names", "node_port", "now",
           "slug", "teardown_cluster"]


@contextlib.contextmanager
def lone_node(h: Harness, name: str, index: int, proxy: str, mode: str, namespace: str) -> Iterator[SimNode]:
    """One node of its own (not a mode's cluster) and a Kubernetes namespace for its objects; both
    removed afterwards."""
    n = h.add_node(name, index, proxy=proxy, mode=mode)
    h.namespace(namespace)
    try:
        yield n
    finally:
        h.cleanup_namespace(namespace)
        h.remove_node(n)


@contextlib.contextmanager
def mode_lone_node(h: Harness, name: str, index: int, mode: str, namespace: str) -> Iterator[SimNode]:
    """An agent node of its own in `mode` (the test skipped when this machine cannot run it)."""
    from tests.e2e.conftest import mode_unsupported

    why = mode_unsupported(mode)
    if why:
        pytest.skip(f"{mode} mode not usable here: {why}")
    with lone_node(h, name, index, "agent", mode, namespace) as n:
        yield n


WEB_PORTS = [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"},
             {"name": "dns", "port": 53, "targetPort": 8080, "protocol": "UDP"}]
WEB_POD_PORTS = (("http", 8080, "TCP"), ("dns", 8080, "UDP"))


Target = tuple[str, str, str, int, str]  # as tests/e2e/traffic.py takes it


def web_under_traffic(h: Harness, node: SimNode, namespace: str) -> tuple[list[Pod], Pod, list[Target]]:
    """Two pods behind NodePort Service `web` (TCP 80, UDP 53) and a client pod on `node`, once the
    Service answers from the pod and from outside: (pods, client, the targets tests/e2e/traffic.py
    runs: pod -> ClusterIP TCP and UDP, outside -> NodePort TCP)."""
    pods = [h.create_pod(namespace, f"web-{i}", node, {"app": "web"}, ports=WEB_POD_PORTS) for i in range(2)]
    client = h.create_pod(namespace, "client", node, {"role": "client"}, ports=[], serve=False)
    svc = h.create_service(namespace, "web", WEB_PORTS, selector={"app": "web"}, type="NodePort")
    ip, np = cluster_ip(svc), node_port(svc)
    wait_until(lambda: ask(client.netns, ip, 80, timeout=0.5).startswith("web-")
               and ask(h.client, node.ip, np, timeout=0.5).startswith("web-"), 60, what="the Service answers")
    return pods, client, [("pod->ClusterIP TCP", client.netns, ip, 80, "tcp"),
                          ("pod->ClusterIP UDP", client.netns, ip, 53, "udp"),
                          ("outside->NodePort TCP", h.client, node.ip, np, "tcp")]
