"""Every manifest we ship is accepted by a real API server: server-side apply with dryRun=All and
strict field validation, so a typo, a wrong type or an unknown field fails here (the unit test in
tests/unit/test_manifests.py only checks the files statically)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cluster.harness import Harness
from tests.cluster.kubeapi import ApiError

pytestmark = pytest.mark.e2e
MANIFESTS = Path(__file__).resolve().parents[2] / "manifests"
# kustomization namespace: objects without one go there (as `kubectl apply -k` would put them)
DEFAULT_NS = "kube-proxy-agent"


def documents() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in sorted(MANIFESTS.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc:
                continue
            if doc.get("kind") == "Kustomization":
                out += generated_config_maps(path, doc)
                continue
            out.append((f"{path.relative_to(MANIFESTS)}:{doc['kind']}/{doc['metadata']['name']}", doc))
    return out


def generated_config_maps(path: Path, kust: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The ConfigMaps a kustomization's configMapGenerator makes from files (e.g. the dashboard)."""
    out = []
    for gen in kust.get("configMapGenerator", []):
        data = {}
        for f in gen.get("files", []):
            key, _, src = f.partition("=")
            data[key if src else Path(key).name] = (path.parent / (src or key)).read_text()
        labels = gen.get("options", {}).get("labels", {})
        cm = {"apiVersion": "v1", "kind": "ConfigMap",
              "metadata": {"name": gen["name"], "namespace": kust.get("namespace", DEFAULT_NS), "labels": labels},
              "data": data}
        out.append((f"{path.relative_to(MANIFESTS)}:configMapGenerator/{gen['name']}", cm))
    return out


DOCS = documents()


@pytest.mark.parametrize("doc", [d for _, d in DOCS], ids=[i for i, _ in DOCS])
def test_manifest_passes_server_side_dry_run(harness: Harness, doc: dict[str, Any]) -> None:
    api = harness.api
    if api.resource_for(doc["apiVersion"], doc["kind"]) is None:
        pytest.skip(f"{doc['apiVersion']} {doc['kind']} is a CRD kind not installed on the test API server "
                    "(prometheus-operator); only checked statically")
    try:
        out = api.apply(doc, dry_run=True, namespace=DEFAULT_NS)
    except ApiError as exc:
        pytest.fail(f"the API server rejects {doc['kind']}/{doc['metadata']['name']}: {exc}", pytrace=False)
    assert out["kind"] == doc["kind"] and out["metadata"]["name"] == doc["metadata"]["name"]


def test_dry_run_catches_a_typo(harness: Harness) -> None:
    """The check above really validates: a misspelt field is refused."""
    doc = next(d for _, d in DOCS if d["kind"] == "DaemonSet")
    bad = yaml.safe_load(yaml.safe_dump(doc))
    bad["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(ApiError) as err:
        harness.api.apply(bad, dry_run=True, namespace=DEFAULT_NS)
    # (the apiserver answers 500 for apply-patch strict-validation errors; the message names the field)
    assert err.value.status >= 400 and "imagePullPolicyy: field not declared in schema" in err.value.body


def test_the_agents_identity_reads_what_it_needs_and_nothing_else(harness: Harness) -> None:
    """The manifests' RBAC, as the real apiserver enforces it for the agent's service account token:
    get/list/watch on what it reads and create on Events; no Secrets, no writes to Services,
    EndpointSlices or Nodes (issue 12, node security)."""
    from tests.cluster.controlplane import AGENT_NAMESPACE, AGENT_SA
    from tests.cluster.kubeapi import Api

    cp = harness.cp
    assert cp is not None
    agent = Api(cp.server, str(cp.ca), token=cp.token(AGENT_NAMESPACE, AGENT_SA, seconds=600))
    for path in ("/api/v1/services", "/apis/discovery.k8s.io/v1/endpointslices", "/api/v1/nodes",
                 "/apis/networking.k8s.io/v1/servicecidrs"):
        agent.get(path, limit=1)
    event = {"apiVersion": "events.k8s.io/v1", "kind": "Event",
             "metadata": {"generateName": "kpa-rbac-", "namespace": "default"},
             "eventTime": "2026-01-01T00:00:00.000000Z", "reportingController": "kube-proxy-agent",
             "reportingInstance": "kube-proxy-agent-test", "action": "Check", "reason": "RBACCheck",
             "type": "Normal", "regarding": {"kind": "Node", "name": "rbac-check"}}
    agent.post("/apis/events.k8s.io/v1/namespaces/default/events", event)
    refused = {
        "read Secrets": lambda: agent.get("/api/v1/secrets"),
        "read ConfigMaps": lambda: agent.get("/api/v1/configmaps"),
        "read Pods": lambda: agent.get("/api/v1/pods"),
        "create a Service": lambda: agent.create({"apiVersion": "v1", "kind": "Service",
                                                  "metadata": {"name": "kpa-rbac", "namespace": "default"},
                                                  "spec": {"ports": [{"port": 80}]}}),
        "delete an EndpointSlice": lambda: agent.request(
            "DELETE", "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices/kubernetes"),
        "patch a Node": lambda: agent.request("PATCH", "/api/v1/nodes/rbac-check", {"metadata": {}},
                                              content_type="application/merge-patch+json"),
    }
    for what, call in refused.items():
        with pytest.raises(ApiError) as err:
            call()
        assert err.value.status == 403, f"the agent may {what}: HTTP {err.value.status}"
