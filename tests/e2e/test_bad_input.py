"""Bad and awkward input at scale through the real API while traffic runs (issue 12, item 5), in
every mode: about 1,000 Services and their EndpointSlices that kube-apiserver accepts but a proxy
must be careful with:

  - 900 Services whose selector matches nothing (the controller writes them empty slices);
  - a Service with 2,000 ports;
  - a Service with five slices of 1,000 endpoints each (the most a slice may hold);
  - two slices listing the same endpoints (duplicates across slices);
  - IPv6 endpoints in a slice of an IPv4-only Service;
  - a slice with no kubernetes.io/service-name label.

Each is programmed, ignored or skipped with at most one log line per object (never per sync); a
healthy Service beside them loses no connection and still takes changes; the agent's memory grows
by what the objects hold, then stays. No traffic goes to the made-up endpoint addresses.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.cluster.harness import Harness, SimNode, ask, wait_until
from tests.cluster.kubeapi import JSON
from tests.e2e.conftest import REPORTS
from tests.e2e.support import WEB_POD_PORTS, cluster_ip, mode_lone_node, web_under_traffic
from tests.e2e.traffic import Traffic

NS = "e2e-bad-input"
NO_MATCH = 900
# made-up endpoint addresses: programmed, never sent anything by this test
FAKE_NET = "10.200"


@pytest.fixture
def node(harness: Harness, mode: str) -> Iterator[SimNode]:
    with mode_lone_node(harness, "bad-9", 9, mode, NS) as n:
        yield n


def _rss_mb(node: SimNode) -> float:
    assert node.proxy is not None
    status = Path(f"/proc/{node.proxy.pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024  # type: ignore[union-attr]


def _slice(name: str, service: str | None, addresses: list[str], family: str = "IPv4",
           port: int = 8080) -> JSON:
    labels = {"endpointslice.kubernetes.io/managed-by": "e2e-bad-input"}
    if service is not None:
        labels["kubernetes.io/service-name"] = service
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": family,
            "metadata": {"name": name, "namespace": NS, "labels": labels},
            "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
            "endpoints": [{"addresses": [a], "conditions": {"ready": True}} for a in addresses]}


def _fake(i: int) -> str:
    return f"{FAKE_NET}.{i // 250}.{i % 250 + 1}"


def _flood(h: Harness) -> int:
    """Create the awkward objects; returns how many objects were created."""
    http = [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]
    objs: list[JSON] = []
    for i in range(NO_MATCH):
        objs.append({"apiVersion": "v1", "kind": "Service", "metadata": {"name": f"nomatch-{i}", "namespace": NS},
                     "spec": {"selector": {"app": f"nothing-{i}"}, "ports": http}})
    objs.append({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "many-ports", "namespace": NS},
                 "spec": {"selector": {"app": "nothing"}, "ports": [
                     {"name": f"p{p}", "port": 10000 + p, "targetPort": 8080, "protocol": "TCP"}
                     for p in range(2000)]}})
    for name in ("big", "dup", "v6-endpoints"):
        objs.append({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": NS},
                     "spec": {"ports": http}})
    objs += [_slice(f"big-{k}", "big", [_fake(k * 1000 + i) for i in range(1000)]) for k in range(5)]
    objs += [_slice(f"dup-{k}", "dup", [_fake(6000 + i) for i in range(10)]) for k in range(2)]
    objs.append(_slice("v6-endpoints-1", "v6-endpoints", [f"fd00:200::{i + 1:x}" for i in range(10)], "IPv6"))
    objs.append(_slice("no-service-label", None, [_fake(7000 + i) for i in range(10)]))

    def create(obj: JSON) -> Any:
        return h.api.create(obj)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(create, objs))
    return len(objs)


def test_bad_input_at_scale_leaves_healthy_services_alone(harness: Harness, node: SimNode, mode: str) -> None:
    h = harness
    _, client, targets = web_under_traffic(h, node, NS)
    ip = targets[0][2]
    log_path = h.run_dir / "logs" / f"agent-{node.name}.log"
    rss0 = _rss_mb(node)
    mark = log_path.stat().st_size
    with Traffic(targets, phase="steady") as traffic:
        time.sleep(2)
        traffic.phase = "about 1,000 awkward Services and slices arrive"
        t0 = time.monotonic()
        created = _flood(h)
        took = time.monotonic() - t0
        # the last Service with no endpoints answers REFUSED once the node has it
        last = h.api.get(f"/api/v1/namespaces/{NS}/services/nomatch-{NO_MATCH - 1}")
        wait_until(lambda: ask(client.netns, cluster_ip(last), 80, timeout=1) == "REFUSED", 120, 0.5,
                   what="the last Service without endpoints to be programmed (REFUSED)")
        many_ports: dict[str, Any] = {}

        def explained() -> bool:  # created by another thread than nomatch-*: maybe not listed yet
            code, body = node.http_get(10249, f"/explain/{NS}/many-ports?output=json", timeout=30)
            many_ports.update(json.loads(body) if code == 200 else {"code": code, "body": body})
            return code == 200 and "no endpoints" in many_ports.get("verdict", "")
        wait_until(explained, 60, 1, what="explain of the 2,000-port Service")
        time.sleep(3)
        traffic.phase = "a change to the healthy Service"
        h.create_pod(NS, "web-2", node, {"app": "web"}, ports=WEB_POD_PORTS)
        wait_until(lambda: any(ask(client.netns, ip, 80, timeout=2).startswith("web-2") for _ in range(10)), 60, 0,
                   what="a new pod of the healthy Service to be served")
        rss1 = _rss_mb(node)
        traffic.phase = "steady after (periodic syncs)"
        time.sleep(12)  # at least one periodic sync (10 s here): no new log lines about the same objects
    rss2 = _rss_mb(node)
    log = log_path.read_bytes()[mark:].decode(errors="replace")
    warnings = [ln for ln in log.splitlines() if "level=warning" in ln or "level=error" in ln]
    skipped = [ln for ln in warnings if "invalid object skipped" in ln]
    reasons: dict[str, int] = {}
    for ln in skipped:
        m = re.search(r"reason=(\S+)", ln)
        reasons[m.group(1) if m else "?"] = reasons.get(m.group(1) if m else "?", 0) + 1
    metric = node.metric("kubeproxyagent_invalid_objects_total")
    REPORTS.append(traffic.table(f"bad input at scale ({mode})") + "\n" + (
        f"{created} objects created in {took:.1f}s; agent RSS {rss0:.0f} MB before, {rss1:.0f} MB with them, "
        f"{rss2:.0f} MB after a periodic sync; {len(warnings)} warning line(s), skipped by reason {reasons}, "
        f"kubeproxyagent_invalid_objects_total {metric:.0f}"))
    # 2,000 ports are valid (kube-apiserver sets no limit, kube-proxy programs them): programmed too
    assert "no endpoints" in many_ports["verdict"], many_ports
    assert not traffic.failed, (f"{len(traffic.failed)} of {sum(traffic.tried.values())} connections failed: "
                                f"{traffic.failed[:10]} client ports {traffic.ports[:10]}")
    # one line per awkward object at most (the duplicates, the unlabelled slice), never one per sync
    assert len(warnings) <= 10, "\n".join(warnings[:20])
    assert rss2 - rss0 < 200, f"agent RSS grew from {rss0:.0f} to {rss2:.0f} MB"
