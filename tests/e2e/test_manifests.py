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
