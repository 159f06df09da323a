"""`kube-proxy-agent explain NAMESPACE/NAME` and `kube-proxy-agent status`: ask the agent running on
this node (its metrics address: /explain/..., /status), or with --source work offline from files.
`--probe` adds one real connection from here to each frontend of the Service."""

from __future__ import annotations

import json
import socket
import sys
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import quote

from agent.model.explain import Step, judged


def agent_url(bind: str, path: str) -> str:
    host, _, port = bind.rpartition(":")
    host = host.strip("[]")
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}{path}"


def fetch(url: str, timeout: float = 60) -> dict[str, Any]:
    """GET a JSON answer from the running agent, or raise OSError saying what to do."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            data: dict[str, Any] = json.loads(resp.read())
            return data
    except (urllib.error.URLError, OSError) as exc:
        raise OSError(f"cannot reach the agent at {url} ({exc}); is kube-proxy-agent running on this node with "
                      "this --metrics-bind-address? (or give --source PATH to work offline)") from exc


def explain_path(name: str) -> str:
    ns, _, svc = name.partition("/")
    return f"/explain/{quote(ns)}/{quote(svc)}?output=json"


def probe_step(targets: list[str], timeout: float = 2.0) -> Step:
    """One connection from this node to each frontend: TCP connects; UDP and SCTP are reported as
    not probed (no reply proves nothing without an application protocol)."""
    step = Step("a real connection from this node to each frontend", True)
    for t in targets:
        ip, port_s, proto = t.split()
        port = int(port_s)
        if proto != "TCP":
            step.lines.append(f"{ip}:{port}/{proto}: not probed ({proto} has no handshake to check)")
            continue
        fam = socket.AF_INET6 if ":" in ip else socket.AF_INET
        with socket.socket(fam, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            try:
                s.connect((ip, port))
                step.lines.append(f"{ip}:{port}/TCP: connected (a backend accepted) from {s.getsockname()[0]}")
            except ConnectionRefusedError:
                step.ok = False
                step.lines.append(f"{ip}:{port}/TCP: refused")
            except OSError as exc:
                step.ok = False
                step.lines.append(f"{ip}:{port}/TCP: {'timed out' if isinstance(exc, TimeoutError) else exc}")
    if not step.ok:
        step.problem = "a frontend did not accept a connection from this node"
        step.fix = ("refused: no endpoint (or the backend is not listening on its targetPort); timed out: the "
                    "packet was dropped (a traffic policy, a firewall, or a backend that is not answering)")
    return step


def with_probe(data: dict[str, Any]) -> dict[str, Any]:
    """Insert the probe before the history step, and recompute the verdict."""
    from dataclasses import asdict

    steps = data["steps"]
    step = probe_step(data.get("targets", []))
    at = len(steps) - 1 if steps and steps[-1]["title"] == "recent history" else len(steps)
    steps.insert(at, asdict(step))
    return judged(data)


def emit(data: dict[str, Any], output: str, text: str) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n" if output == "json" else text)
