"""--source: Services, EndpointSlices and Nodes from a YAML/JSON file or a directory of them, in the
shape the API serves (what `kubectl get -o yaml` prints). Other kinds are ignored; an object that
cannot be decoded, or a file that cannot be parsed, is a Problem, never an exception."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import pytest

from agent.model.records import EndpointSlice, Node, Record, Service
from agent.model.serviceport import NamespacedName, Problem
from agent.sources.file import FileSource, load

SERVICE = """\
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80}]
"""

SLICE = """\
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abc
  namespace: shop
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
endpoints:
- addresses: [10.244.1.5]
ports: [{name: http, port: 8080}]
"""

NODE = """\
apiVersion: v1
kind: Node
metadata:
  name: node-a
  labels: {topology.kubernetes.io/zone: zone-a}
"""

DEPLOYMENT = """\
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: shop}
spec: {replicas: 2}
"""

WEB = NamespacedName("shop", "web")


def names(records: Mapping[str, Mapping[NamespacedName, Record]]) -> dict[str, list[str]]:
    return {kind: sorted(str(k) for k in recs) for kind, recs in records.items() if kind != "ServiceCIDR" or recs}


def test_multi_document_yaml(tmp_path: Path) -> None:
    """One file, several documents separated by ---, as `kubectl get svc,endpointslice,node -o yaml`
    piped through yq would give; empty documents are fine."""
    path = tmp_path / "cluster.yaml"
    path.write_text("---\n".join([SERVICE, SLICE, NODE, ""]))
    records, problems = load(path)
    assert problems == []
    assert names(records) == {"Service": ["shop/web"], "EndpointSlice": ["shop/web-abc"], "Node": ["/node-a"]}
    svc = records["Service"][WEB]
    assert isinstance(svc, Service)
    assert svc.spec.cluster_ip == "10.96.0.10"
    es = records["EndpointSlice"][NamespacedName("shop", "web-abc")]
    assert isinstance(es, EndpointSlice)
    assert es.endpoints is not None
    assert es.endpoints[0].addresses == ["10.244.1.5"]
    node = records["Node"][NamespacedName("", "node-a")]
    assert isinstance(node, Node)
    assert node.metadata.labels["topology.kubernetes.io/zone"] == "zone-a"


def test_kind_list(tmp_path: Path) -> None:
    """`kubectl get svc,endpointslices -o yaml` prints one `kind: List` with the objects as items."""
    items = "\n".join("- " + doc.replace("\n", "\n  ").rstrip() for doc in (SERVICE, SLICE))
    path = tmp_path / "list.yaml"
    path.write_text(f"apiVersion: v1\nkind: List\nmetadata: {{resourceVersion: ''}}\nitems:\n{items}\n")
    records, problems = load(path)
    assert problems == []
    assert names(records) == {"Service": ["shop/web"], "EndpointSlice": ["shop/web-abc"], "Node": []}


def test_empty_list(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("apiVersion: v1\nkind: List\nitems: null\n")
    assert load(path) == ({"Service": {}, "EndpointSlice": {}, "Node": {}, "ServiceCIDR": {}}, [])


def test_directory_of_yaml_yml_and_json(tmp_path: Path) -> None:
    """A directory (say, a mounted ConfigMap): every .yaml, .yml and .json file below it, sub-directories
    included; other files are not read."""
    (tmp_path / "services").mkdir()
    (tmp_path / "services" / "web.yaml").write_text(SERVICE)
    (tmp_path / "slices.yml").write_text(SLICE)
    db = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "db", "namespace": "shop"},
          "spec": {"clusterIP": "10.96.0.20", "ports": [{"port": 5432}]}}
    (tmp_path / "db.json").write_text(json.dumps(db))
    (tmp_path / "README.txt").write_text("kind: Service\nthis: [is not read")
    records, problems = load(tmp_path)
    assert problems == []
    assert names(records) == {"Service": ["shop/db", "shop/web"], "EndpointSlice": ["shop/web-abc"], "Node": []}


def test_unknown_kinds_are_ignored(tmp_path: Path) -> None:
    """Deployments, Pods, a ServiceAccount and a document without a kind may share the file."""
    path = tmp_path / "app.yaml"
    path.write_text("---\n".join([DEPLOYMENT, SERVICE, "kind: Pod\nmetadata: {name: p}\n", "just: a map\n",
                                  "- a\n- list\n", "a scalar\n"]))
    records, problems = load(path)
    assert problems == []
    assert names(records) == {"Service": ["shop/web"], "EndpointSlice": [], "Node": []}


def test_undecodable_object_is_a_problem_and_the_rest_loads(tmp_path: Path) -> None:
    """A Service whose ports is a string, not a list: that one object is reported and skipped."""
    bad = "apiVersion: v1\nkind: Service\nmetadata: {name: bad, namespace: shop}\nspec: {ports: '80'}\n"
    path = tmp_path / "mixed.yaml"
    path.write_text("---\n".join([bad, SERVICE, SLICE]))
    records, problems = load(path)
    assert names(records) == {"Service": ["shop/web"], "EndpointSlice": ["shop/web-abc"], "Node": []}
    assert [(p.kind, p.object, p.reason) for p in problems] == [("Service", str(path), "decode_error")]
    assert "shop/bad" in problems[0].detail
    assert "$.spec.ports" in problems[0].detail


def test_unparseable_yaml_is_a_problem_and_other_files_load(tmp_path: Path) -> None:
    (tmp_path / "a-broken.yaml").write_text("kind: Service\nmetadata: {name: [unclosed\n")
    (tmp_path / "b-good.yaml").write_text(SERVICE)
    records, problems = load(tmp_path)
    assert names(records)["Service"] == ["shop/web"]
    assert [(p.kind, p.object, p.reason) for p in problems] == [
        ("File", str(tmp_path / "a-broken.yaml"), "unreadable")]


def test_file_that_is_not_utf8_is_a_problem(tmp_path: Path) -> None:
    (tmp_path / "latin1.yaml").write_bytes(b"kind: Service\nmetadata: {name: caf\xe9, namespace: shop}\n")
    (tmp_path / "web.yaml").write_text(SERVICE)
    records, problems = load(tmp_path)
    assert names(records)["Service"] == ["shop/web"]
    assert [p.reason for p in problems] == ["unreadable"]


def test_same_object_twice_the_last_one_wins(tmp_path: Path) -> None:
    path = tmp_path / "twice.yaml"
    path.write_text("---\n".join([SERVICE, SERVICE.replace("10.96.0.10", "10.96.0.11")]))
    records, _ = load(path)
    svc = records["Service"][WEB]
    assert isinstance(svc, Service)
    assert svc.spec.cluster_ip == "10.96.0.11"


# -- FileSource ------------------------------------------------------------------------------


class RecordingSink:
    def __init__(self) -> None:
        self.replaced: dict[str, list[str]] = {}
        self.problems: list[Problem] = []

    def apply(self, kind: str, key: NamespacedName, rec: Record | None) -> None:
        raise AssertionError("a file source replaces whole sets, it never applies single objects")

    def replace_all(self, kind: str, records: Mapping[NamespacedName, Record]) -> None:
        self.replaced[kind] = sorted(str(k) for k in records)

    def bad_object(self, problem: Problem) -> None:
        self.problems.append(problem)


def test_file_source_replaces_every_kind_and_reports_problems(tmp_path: Path) -> None:
    """Each load is a full list of every kind (so objects removed from the files are deleted), and
    problems go to the sink to be logged and counted."""
    (tmp_path / "objects.yaml").write_text("---\n".join([SERVICE, SLICE]))
    (tmp_path / "broken.yaml").write_text("{")
    sink = RecordingSink()
    FileSource(str(tmp_path), sink).load_once()
    assert sink.replaced == {"Service": ["shop/web"], "EndpointSlice": ["shop/web-abc"], "Node": [], "ServiceCIDR": []}
    assert [p.reason for p in sink.problems] == ["unreadable"]


def test_a_one_shot_load_keeps_no_records(tmp_path: Path) -> None:
    """--once, render and explain load once: the records go once applied (the sink has them), a
    watching source keeps them for its reloads."""
    (tmp_path / "objects.yaml").write_text("---\n".join([SERVICE, SLICE]))
    sink = RecordingSink()
    once = FileSource(str(tmp_path), sink)
    once.check()
    once.load_once(keep=False)
    assert sink.replaced["Service"] == ["shop/web"] and sink.replaced["EndpointSlice"] == ["shop/web-abc"]
    assert once._parsed == {}
    watching = FileSource(str(tmp_path), RecordingSink())
    watching.load_once()
    assert len(watching._parsed) == 1


def test_file_source_check_names_a_missing_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="--source"):
        FileSource(str(tmp_path / "nope"), RecordingSink()).check()


def test_a_file_broken_at_run_time_keeps_its_last_good_objects(tmp_path: Path) -> None:
    """At start-up a file that does not parse is an error naming it (check); later, an edit that
    breaks it is reported once and its objects stay, while the other files' changes still load."""
    from agent.files import FileError

    (tmp_path / "web.yaml").write_text("---\n".join([SERVICE, SLICE]))
    (tmp_path / "node.json").write_text(json.dumps({"kind": "List", "items": []}))
    sink = RecordingSink()
    src = FileSource(str(tmp_path), sink)
    src.check()
    src.load_once()
    assert sink.replaced["Service"] == ["shop/web"]
    (tmp_path / "web.yaml").write_text(SERVICE + "spec: {ports: [unclosed\n")
    node = {"kind": "Node", "metadata": {"name": "node-a"}}
    (tmp_path / "node.json").write_text(json.dumps({"kind": "List", "items": [node]}))
    src.load_once()
    assert sink.replaced["Service"] == ["shop/web"] and sink.replaced["EndpointSlice"] == ["shop/web-abc"]
    assert sink.replaced["Node"] == ["/node-a"]  # cluster-scoped: no namespace
    assert [(p.object, p.reason) for p in sink.problems] == [(str(tmp_path / "web.yaml"), "unreadable")]
    assert "web.yaml: line 8, column 1" in sink.problems[0].detail
    with pytest.raises(FileError, match=r"--source .*web.yaml: line 8"):
        FileSource(str(tmp_path), RecordingSink()).check()
    (tmp_path / "web.yaml").write_text(SLICE)
    src.load_once()
    assert sink.replaced["Service"] == [] and sink.replaced["EndpointSlice"] == ["shop/web-abc"]


def test_json_is_decoded_as_json_and_names_the_line_of_an_error(tmp_path: Path) -> None:
    doc = {"kind": "List", "items": [{"apiVersion": "v1", "kind": "Service",
                                      "metadata": {"name": "web", "namespace": "shop"},
                                      "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}}]}
    (tmp_path / "a.json").write_text(json.dumps(doc, indent=1))
    records, problems = load(tmp_path)
    assert names(records)["Service"] == ["shop/web"] and not problems
    (tmp_path / "a.json").write_text(json.dumps(doc, indent=1).replace('"web"', "web"))
    _, problems = load(tmp_path)
    assert "a.json: line 8: not valid JSON" in problems[0].detail


def test_json_objects_are_decoded_from_their_own_bytes(tmp_path: Path) -> None:
    """A JSON List is decoded item by item from its bytes (no dicts for the whole file): items that
    are not objects or not of our kinds are left out, a bad item is one problem naming its field,
    and a file holding one object (not a List) works the same."""
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "shop"},
           "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}}
    bad = {**svc, "metadata": {"name": "bad", "namespace": "shop"}, "spec": {"ports": [{"port": "x"}]}}
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}}
    (tmp_path / "a.json").write_text(json.dumps({"kind": "List", "items": [svc, 7, pod, bad, None]}))
    records, problems = load(tmp_path)
    assert names(records)["Service"] == ["shop/web"]
    assert len(problems) == 1 and "$.spec.ports[0].port" in problems[0].detail
    (tmp_path / "a.json").write_text(json.dumps(svc))
    records, problems = load(tmp_path)
    assert names(records)["Service"] == ["shop/web"] and not problems
    (tmp_path / "a.json").write_text("[1, 2]")  # JSON, but nothing of ours
    records, problems = load(tmp_path)
    assert not any(records.values()) and not problems
    (tmp_path / "a.json").write_text("[1,\n x]")  # not even JSON: named with its line
    _, problems = load(tmp_path)
    assert len(problems) == 1 and "a.json: line 2: not valid JSON" in problems[0].detail
