"""What the running agent tells a person: `explain` for one Service (the model's steps, then what
the mode programmed, read from the kernel, and recent history) and `status` for the node. Served
on the metrics address (/explain/NAMESPACE/NAME, /status), so asking costs the API nothing."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from agent.backends.base import Programmed
from agent.health import ProxyHealth, Responder
from agent.model.explain import Explanation, Step, explain, render_text
from agent.model.serviceport import NamespacedName
from agent.model.state import FAMILIES
from agent.sync.loop import SyncLoop


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")[:-4] + "Z" if ts else "never"


def explain_service(loop: SyncLoop, key: NamespacedName, sync_period: float, kernel: bool = True) -> Explanation:
    """Steps 1-2 from the model, 3 from the mode (unless `kernel` is False, offline), 5 history."""
    facts, nodes = loop.snapshot(key)
    e = explain(facts)
    if not facts.ports:
        return e
    if kernel:
        plans = [p for fam in FAMILIES for p in facts.plans.get(fam, {}).values()]
        try:
            prog = loop.backend.programmed(nodes, plans)
        except Exception as exc:  # a read that fails says so; it never breaks the agent
            prog = Programmed([f"could not read the kernel: {exc}"], [f"unreadable: {exc}"])
        step = Step(f"what this node programmed ({loop.backend.name} mode, read from the kernel)",
                    not prog.differences, prog.lines)
        if prog.differences:
            shown = "; ".join(prog.differences[:5]) + (f"; ... ({len(prog.differences)})"
                                                     if len(prog.differences) > 5 else "")
            step.problem = f"the kernel differs from what the agent intends (drift): {shown}"
            last_full = loop.last.get("full")
            when = f"about {_iso(last_full[0] + sync_period)}" if last_full else f"within {sync_period:g}s"
            step.fix = (f"the next periodic sync ({when}; every {sync_period:g}s) repairs it; if it comes back, "
                        "something else on the node edits these rules")
        e.steps.append(step)
    seen = loop.history.get(key)
    hist = Step("recent history", True)
    if seen is None:
        hist.lines.append("no change to it since the agent started (it was programmed by the first sync)")
    else:
        changed, programmed = seen
        hist.lines.append(f"last change seen {_iso(changed)}, programmed {_iso(programmed)} "
                          f"({max(0.0, programmed - changed) * 1000:.0f} ms later)")
    flows = loop.udp_cleaned.get(str(key))
    if flows is not None:
        hist.lines.append(f"UDP conntrack cleanup: {flows[0]} stale flow(s) handed to the mode since start, "
                          f"last {_iso(flows[1])}")
    e.steps.append(hist)
    return e


def status(loop: SyncLoop, health: ProxyHealth) -> dict[str, Any]:
    """The one-screen summary (`kube-proxy-agent status`), as data."""
    counts = loop.counts()
    healthy, body = health.status(check_node=True)
    if not body.get("nodeEligible", True):
        body["reason"] = "the Node is being deleted (load balancers should stop sending traffic here)"
    elif not healthy:
        body["reason"] = (f"a change has waited more than {health.timeout:g}s without a successful sync; see the "
                          "'sync failed' log lines")
    else:
        body["reason"] = "every queued change was programmed in time"
    last = {kind: {"at": _iso(at), "seconds": round(sec, 4), "detail": detail}
            for kind, (at, sec, detail) in loop.last.items()}
    return {
        "mode": loop.backend.name,
        "features": loop.backend.features(),
        "ready": loop.ready.is_set(),
        "health": {"healthy": healthy, **body},
        "syncs": loop.syncs,
        "failedSyncs": loop.failures,
        "lastSync": last,
        "counts": counts,
        "programmed": dict(sorted(loop.totals.items())),
        "driftRepaired": loop.repaired,
        "source": {kind: {"state": state, "since": _iso(at)} for kind, (state, at) in sorted(loop.source.items())},
        "skippedObjects": {f"{kind}/{reason}": n for (kind, reason), n in sorted(loop.skipped.items())},
    }


def render_status(s: dict[str, Any]) -> str:
    h = s["health"]
    feats = ", ".join(f"{k} {v}" for k, v in s.get("features", {}).items())
    lines = [f"mode:      {s['mode']}" + (f" ({feats})" if feats else ""),
             f"health:    {'healthy' if h['healthy'] else 'UNHEALTHY'}: {h.get('reason', '')} "
             f"(last update {h.get('lastUpdated') or 'never'})",
             f"ready:     {'yes' if s['ready'] else 'no: waiting for the first full lists from the source'}",
             f"syncs:     {s['syncs']} done, {s['failedSyncs']} failed"]
    for kind, v in s["lastSync"].items():
        lines.append(f"last {kind + ':':<8} {v['at']} in {v['seconds'] * 1000:.1f} ms {v['detail']}".rstrip())
    c = s["counts"]
    lines.append(f"cluster:   {c['services']} Services, {c['servicePorts']} service ports, {c['endpoints']} endpoints "
                 f"({c['skippedServices']} Services not proxied or partly invalid)")
    if s["programmed"]:
        lines.append("kernel:    " + ", ".join(f"{k}={v}" for k, v in s["programmed"].items()))
    lines.append(f"drift:     {s['driftRepaired']} repaired since start")
    for kind, v in s["source"].items():
        lines.append(f"api:       {kind}: {v['state']} (since {v['since']})")
    if s["skippedObjects"]:
        lines.append("skipped:   " + ", ".join(f"{k}: {v}" for k, v in s["skippedObjects"].items()))
    return "\n".join(lines) + "\n"


def as_json(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=False) + "\n"


def metrics_responder(loop: SyncLoop, health: ProxyHealth, registry: CollectorRegistry,
                      sync_period: float) -> Responder:
    """/metrics (Prometheus), /status and /explain/NAMESPACE/NAME (text; ?output=json for JSON)."""
    text = {"Content-Type": "text/plain; charset=utf-8"}

    def respond(path: str) -> tuple[int, str, Mapping[str, str]]:
        url = urlsplit(path)
        want_json = parse_qs(url.query).get("output", [""])[0] == "json"
        if url.path == "/metrics":
            return 200, generate_latest(registry).decode(), {"Content-Type": CONTENT_TYPE_LATEST}
        if url.path == "/status":
            s = status(loop, health)
            return 200, as_json(s) if want_json else render_status(s), {} if want_json else text
        parts = [unquote(p) for p in url.path.split("/") if p]
        if len(parts) == 3 and parts[0] == "explain":
            e = explain_service(loop, NamespacedName(parts[1], parts[2]), sync_period)
            return 200, as_json(e.as_dict()) if want_json else render_text(e), {} if want_json else text
        return 404, "not found: try /metrics, /status or /explain/NAMESPACE/NAME\n", text

    return respond


__all__ = ["as_json", "explain_service", "metrics_responder", "render_status", "render_text", "status"]
