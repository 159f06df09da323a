"""PlanTallies, kept up to date from each drain's changed ports, always equal a scan of every plan."""

from __future__ import annotations

import random
from typing import Any

from agent.health import HealthCheckService
from agent.model.state import ClusterModel
from agent.sync.tallies import PlanTallies
from tests.unit.test_tracker_state import EP_DNS, EP_HTTP, NODE, Cluster, endpoint, endpoint_slice, service


def scan(model: ClusterModel) -> tuple[dict[str, int], dict[int, HealthCheckService]]:
    no_local = {"internal": 0, "external": 0}
    hc: dict[int, HealthCheckService] = {}
    for state in model.desired.values():
        for plan in state.services.values():
            i = plan.info
            no_local["internal"] += i.internal_policy_local and not plan.local
            no_local["external"] += i.external_policy_local and not plan.local
            if i.health_check_node_port:
                prev = hc.get(i.health_check_node_port)
                n = max(len(plan.local), prev.local_endpoints if prev else 0)
                hc[i.health_check_node_port] = HealthCheckService(i.name.namespace, i.name.name,
                                                                  i.health_check_node_port, n)
    return no_local, hc


def random_service(rnd: random.Random, n: int) -> dict[str, Any]:
    ips = rnd.choice([[f"10.96.0.{n + 1}"], [f"10.96.0.{n + 1}", f"fd00:96::{n + 1}"]])
    ports = rnd.choice([[{"name": "http", "port": 80, "protocol": "TCP", "nodePort": 30000 + n}],
                        [{"name": "http", "port": 80, "protocol": "TCP", "nodePort": 30000 + n},
                         {"name": "dns", "port": 53, "protocol": "UDP", "nodePort": 31000 + n}]])
    spec: dict[str, Any] = {"type": "LoadBalancer", "internalTrafficPolicy": rnd.choice(["Cluster", "Local"])}
    if rnd.random() < 0.6:
        spec.update(externalTrafficPolicy="Local", healthCheckNodePort=32000 + n)
    return service(f"s{n}", ips, ports, **spec)


def test_tallies_follow_changes_exactly() -> None:
    rnd = random.Random(7)
    c = Cluster()
    tallies = PlanTallies()
    for _ in range(300):
        for _ in range(rnd.randint(1, 3)):
            n = rnd.randint(0, 5)
            op = rnd.random()
            if op < 0.3:
                c.apply(random_service(rnd, n))
            elif op < 0.4:
                c.delete("Service", f"s{n}")
            elif op < 0.9:
                eps = [endpoint(f"10.244.1.{rnd.randint(2, 9)}", node=rnd.choice([NODE, "node-b"]),
                                ready=rnd.random() < 0.8) for _ in range(rnd.randint(0, 3))]
                c.apply(endpoint_slice(f"s{n}-1", f"s{n}", eps, [*EP_HTTP, *EP_DNS]))
            else:
                c.delete("EndpointSlice", f"s{n}-1")
        u = c.drain()
        tallies.apply(c.model.desired, u.changed)
        no_local, hc = scan(c.model)
        assert tallies.no_local == no_local
        assert tallies.health_checks == hc


def test_health_check_change_is_flagged_once() -> None:
    c = Cluster()
    tallies = PlanTallies()
    c.apply(service("web", ["10.96.0.1"], [{"name": "http", "port": 80, "protocol": "TCP", "nodePort": 30001}],
                    type="LoadBalancer", externalTrafficPolicy="Local", healthCheckNodePort=32001))
    tallies.apply(c.model.desired, c.drain().changed)
    assert tallies.health_checks_changed
    assert tallies.health_checks == {32001: HealthCheckService("shop", "web", 32001, 0)}
    tallies.health_checks_changed = False
    c.apply(endpoint_slice("web-1", "web", [endpoint("10.244.1.5", node="node-b")], EP_HTTP))
    tallies.apply(c.model.desired, c.drain().changed)  # a remote endpoint: the local count stays 0
    assert not tallies.health_checks_changed
    c.apply(endpoint_slice("web-1", "web", [endpoint("10.244.1.5", node=NODE)], EP_HTTP))
    tallies.apply(c.model.desired, c.drain().changed)
    assert tallies.health_checks_changed
    assert tallies.health_checks[32001].local_endpoints == 1
