"""kube-proxy's health semantics: /healthz and /livez, and healthCheckNodePort servers."""

from __future__ import annotations

import json
import logging
import os
import selectors
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

log = logging.getLogger("agent.health")


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ") if ts else ""


class ProxyHealth:
    """Healthy unless a queued update has waited longer than `timeout` without a successful sync."""

    def __init__(self, timeout: float, clock: Callable[[], float] = time.time) -> None:
        self.timeout = timeout
        self._clock = clock
        self._lock = threading.Lock()
        self.last_updated = 0.0
        self._oldest_pending = 0.0
        self.node_deleting = False

    def queued(self) -> None:
        with self._lock:
            if not self._oldest_pending:
                self._oldest_pending = self._clock()

    def updated(self) -> None:
        with self._lock:
            self.last_updated = self._clock()
            self._oldest_pending = 0.0

    def status(self, *, check_node: bool) -> tuple[bool, dict[str, object]]:
        with self._lock:
            now = self._clock()
            healthy = not self._oldest_pending or now - self._oldest_pending <= self.timeout
            body: dict[str, object] = {"lastUpdated": _iso(self.last_updated), "currentTime": _iso(now)}
            if check_node:
                body["nodeEligible"] = not self.node_deleting
                healthy = healthy and not self.node_deleting
            return healthy, body


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        code, body, headers = self.server.respond(self.path)
        data = body.encode()
        self.send_response(code)
        self.send_header("Content-Type", headers.get("Content-Type", "application/json"))
        self.send_header("X-Content-Type-Options", "nosniff")
        for k, v in headers.items():
            if k != "Content-Type":
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        pass


Responder = Callable[[str], tuple[int, str, Mapping[str, str]]]


class _Server(ThreadingHTTPServer):
    """An HTTP server whose loop sleeps until a connection or stop() arrives: no polling (the
    standard serve_forever wakes every poll_interval, which at 10/s per server was most of the
    agent's idle CPU)."""

    daemon_threads = True

    def __init__(self, addr: tuple[str, int], respond: Responder) -> None:
        self.respond = respond
        super().__init__(addr, _Handler)
        self._wake_r, self._wake_w = os.pipe()
        self._stopping = False
        self._done = threading.Event()

    def run(self) -> None:
        with selectors.DefaultSelector() as sel:
            sel.register(self, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            try:
                while not self._stopping:
                    for key, _ in sel.select():
                        if key.fileobj is self and not self._stopping:
                            self.handle_request()  # readable: accepts at once
            finally:
                self._done.set()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping = True
        os.write(self._wake_w, b"x")
        self._done.wait(timeout)
        self.server_close()
        os.close(self._wake_r)
        os.close(self._wake_w)


def serve(addr: tuple[str, int], respond: Responder) -> _Server:
    srv = _Server(addr, respond)
    threading.Thread(target=srv.run, name=f"http-{addr[1]}", daemon=True).start()
    return srv


def _stop(srv: _Server) -> None:
    srv.stop()


def health_responder(health: ProxyHealth, on_code: Callable[[str, int], None]) -> Responder:
    def respond(path: str) -> tuple[int, str, Mapping[str, str]]:
        p = path.split("?", 1)[0]
        if p not in ("/healthz", "/livez"):
            return 404, json.dumps({"error": "not found; try /healthz or /livez"}), {}
        ok, body = health.status(check_node=p == "/healthz")
        code = 200 if ok else 503
        on_code(p, code)
        return code, json.dumps(body), {}

    return respond


@dataclass(frozen=True, slots=True)
class HealthCheckService:
    namespace: str
    name: str
    port: int
    local_endpoints: int


class ServiceHealthServers:
    """One HTTP server per healthCheckNodePort: 200 with the local endpoint count, 503 when there
    is none or when the proxy itself is unhealthy (so load balancers steer away from a node whose
    rules may be stale), like kube-proxy's."""

    def __init__(self, bind_ip: str = "0.0.0.0", proxy_healthy: Callable[[], bool] = lambda: True) -> None:
        self._bind_ip = bind_ip
        self._proxy_healthy = proxy_healthy
        self._servers: dict[int, _Server] = {}
        self._state: dict[int, HealthCheckService] = {}
        self._lock = threading.Lock()

    def update(self, services: Mapping[int, HealthCheckService]) -> None:
        with self._lock:
            self._state = dict(services)
            stopping = [self._servers.pop(port) for port in set(self._servers) - set(services)]
            threads = [threading.Thread(target=_stop, args=(srv,), daemon=True) for srv in stopping]
            for t in threads:  # in parallel: each stop waits for its server's poll interval
                t.start()
            for t in threads:
                t.join()
            for srv in stopping:
                log.info("health check server stopped port=%d", srv.server_address[1])
            for port in set(services) - set(self._servers):
                try:
                    self._servers[port] = serve((self._bind_ip, port), self._responder(port))
                    log.info("health check server started port=%d service=%s/%s", port,
                             services[port].namespace, services[port].name)
                except OSError as exc:
                    log.error("health check server could not listen port=%d error=%r; "
                              "is another process using this healthCheckNodePort?", port, str(exc))

    def _responder(self, port: int) -> Responder:
        def respond(path: str) -> tuple[int, str, Mapping[str, str]]:
            with self._lock:
                svc = self._state.get(port)
            if svc is None:
                return 503, "{}", {}
            healthy = self._proxy_healthy()
            body = {
                "service": {"namespace": svc.namespace, "name": svc.name},
                "localEndpoints": svc.local_endpoints,
                "serviceProxyHealthy": healthy,
            }
            code = 200 if svc.local_endpoints > 0 and healthy else 503
            return code, json.dumps(body), {"X-Load-Balancing-Endpoint-Weight": str(svc.local_endpoints)}

        return respond

    def close(self) -> None:
        self.update({})
