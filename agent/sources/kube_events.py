"""Kubernetes Events about this node's proxy (events.k8s.io/v1), as kube-proxy posts them:
`kubectl get events -n default --field-selector involvedObject.name=NODE` shows when the agent
started and when its rules stopped (and started again) being written.

Posting never blocks the agent: events go through a small bounded queue to one thread; a full queue
drops the event, and an API failure is logged once per reason and counted, never raised.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import msgspec
import urllib3
from kubernetes import client

from agent.sources.kube import api_headers

log = logging.getLogger("agent.events")

CONTROLLER = "kube-proxy-agent"
# Events about cluster-scoped objects (Nodes) live in the "default" namespace, as kubectl expects.
EVENT_NAMESPACE = "default"


def node_event(node: str, type_: str, reason: str, action: str, note: str, now: float) -> dict[str, Any]:
    """An events.k8s.io/v1 Event about Node `node` (pure: the body the API is sent)."""
    stamp = datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return {
        "apiVersion": "events.k8s.io/v1",
        "kind": "Event",
        # client-go's naming: the object's name and the time in hex nanoseconds
        "metadata": {"name": f"{node}.{int(now * 1e9):x}", "namespace": EVENT_NAMESPACE},
        "eventTime": stamp,
        "reportingController": CONTROLLER,
        "reportingInstance": f"{CONTROLLER}-{node}"[:128],
        "action": action,
        "reason": reason,
        # kube-proxy's node reference uses the node name as its UID too
        "regarding": {"apiVersion": "v1", "kind": "Node", "name": node, "uid": node},
        "note": note[:1024],
        "type": type_,
    }


class NodeEventRecorder:
    """Posts Events about one Node. `emit` returns at once."""

    def __init__(self, cfg: client.Configuration, node: str, on_error: Callable[[str], None] | None = None,
                 max_queue: int = 32) -> None:
        self.cfg = cfg
        self.node = node
        self._pool = client.ApiClient(cfg).rest_client.pool_manager
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue(max_queue)
        self._on_error = on_error
        self._failed_reasons: set[str] = set()
        self._thread = threading.Thread(target=self._run, name="events", daemon=True)
        self._thread.start()

    def emit(self, type_: str, reason: str, action: str, note: str) -> None:
        try:
            self._queue.put_nowait(node_event(self.node, type_, reason, action, note, time.time()))
        except queue.Full:
            log.warning("event dropped: queue full reason=%s", reason)

    def close(self, timeout: float = 5.0) -> None:
        """Send what is queued (up to `timeout` seconds), then stop."""
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            return
        self._thread.join(timeout)

    def _post(self, body: dict[str, Any]) -> None:
        url = f"{self.cfg.host}/apis/events.k8s.io/v1/namespaces/{EVENT_NAMESPACE}/events"
        resp = self._pool.request("POST", url, body=msgspec.json.encode(body),
                                  headers=api_headers(self.cfg, **{"Content-Type": "application/json"}),
                                  timeout=urllib3.Timeout(connect=5, read=10), retries=False)
        if resp.status not in (200, 201):
            hint = " (the ClusterRole in manifests/ grants create on events)" if resp.status == 403 else ""
            raise RuntimeError(f"HTTP {resp.status}: {resp.data.decode(errors='replace')[:300]}{hint}")

    def _run(self) -> None:
        while (body := self._queue.get()) is not None:
            reason = str(body["reason"])
            try:
                self._post(body)
                log.info("event posted type=%s reason=%s node=%s", body["type"], reason, self.node)
                self._failed_reasons.discard(reason)
            except Exception as exc:  # never fatal: events are advisory
                if self._on_error is not None:
                    self._on_error("Event")
                if reason not in self._failed_reasons:
                    log.warning("event not posted reason=%s error=%r; the agent goes on without it", reason,
                                str(exc)[:400])
                    self._failed_reasons.add(reason)
