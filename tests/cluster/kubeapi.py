"""A small Kubernetes REST client for the test harness (admin and bootstrap work only).

The agent under test uses its own client; the harness talks plain JSON over HTTPS so it never
depends on the official client's models, and every request it makes is visible in one place.
"""

from __future__ import annotations

import json
import ssl
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import urllib3
import yaml

JSON = dict[str, Any]


class ApiError(RuntimeError):
    def __init__(self, method: str, path: str, status: int, body: str) -> None:
        self.status = status
        self.body = body
        try:
            self.reason = json.loads(body).get("reason", "")
        except ValueError:
            self.reason = ""
        super().__init__(f"{method} {path} -> HTTP {status}: {body[:400]}")


# kind -> (collection path template, namespaced); enough for the manifests the harness applies.
COLLECTIONS: dict[str, tuple[str, bool]] = {
    "Namespace": ("/api/v1/namespaces", False),
    "ServiceAccount": ("/api/v1/namespaces/{ns}/serviceaccounts", True),
    "ConfigMap": ("/api/v1/namespaces/{ns}/configmaps", True),
    "Service": ("/api/v1/namespaces/{ns}/services", True),
    "Pod": ("/api/v1/namespaces/{ns}/pods", True),
    "Node": ("/api/v1/nodes", False),
    "EndpointSlice": ("/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices", True),
    "ServiceCIDR": ("/apis/networking.k8s.io/v1/servicecidrs", False),
    "DaemonSet": ("/apis/apps/v1/namespaces/{ns}/daemonsets", True),
    "Deployment": ("/apis/apps/v1/namespaces/{ns}/deployments", True),
    "ClusterRole": ("/apis/rbac.authorization.k8s.io/v1/clusterroles", False),
    "ClusterRoleBinding": ("/apis/rbac.authorization.k8s.io/v1/clusterrolebindings", False),
    "Role": ("/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/roles", True),
    "RoleBinding": ("/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/rolebindings", True),
    "FlowSchema": ("/apis/flowcontrol.apiserver.k8s.io/v1/flowschemas", False),
    "PriorityLevelConfiguration": ("/apis/flowcontrol.apiserver.k8s.io/v1/prioritylevelconfigurations", False),
}


def collection(kind: str, namespace: str = "") -> str:
    try:
        tmpl, namespaced = COLLECTIONS[kind]
    except KeyError:
        raise ValueError(f"the harness does not know where {kind} objects live; add it to COLLECTIONS") from None
    if namespaced and not namespace:
        raise ValueError(f"{kind} is namespaced: give a namespace")
    return tmpl.format(ns=quote(namespace))


class Api:
    """HTTPS + JSON to one apiserver, with a client certificate or a bearer token."""

    def __init__(self, server: str, ca: str, cert: str | None = None, key: str | None = None,
                 token: str | None = None) -> None:
        self.server = server.rstrip("/")
        ctx = ssl.create_default_context(cafile=ca)
        if cert and key:
            ctx.load_cert_chain(cert, key)
        self._token = token
        self._pool = urllib3.PoolManager(ssl_context=ctx, maxsize=8, retries=False)

    def request(self, method: str, path: str, body: Any = None, *, query: dict[str, Any] | None = None,
                content_type: str = "application/json", timeout: float = 30) -> JSON:
        url = self.server + path + (("?" + urlencode(query)) if query else "")
        headers = {"Accept": "application/json", "User-Agent": "kpa-test-harness"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = content_type
        if self._token:
            headers["Authorization"] = "Bearer " + self._token
        resp = self._pool.request(method, url, body=data, headers=headers,
                                  timeout=urllib3.Timeout(connect=5, read=timeout))
        text = resp.data.decode(errors="replace")
        if resp.status >= 300:
            raise ApiError(method, path, resp.status, text)
        return json.loads(text) if text.strip().startswith("{") else {"raw": text}

    def get(self, path: str, **query: Any) -> JSON:
        return self.request("GET", path, query=query or None)

    def post(self, path: str, body: JSON) -> JSON:
        return self.request("POST", path, body)

    def put(self, path: str, body: JSON) -> JSON:
        return self.request("PUT", path, body)

    def patch(self, path: str, body: Any, kind: str = "merge", query: dict[str, Any] | None = None) -> JSON:
        ctype = {"merge": "application/merge-patch+json", "strategic": "application/strategic-merge-patch+json",
                 "json": "application/json-patch+json", "apply": "application/apply-patch+yaml"}[kind]
        return self.request("PATCH", path, body, content_type=ctype, query=query)

    # -- discovery: where any kind lives (for manifests with kinds COLLECTIONS does not list) -------

    def resource_for(self, api_version: str, kind: str) -> tuple[str, bool] | None:
        """(collection path template with {ns}, namespaced) from API discovery, None if the API
        server does not serve this kind (e.g. a CRD that is not installed)."""
        cache: dict[str, tuple[str, bool] | None] = self.__dict__.setdefault("_discovery", {})
        key = f"{api_version}/{kind}"
        if key not in cache:
            base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
            found = None
            try:
                doc = self.get(base)
            except ApiError as exc:
                if exc.status != 404:
                    raise
                doc = {}
            for r in doc.get("resources", []):
                if r.get("kind") == kind and "/" not in r.get("name", ""):
                    ns_part = "/namespaces/{ns}" if r.get("namespaced") else ""
                    found = (f"{base}{ns_part}/{r['name']}", bool(r.get("namespaced")))
                    break
            cache[key] = found
        return cache[key]

    def object_path(self, obj: JSON, namespace: str = "") -> str:
        found = self.resource_for(obj["apiVersion"], obj["kind"])
        if found is None:
            raise ValueError(f"the API server does not serve {obj['apiVersion']} {obj['kind']}")
        tmpl, namespaced = found
        ns = obj.get("metadata", {}).get("namespace") or namespace
        if namespaced and not ns:
            raise ValueError(f"{obj['kind']}/{obj['metadata'].get('name')} is namespaced but has no namespace")
        return tmpl.format(ns=quote(ns)) + "/" + quote(obj["metadata"]["name"])

    def apply(self, obj: JSON, *, dry_run: bool = False, namespace: str = "",
              field_manager: str = "kpa-harness") -> JSON:
        """Server-side apply (PATCH application/apply-patch+yaml; JSON is YAML), optionally dryRun=All.
        The API server validates the object completely (schema, unknown fields as errors), so a typo
        in a manifest fails here."""
        query: dict[str, Any] = {"fieldManager": field_manager, "force": "true", "fieldValidation": "Strict"}
        if dry_run:
            query["dryRun"] = "All"
        return self.patch(self.object_path(obj, namespace), obj, kind="apply", query=query)

    def delete(self, path: str, grace: int | None = None, missing_ok: bool = True) -> JSON:
        body = {"kind": "DeleteOptions", "apiVersion": "v1"}
        if grace is not None:
            body["gracePeriodSeconds"] = grace  # type: ignore[assignment]
        try:
            return self.request("DELETE", path, body)
        except ApiError as exc:
            if missing_ok and exc.status == 404:
                return {}
            raise

    def create(self, obj: JSON, exist_ok: bool = False) -> JSON:
        path = collection(obj["kind"], obj.get("metadata", {}).get("namespace", ""))
        try:
            return self.post(path, obj)
        except ApiError as exc:
            if exist_ok and exc.status == 409:
                return self.get(f"{path}/{quote(obj['metadata']['name'])}")
            raise

    def ready(self) -> bool:
        try:
            return bool(self.request("GET", "/readyz", timeout=5).get("raw", "").strip() == "ok")
        except Exception:
            return False

    def wait_ready(self, timeout: float = 60) -> None:
        end = time.monotonic() + timeout
        while not self.ready():
            if time.monotonic() > end:
                raise TimeoutError(f"apiserver {self.server} not ready after {timeout:.0f}s")
            time.sleep(0.2)


def apply_manifest_file(api: Api, path: Path) -> list[str]:
    """Create every object of a YAML file (already existing ones are left alone). Returns kind/name."""
    done = []
    for doc in yaml.safe_load_all(path.read_text()):
        if not doc:
            continue
        api.create(doc, exist_ok=True)
        done.append(f"{doc['kind']}/{doc['metadata']['name']}")
    return done


def write_kubeconfig(path: Path, server: str, ca: str, *, user: str, token: str | None = None,
                     cert: str | None = None, key: str | None = None) -> Path:
    creds: JSON = {"token": token} if token else {"client-certificate": cert, "client-key": key}
    cfg = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "kpa-test", "cluster": {"server": server, "certificate-authority": ca}}],
        "users": [{"name": user, "user": creds}],
        "contexts": [{"name": "kpa-test", "context": {"cluster": "kpa-test", "user": user}}],
        "current-context": "kpa-test",
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    path.chmod(0o600)
    return path
