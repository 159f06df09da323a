"""List and watch Services, EndpointSlices, this Node and ServiceCIDRs from the Kubernetes API.

The official client supplies config, auth and TLS; list and watch bodies are decoded straight into
the lean records with msgspec (one object at a time, so one bad object is skipped, not the list).
An API outage keeps the programmed rules (nothing is deleted until a new list says so) and retries
with backoff; a watch that expires (410 Gone) relists without flushing.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import msgspec
import urllib3
from kubernetes import client, config

from agent.files import FileError, documents
from agent.model.records import HEADLESS_LABEL, SERVICE_PROXY_NAME_LABEL, DecodeError, Record, from_json
from agent.model.serviceport import NamespacedName, Problem
from agent.sources.base import Sink, key_of

log = logging.getLogger("agent.source.kube")


@dataclass(frozen=True, slots=True)
class Resource:
    kind: str
    path: str  # collection path
    field_selector: str = ""
    label_selector: str = ""
    # optional: an API server that does not serve it (404) or does not let us read it (403) counts
    # as an empty list (logged once), so the agent still starts; retried every OPTIONAL_RETRY s
    optional: bool = False

    def selectors(self) -> dict[str, str]:
        """The list/watch query parameters that narrow what the API server sends."""
        q: dict[str, str] = {}
        if self.field_selector:
            q["fieldSelector"] = self.field_selector
        if self.label_selector:
            q["labelSelector"] = self.label_selector
        return q


# kube-proxy's selector: the slices of headless Services and of Services handed to another proxy
ENDPOINTSLICE_SELECTOR = f"!{SERVICE_PROXY_NAME_LABEL},!{HEADLESS_LABEL}"


class _ListMeta(msgspec.Struct, rename="camel", frozen=True):
    resource_version: str = ""
    continue_: str = msgspec.field(default="", name="continue")


class _List(msgspec.Struct):
    metadata: _ListMeta = _ListMeta()
    items: list[msgspec.Raw] = []


class _Status(msgspec.Struct):
    code: int = 0
    reason: str = ""
    message: str = ""


class _Event(msgspec.Struct):
    type: str = ""
    object: msgspec.Raw = msgspec.Raw(b"{}")


class _BookmarkMeta(msgspec.Struct, rename="camel", frozen=True):
    resource_version: str = ""


class _Bookmark(msgspec.Struct):
    metadata: _BookmarkMeta = _BookmarkMeta()


class Gone(Exception):
    """The watch's resourceVersion is too old (410): relist."""


class ApiError(Exception):
    def __init__(self, message: str, status: int = 0, retry_after: float = 0.0) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after  # seconds the API asked us to wait (429/503 Retry-After), at most 60


def _retry_after(value: str | None) -> float:
    try:
        return min(max(float(value or 0), 0.0), 60.0)
    except ValueError:  # an HTTP date: not sent by kube-apiserver
        return 0.0


# what the agent does without an optional resource
_WITHOUT = {
    "ServiceCIDR": "traffic to an unallocated address of the service CIDRs is not dropped in nftables mode; "
                   "grant list/watch on servicecidrs.networking.k8s.io, as the manifests do",
}


def load_client_config(kubeconfig: str | None) -> client.Configuration:
    """The API client's configuration from --kubeconfig, else in-cluster; FileError (naming the
    file, and the line when it does not parse) when it cannot be had."""
    cfg = client.Configuration()
    try:
        if kubeconfig:
            documents(Path(kubeconfig), "--kubeconfig")  # a syntax error, with its line, before the client's
            config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)  # type: ignore[no-untyped-call]
        else:
            config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
    except config.ConfigException as exc:
        where = f"--kubeconfig {kubeconfig}" if kubeconfig else "in-cluster configuration (no --kubeconfig)"
        raise FileError(f"{where}: {exc}") from None
    return cfg


def api_headers(cfg: client.Configuration, **extra: str) -> dict[str, str]:
    """Request headers for the API: JSON, our user agent, and the bearer token (refreshed first:
    in-cluster tokens rotate)."""
    headers = {"Accept": "application/json", "User-Agent": "kube-proxy-agent", **extra}
    if cfg.refresh_api_key_hook is not None:
        cfg.refresh_api_key_hook(cfg)
    token = cfg.get_api_key_with_prefix("authorization") or cfg.get_api_key_with_prefix("BearerToken")
    if token:
        headers["Authorization"] = token
    return headers


class KubeSource:
    PAGE = 500
    WATCH_SECONDS = 300
    OPTIONAL_RETRY = 300.0

    def __init__(self, cfg: client.Configuration, sink: Sink, node_name: str) -> None:
        self.cfg = cfg
        self.sink = sink
        self.resources = [
            Resource("Service", "/api/v1/services"),
            # Like kube-proxy, the slices of Services no proxy of ours programs (headless ones, those
            # labelled for another proxy: the EndpointSlice controller copies both labels onto
            # their slices) are filtered by the API server and never sent; a slice whose label goes
            # arrives as ADDED. Services themselves all come, so `explain` can say why one is skipped.
            Resource("EndpointSlice", "/apis/discovery.k8s.io/v1/endpointslices",
                     label_selector=ENDPOINTSLICE_SELECTOR),
            Resource("Node", "/api/v1/nodes", f"metadata.name={node_name}"),
            Resource("ServiceCIDR", "/apis/networking.k8s.io/v1/servicecidrs", optional=True),
        ]
        self._pool = client.ApiClient(cfg).rest_client.pool_manager
        self._stop = threading.Event()
        self._responses: set[Any] = set()
        self._lock = threading.Lock()
        self.on_error: list[Any] = []  # callbacks(resource kind) for metrics
        self.on_state: list[Any] = []  # callbacks(resource kind, state in words) for `status`
        # An outage is one streak: its first failed call is logged (warning), the rest are counted
        # (metric) and logged at debug, and the first success after the last failing kind
        # recovers ends it with one line. kind -> failed calls in the current streak.
        self._failing: dict[str, int] = {}
        self._streak_started = 0.0
        self._streak_failures = 0

    def _headers(self) -> dict[str, str]:
        return api_headers(self.cfg)

    def _get(self, path: str, query: dict[str, str], stream: bool, read_timeout: float) -> Any:
        url = f"{self.cfg.host}{path}?{urlencode(query)}"
        resp = self._pool.request(
            "GET", url, headers=self._headers(), preload_content=not stream,
            timeout=urllib3.Timeout(connect=10, read=read_timeout),
            retries=False,  # our own backoff retries, logged once per streak (urllib3's would log each)
        )
        if resp.status == 410:
            raise Gone()
        if resp.status != 200:
            body = resp.data if not stream else resp.read(2048)
            msg = body.decode(errors="replace")[:300]
            hint = " (check the ClusterRole in manifests/ grants list/watch)" if resp.status == 403 else ""
            raise ApiError(f"GET {path} returned HTTP {resp.status}: {msg}{hint}", resp.status,
                           _retry_after(resp.headers.get("Retry-After")))
        return resp

    def _decode(self, kind: str, raw: bytes) -> Record | None:
        try:
            return from_json(kind, raw)
        except DecodeError as exc:
            self.sink.bad_object(Problem(kind, "?", "decode_error", str(exc)))
            return None

    def list(self, res: Resource) -> tuple[dict[NamespacedName, Record], str]:
        records: dict[NamespacedName, Record] = {}
        cont = ""
        while True:
            q = {"limit": str(self.PAGE)}
            if cont:
                q["continue"] = cont
            q.update(res.selectors())
            resp = self._get(res.path, q, stream=False, read_timeout=60)
            page = msgspec.json.decode(resp.data, type=_List)
            for raw in page.items:
                rec = self._decode(res.kind, bytes(raw))
                if rec is not None:
                    records[key_of(rec)] = rec
            cont = page.metadata.continue_
            if not cont:
                return records, page.metadata.resource_version

    def _events(self, res: Resource, rv: str) -> Iterator[tuple[str, bytes]]:
        q = {"watch": "1", "resourceVersion": rv, "allowWatchBookmarks": "true",
             "timeoutSeconds": str(self.WATCH_SECONDS)}
        q.update(res.selectors())
        resp = self._get(res.path, q, stream=True, read_timeout=self.WATCH_SECONDS + 30)
        self._recovered(res.kind)  # the watch resumed: the API answers this kind again
        with self._lock:
            self._responses.add(resp)
        try:
            buf = b""
            for chunk in resp.stream(65536, decode_content=True):
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if line.strip():
                        ev = msgspec.json.decode(line, type=_Event)
                        yield ev.type, bytes(ev.object)
        finally:
            with self._lock:
                self._responses.discard(resp)
            resp.release_conn()

    def watch_forever(self, res: Resource) -> None:
        backoff = 0.5
        rv = ""
        listed = absent = False  # absent: an optional resource the API does not serve or let us read
        while not self._stop.is_set():
            try:
                if not rv:
                    records, rv = self.list(res)
                    self.sink.replace_all(res.kind, records)
                    self._state(res.kind, f"listed {len(records)}, watching")
                    self._recovered(res.kind)
                    backoff = 0.5  # the API answers again: a later outage starts from a short wait
                    if absent:
                        log.info("optional resource readable again kind=%s objects=%d", res.kind, len(records))
                    listed, absent = True, False
                for typ, raw in self._events(res, rv):
                    if typ == "ERROR":
                        status = msgspec.json.decode(raw, type=_Status)
                        if status.code == 410:
                            raise Gone()
                        raise ApiError(f"watch {res.path} error {status.code}: {status.message}")
                    if typ == "BOOKMARK":
                        rv = msgspec.json.decode(raw, type=_Bookmark).metadata.resource_version or rv
                        continue
                    rec = self._decode(res.kind, raw)
                    if rec is None:
                        continue
                    rv = rec.metadata.resource_version or rv
                    self.sink.apply(res.kind, key_of(rec), None if typ == "DELETED" else rec)
                backoff = 0.5  # a watch that ended normally (timeout): resume from rv
            except Gone:
                log.info("watch expired (410 Gone); relisting without flushing rules kind=%s", res.kind)
                rv = ""
            except ApiError as exc:
                if not (res.optional and exc.status in (403, 404)):
                    self._failed(res, exc, backoff)
                    backoff = min(backoff * 2, 30.0)
                    rv = ""
                    continue
                # Never listed: start without it (an empty list). Listed before (an API server
                # restarting answers 403 for a while): keep what was listed. Retry, slower and slower.
                self._recovered(res.kind)  # the API answers (no to this kind): not an outage of it
                if not absent:
                    absent = True
                    self._state(res.kind, f"not readable (HTTP {exc.status}); going on "
                                          f"{'with the last list' if listed else 'without it'}")
                    if not listed:
                        self.sink.replace_all(res.kind, {})
                    log.warning("optional resource not readable kind=%s status=%d; going on %s (%s)", res.kind,
                                exc.status, "with the last list" if listed else "without it",
                                _WITHOUT.get(res.kind, ""))
                backoff = max(backoff, 5.0)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.OPTIONAL_RETRY)
                rv = ""
            except Exception as exc:
                self._failed(res, exc, backoff)
                backoff = min(backoff * 2, 30.0)
                if isinstance(exc, msgspec.DecodeError):
                    rv = ""

    def _state(self, kind: str, state: str) -> None:
        for cb in self.on_state:
            cb(kind, state)

    def _failed(self, res: Resource, exc: Exception, backoff: float) -> None:
        """Count and log a failed call, then wait about `backoff` seconds."""
        if self._stop.is_set():
            return
        for cb in self.on_error:
            cb(res.kind)
        self._state(res.kind, f"failing, retrying: {str(exc)[:200]}")
        delay = max(backoff * (1 + random.random() * 0.2), getattr(exc, "retry_after", 0.0))
        with self._lock:
            first = not self._failing
            self._failing[res.kind] = self._failing.get(res.kind, 0) + 1
            if first:
                self._streak_started, self._streak_failures = time.monotonic(), 0
            self._streak_failures += 1
        if first:
            log.warning("API call failed kind=%s error=%r; rules stay in place, retrying in %.1fs (further "
                        "failures until the API answers again are counted in kubeproxyagent_api_errors_total "
                        "and logged at debug)", res.kind, str(exc)[:500], delay)
        else:
            log.debug("API call failed again kind=%s error=%r; retrying in %.1fs", res.kind, str(exc)[:500], delay)
        self._stop.wait(delay)

    def _recovered(self, kind: str) -> None:
        """A call of `kind` succeeded: the end of its part of a streak; the last kind to recover
        closes the streak with one line."""
        with self._lock:
            if kind not in self._failing:
                return
            failures = self._streak_failures
            del self._failing[kind]
            done = not self._failing
        if done:
            log.info("API calls succeed again after failures=%d over %.1fs; the API answers every list and watch",
                     failures, time.monotonic() - self._streak_started)

    def start(self) -> None:
        for res in self.resources:
            threading.Thread(target=self.watch_forever, args=(res,), name=f"watch-{res.kind}",
                             daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            for resp in list(self._responses):
                with contextlib.suppress(Exception):  # best effort during shutdown
                    resp.shutdown() if hasattr(resp, "shutdown") else resp.close()

