"""An HTTPS reverse proxy in front of kube-apiserver, for one client (the agent under test): it
passes every request through, watch streams included, until a test tells it to answer an HTTP
error instead (500, or 429 with Retry-After, as an overloaded apiserver does). Open streams are
cut when the errors start, so the client has to ask again and meets them.

    proxy = FaultProxy(cp.server, cp.ca, cert, key, host=cp.api_ip).start()
    ... point the client's kubeconfig at proxy.url ...
    proxy.fail_with = 429   # every request now: 429, Retry-After: 1
    proxy.fail_with = 0     # passes through again
"""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import urllib3

_HOP = {"host", "connection", "content-length", "transfer-encoding", "keep-alive"}
_REASONS = {429: "TooManyRequests", 500: "InternalError", 503: "ServiceUnavailable"}


class FaultProxy:
    def __init__(self, upstream: str, ca: str, cert: str, key: str, host: str) -> None:
        self.upstream = upstream.rstrip("/")
        self._pool = urllib3.PoolManager(ssl_context=ssl.create_default_context(cafile=ca), maxsize=16,
                                         retries=False)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        self._ctx = ctx
        self._host = host
        self._fail_with = 0
        self.answered: dict[int, int] = {}  # HTTP status -> requests answered with it by the proxy itself
        self._streams: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"https://{self._host}:{self._server.server_address[1]}"

    @property
    def fail_with(self) -> int:
        return self._fail_with

    @fail_with.setter
    def fail_with(self, status: int) -> None:
        """0: pass through; an HTTP status: answer every request with it, and cut open streams."""
        self._fail_with = status
        if status:
            with self._lock:
                streams = list(self._streams)
            for s in streams:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def start(self) -> FaultProxy:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_: Any) -> None:
                pass

            def _any(self) -> None:
                proxy.handle(self)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _any

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def get_request(self) -> tuple[socket.socket, Any]:
                sock, addr = super().get_request()
                return proxy._ctx.wrap_socket(sock, server_side=True), addr

        self._server = Server((self._host, 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def close(self) -> None:
        self.fail_with = 599  # cut every stream
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def handle(self, req: BaseHTTPRequestHandler) -> None:
        length = int(req.headers.get("Content-Length") or 0)
        body = req.rfile.read(length) if length else None
        status = self._fail_with
        if status:
            self.answered[status] = self.answered.get(status, 0) + 1
            data = json.dumps({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                               "message": f"injected by the test's fault proxy (HTTP {status})",
                               "reason": _REASONS.get(status, "InternalError"), "code": status}).encode()
            req.send_response(status)
            req.send_header("Content-Type", "application/json")
            req.send_header("Content-Length", str(len(data)))
            if status in (429, 503):
                req.send_header("Retry-After", "1")
            req.end_headers()
            req.wfile.write(data)
            return
        headers = {k: v for k, v in req.headers.items() if k.lower() not in _HOP}
        try:
            resp = self._pool.request(req.command, self.upstream + req.path, body=body, headers=headers,
                                      preload_content=False, decode_content=False,
                                      timeout=urllib3.Timeout(connect=5, read=None))
        except Exception as exc:  # the apiserver is down: what a client meets then
            req.close_connection = True
            with contextlib.suppress(OSError):
                req.send_error(502, f"upstream: {exc}")
            return
        watch = "watch=true" in req.path or "watch=1" in req.path
        req.send_response(resp.status)
        for k, v in resp.headers.items():
            if k.lower() not in _HOP:
                req.send_header(k, v)
        if not watch:
            data = resp.read()
            req.send_header("Content-Length", str(len(data)))
            req.end_headers()
            req.wfile.write(data)
            resp.release_conn()
            return
        req.send_header("Transfer-Encoding", "chunked")
        req.end_headers()
        conn = req.connection
        with self._lock:
            self._streams.add(conn)
        try:
            for chunk in resp.stream(65536, decode_content=False):
                if self._fail_with:
                    break
                req.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                req.wfile.flush()
            else:
                req.wfile.write(b"0\r\n\r\n")
        except OSError:
            pass
        finally:
            with self._lock:
                self._streams.discard(conn)
            req.close_connection = True
            resp.release_conn()
