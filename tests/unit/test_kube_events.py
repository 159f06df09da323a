"""The Event bodies the agent posts about its Node (events.k8s.io/v1, as kube-proxy posts them)."""

from __future__ import annotations

from datetime import datetime

from agent.sources.kube_events import CONTROLLER, EVENT_NAMESPACE, node_event


def test_event_about_the_node_has_what_the_api_requires() -> None:
    now = 1764059000.123456
    e = node_event("worker-1", "Normal", "Starting", "StartKubeProxyAgent", "Starting kube-proxy-agent", now)
    assert e["apiVersion"] == "events.k8s.io/v1" and e["kind"] == "Event"
    assert e["metadata"]["namespace"] == EVENT_NAMESPACE == "default"  # events about Nodes live there
    assert e["metadata"]["name"] == f"worker-1.{int(now * 1e9):x}"
    assert datetime.fromisoformat(e["eventTime"]).timestamp() == round(now, 6)
    assert e["eventTime"].endswith("Z")
    assert e["regarding"] == {"apiVersion": "v1", "kind": "Node", "name": "worker-1", "uid": "worker-1"}
    assert (e["reportingController"], e["reportingInstance"]) == (CONTROLLER, "kube-proxy-agent-worker-1")
    assert (e["type"], e["reason"], e["action"]) == ("Normal", "Starting", "StartKubeProxyAgent")


def test_event_names_differ_in_time_and_long_text_is_cut_to_api_limits() -> None:
    a = node_event("n", "Warning", "SyncFailed", "SyncProxyRules", "x" * 5000, 1.0)
    b = node_event("n", "Warning", "SyncFailed", "SyncProxyRules", "y", 1.000001)
    assert a["metadata"]["name"] != b["metadata"]["name"]
    assert len(a["note"]) == 1024  # the API refuses notes over 1 kB
    long_node = "n" * 300
    assert len(node_event(long_node, "Normal", "Starting", "a", "b", 1.0)["reportingInstance"]) == 128
