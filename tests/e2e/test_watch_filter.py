"""What the API server sends the agent: like kube-proxy, the EndpointSlices of headless Services and
of Services labelled for another proxy are filtered out server-side (a label selector on the list
and the watch), as labelled by the real EndpointSlice controller; a slice whose label goes away
arrives through the watch. Services all arrive (so `explain` can say why one is skipped)."""

from __future__ import annotations

import threading
from collections.abc import Mapping

import pytest

from agent.model.records import Record
from agent.model.serviceport import NamespacedName, Problem
from agent.sources.kube import KubeSource, load_client_config
from tests.cluster.harness import Harness, wait_until

pytestmark = pytest.mark.e2e
NS = "e2e-watch-filter"
HTTP = [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]


class Seen:
    """A sink keeping which objects of each kind are present, as the API server told us."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.present: dict[str, set[NamespacedName]] = {}

    def apply(self, kind: str, key: NamespacedName, rec: Record | None) -> None:
        with self.lock:
            keys = self.present.setdefault(kind, set())
            (keys.add if rec is not None else keys.discard)(key)

    def replace_all(self, kind: str, records: Mapping[NamespacedName, Record]) -> None:
        with self.lock:
            self.present[kind] = set(records)

    def bad_object(self, problem: Problem) -> None:
        pass

    def slices_of(self, service: str) -> set[str]:
        with self.lock:
            return {k.name for k in self.present.get("EndpointSlice", set())
                    if k.namespace == NS and k.name.startswith(service + "-")}

    def services(self) -> set[str]:
        with self.lock:
            return {k.name for k in self.present.get("Service", set()) if k.namespace == NS}


def test_slices_of_unproxied_services_are_not_sent(harness: Harness) -> None:
    h = harness
    assert h.cp is not None
    h.namespace(NS)
    try:
        h.create_service(NS, "plain", HTTP, selector={"app": "web"})
        h.create_service(NS, "headless", HTTP, selector={"app": "web"}, clusterIP="None")
        h.api.create({"apiVersion": "v1", "kind": "Service",
                      "metadata": {"name": "other", "namespace": NS,
                                   "labels": {"service.kubernetes.io/service-proxy-name": "other-proxy"}},
                      "spec": {"ports": HTTP, "selector": {"app": "web"}}})
        # the EndpointSlice controller makes a slice for each (empty: no pods), labelled from the Service
        for svc in ("plain", "headless", "other"):
            wait_until(lambda svc=svc: h.endpoint_slices(NS, svc), 60, 0.2, f"controller made {svc}'s slice")
        seen = Seen()
        src = KubeSource(load_client_config(str(h.cp.kubeconfigs["agent"])), seen, "no-such-node")
        for res in src.resources[:2]:  # Services and EndpointSlices
            threading.Thread(target=src.watch_forever, args=(res,), daemon=True).start()
        try:
            wait_until(lambda: seen.services() == {"plain", "headless", "other"}, 30, 0.1, "every Service listed")
            wait_until(lambda: seen.slices_of("plain"), 30, 0.1, "plain's slice listed")
            assert not seen.slices_of("headless"), "a headless Service's slice was sent"
            assert not seen.slices_of("other"), "the slice of another proxy's Service was sent"
            # the label goes: the controller relabels the slice, and the watch delivers it
            h.api.patch(h.service_path(NS, "other"),
                        {"metadata": {"labels": {"service.kubernetes.io/service-proxy-name": None}}})
            wait_until(lambda: seen.slices_of("other"), 60, 0.1, "slice delivered once its label went")
        finally:
            src.stop()
    finally:
        h.cleanup_namespace(NS)
