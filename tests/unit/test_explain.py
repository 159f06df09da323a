"""The explain checklist from the model alone (steps 1 and 2): each broken case names its cause
first, with what to do; a healthy Service has none."""

from __future__ import annotations

from typing import Any

import pytest

from agent.model.explain import explain, render_text
from agent.model.records import EndpointSlice, Service, from_builtins
from agent.model.serviceport import NamespacedName
from agent.model.state import ClusterModel

HTTP = [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]
EP = [{"name": "http", "port": 8080, "protocol": "TCP"}]


def svc(name: str, ip: str = "10.96.0.10", ports: list[dict[str, Any]] | None = None, **spec: Any) -> dict[str, Any]:
    return {"kind": "Service", "metadata": {"namespace": "shop", "name": name},
            "spec": {"clusterIP": ip, "clusterIPs": [ip] if ip != "None" else [], "ports": ports or HTTP, **spec}}


def eps(name: str, service: str | None, *endpoints: tuple[str, bool, str], ports: list[dict[str, Any]] | None = None
        ) -> dict[str, Any]:
    labels = {"kubernetes.io/service-name": service} if service else {}
    return {"kind": "EndpointSlice", "metadata": {"namespace": "shop", "name": name, "labels": labels},
            "addressType": "IPv4", "ports": EP if ports is None else ports,
            "endpoints": [{"addresses": [ip], "conditions": {"ready": ready}, "nodeName": node}
                          for ip, ready, node in endpoints]}


def model(*objs: dict[str, Any]) -> ClusterModel:
    m = ClusterModel("node-a", ("10.244.0.0/16",))
    for o in objs:
        rec = from_builtins(o["kind"], o)
        key = NamespacedName("shop", o["metadata"]["name"])
        if isinstance(rec, Service):
            m.on_service(key, rec)
        elif isinstance(rec, EndpointSlice):
            m.on_slice(key, rec)
    m.drain()
    return m


def problem(m: ClusterModel, name: str) -> tuple[str, str]:
    e = explain(m.facts(NamespacedName("shop", name)))
    b = e.broken
    assert b is not None, render_text(e)
    return b.problem, b.fix


def test_healthy_service_has_no_problem_and_lists_what_this_node_uses() -> None:
    m = model(svc("web"), eps("web-1", "web", ("10.244.1.5", True, "node-a"), ("10.244.2.5", False, "node-b")))
    e = explain(m.facts(NamespacedName("shop", "web")))
    assert e.broken is None and e.verdict.startswith("ok")
    text = render_text(e)
    assert "cluster IP 10.96.0.10:80/TCP (IPv4)" in text
    assert "10.244.1.5:8080 ready node node-a; 10.244.2.5:8080 not ready node node-b" in text
    assert "used here: 1 for cluster traffic" in text
    assert e.targets == ["10.96.0.10 80 TCP"]


@pytest.mark.parametrize(("objs", "name", "cause", "fix"), [
    ([], "ghost", "no such Service", "kubectl get service -n shop ghost"),
    ([svc("hl", "None")], "hl", "not proxied by design: headless", "DNS"),
    ([svc("ext", "", type="ExternalName", externalName="example.org")], "ext", "ExternalName", "CNAME"),
    ([{**svc("other"), "metadata": {"namespace": "shop", "name": "other",
                                    "labels": {"service.kubernetes.io/service-proxy-name": "x"}}}],
     "other", "labelled for another proxy", "service-proxy-name"),
    ([svc("bad", ports=[{"name": "http", "port": 80, "protocol": "ICMP"}])], "bad", "skipped as invalid", "spec"),
    ([svc("lonely"), eps("stray", None, ("10.244.1.5", True, "node-a"))], "lonely",
     "no EndpointSlice is labelled kubernetes.io/service-name=lonely", "were skipped for having no such label: stray"),
    ([svc("down"), eps("down-1", "down", ("10.244.1.5", False, "node-a"))], "down", "none ready", "readiness"),
    ([svc("empty"), eps("empty-1", "empty")], "empty", "no endpoints", "selector"),
    # what the EndpointSlice controller writes while the selector matches nothing: no ports at all
    ([svc("nomatch"), eps("nomatch-1", "nomatch", ports=[])], "nomatch", "no endpoints: its EndpointSlices list none",
     "selector matches running pods"),
    ([svc("named"), eps("named-1", "named", ("10.244.1.5", True, "node-a"),
                        ports=[{"name": "web", "port": 8080, "protocol": "TCP"}])],
     "named", "no slice has a port named 'http' with protocol TCP (they have: web/TCP)", "named targetPort"),
    ([svc("etp", ports=[{"name": "http", "port": 80, "nodePort": 30080, "protocol": "TCP"}], type="NodePort",
          externalTrafficPolicy="Local"), eps("etp-1", "etp", ("10.244.2.5", True, "node-b"))],
     "etp", "externalTrafficPolicy Local and no endpoint on this node (node-a)", "Cluster"),
    ([svc("itp", internalTrafficPolicy="Local"), eps("itp-1", "itp", ("10.244.2.5", True, "node-b"))],
     "itp", "internalTrafficPolicy Local and no endpoint on this node", "endpoint on this node"),
])
def test_each_broken_case_names_its_cause(objs: list[dict[str, Any]], name: str, cause: str, fix: str) -> None:
    what, how = problem(model(*objs), name)
    assert cause in what
    assert fix in how


def test_text_stops_at_the_first_problem_unless_asked_for_all() -> None:
    m = model(svc("down"), eps("down-1", "down", ("10.244.1.5", False, "node-a")))
    e = explain(m.facts(NamespacedName("shop", "down")))
    e.steps.append(type(e.steps[0])("later", True, ["never shown"]))
    assert "never shown" not in render_text(e)
    assert "never shown" in render_text(e, all_steps=True)
    assert render_text(e.as_dict()) == render_text(e)
