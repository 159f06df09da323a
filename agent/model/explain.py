"""`explain`: the Service debugging checklist, in order, from what this node knows. Pure.

Steps 1 (the Service as this node sees it) and 2 (its EndpointSlices and which endpoints serve
which traffic here) come from the model; the sync loop adds 3 (what the mode programmed, from the
kernel) and 5 (recent history), and the CLI 4 (a probe). The first step that is not ok is where a
person should look: `Explanation.verdict` names it and what to do.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from agent.model.desired import ServicePlan
from agent.model.endpoints import EndpointInfo, merge_slices
from agent.model.serviceport import ServicePortInfo
from agent.model.state import ServiceFacts


@dataclass(slots=True)
class Step:
    title: str
    ok: bool
    lines: list[str] = field(default_factory=list)
    problem: str = ""  # what is wrong (not ok)
    fix: str = ""  # what to do about it


@dataclass(slots=True)
class Explanation:
    service: str
    steps: list[Step] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)  # "address port protocol" of each frontend, for --probe

    @property
    def broken(self) -> Step | None:
        return next((s for s in self.steps if not s.ok), None)

    @property
    def verdict(self) -> str:
        b = self.broken
        return _verdict(b.title, b.problem) if b else NOTHING_WRONG

    def as_dict(self) -> dict[str, Any]:
        return {"service": self.service, "verdict": self.verdict, "ok": self.broken is None,
                "steps": [asdict(s) for s in self.steps], "targets": self.targets}


NOTHING_WRONG = "ok: nothing found wrong on this node"


def _verdict(title: str, problem: str) -> str:
    return f"{title}: {problem}"


def judged(data: dict[str, Any]) -> dict[str, Any]:
    """Set `ok` and `verdict` of an explanation's data (as_dict) again after steps were added."""
    b = next((s for s in data["steps"] if not s["ok"]), None)
    data["ok"] = b is None
    data["verdict"] = _verdict(b["title"], b["problem"]) if b else NOTHING_WRONG
    return data


def render_text(e: Explanation | dict[str, Any], all_steps: bool = False) -> str:
    """Numbered steps, stopping after the first broken one (unless `all_steps`); takes the
    explanation or its as_dict() form (what the running agent serves)."""
    data = e.as_dict() if isinstance(e, Explanation) else e
    out = [f"Service {data['service']}"]
    for i, s in enumerate(data["steps"], 1):
        out.append(f"{i}. {s['title']}: {'ok' if s['ok'] else 'PROBLEM'}")
        out += [f"   {line}" for line in s["lines"]]
        if not s["ok"]:
            out.append(f"   => {s['problem']}")
            if s["fix"]:
                out.append(f"   what to do: {s['fix']}")
            if not all_steps:
                break
    out.append(f"verdict: {data['verdict']}")
    return "\n".join(out) + "\n"


def _frontends(info: ServicePortInfo) -> str:
    fam = f"IPv{info.family}"
    parts = [f"cluster IP {info.cluster_ip}:{info.port}/{info.protocol} ({fam})"]
    if info.node_port:
        parts.append(f"nodePort {info.node_port}")
    parts += [f"externalIP {ip}" for ip in info.external_ips]
    parts += [f"load balancer {ip}" for ip in info.load_balancer_ips]
    return ", ".join(parts)


def _policies(info: ServicePortInfo) -> str:
    out = [f"externalTrafficPolicy {'Local' if info.external_policy_local else 'Cluster'}"
           if info.externally_accessible else "",
           f"internalTrafficPolicy {'Local' if info.internal_policy_local else 'Cluster'}"]
    if info.affinity_seconds:
        out.append(f"sessionAffinity ClientIP {info.affinity_seconds}s")
    if info.load_balancer_source_ranges:
        out.append("loadBalancerSourceRanges " + ",".join(info.load_balancer_source_ranges))
    if info.health_check_node_port:
        out.append(f"healthCheckNodePort {info.health_check_node_port}")
    return ", ".join(o for o in out if o)


def service_step(f: ServiceFacts) -> Step:
    step = Step("the Service as this node sees it", True)
    note = f.skipped
    if not f.ports:
        if note is not None and note.unproxied:
            fixes = {
                "headless": "a headless Service has no cluster IP: clients get the pods' addresses from DNS; "
                            "no proxy is involved (give it a clusterIP to load-balance through the node)",
                "ExternalName": "an ExternalName Service is a DNS CNAME; no proxy is involved",
                "labelled for another proxy": "its label service.kubernetes.io/service-proxy-name hands it to "
                                              "another proxy; remove the label for this agent to serve it",
            }
            step.ok = False
            step.problem = f"not proxied by design: {note.unproxied}"
            step.fix = fixes.get(note.unproxied, "")
        elif note is not None and note.problems:
            step.ok = False
            step.problem = "skipped as invalid: " + "; ".join(note.problems)
            step.fix = "correct the Service spec (the agent logged this as 'invalid object skipped')"
        else:
            step.ok = False
            step.problem = "no such Service in what this agent has listed"
            step.fix = f"check the namespace and name (kubectl get service -n {f.key.namespace} {f.key.name})"
        return step
    for info in f.ports:
        step.lines.append(f"port {info.name.port or '-'}: {_frontends(info)}")
        step.lines.append(f"  {_policies(info)}")
    if note is not None and note.problems:
        step.lines += [f"skipped part: {p}" for p in note.problems]
    return step


def _ep(e: EndpointInfo) -> str:
    state = "ready" if e.ready else ("serving, terminating" if e.serving and e.terminating else
                                     "terminating" if e.terminating else "not ready")
    where = f" node {e.node_name}" if e.node_name else ""
    hints = f" hints {','.join(sorted(e.zone_hints))}" if e.zone_hints else ""
    return f"{e.address} {state}{where}{hints}"


def endpoints_step(f: ServiceFacts) -> Step:
    step = Step("its endpoints and what this node uses", True)
    if not f.ports:
        return step
    if not f.slices:
        step.ok = False
        step.problem = f"no EndpointSlice is labelled kubernetes.io/service-name={f.key.name}"
        step.fix = ("a Service with a selector gets slices from the EndpointSlice controller: check that its "
                    f"selector matches running pods (kubectl get pods -n {f.key.namespace} -l ...); a Service "
                    "without a selector needs EndpointSlices written with that label")
        if f.unlabelled_slices:
            step.fix += (f"; {len(f.unlabelled_slices)} slice(s) in {f.key.namespace} were skipped for having no "
                         f"such label: {', '.join(f.unlabelled_slices[:5])}")
        return step
    names = {(k, p) for s in f.slices.values() for (k, p), _ in s.ports}
    step.lines.append("slices: " + ", ".join(f.slices))
    if not names:  # what the EndpointSlice controller writes while the selector matches no pod
        step.ok = False
        step.problem = "no endpoints: its EndpointSlices list none (no ports, no addresses); traffic is rejected"
        step.fix = (f"check that the Service's selector matches running pods (kubectl get pods -n {f.key.namespace} "
                    "-l ...) and that they declare the targetPort")
        return step
    merged, _ = merge_slices(f.slices.values())  # as the model merges them for the plans
    for info in f.ports:
        plan = f.plans.get(info.family, {}).get(info.name)
        label = f"port {info.name.port or '-'}/{info.protocol} IPv{info.family}"
        if (info.name.port, info.protocol) not in names:
            step.ok = False
            have = ", ".join(sorted(f"{n or '-'}/{p}" for n, p in names)) or "none"
            step.problem = (f"{label}: no slice has a port named {info.name.port or '(unnamed)'!r} with "
                            f"protocol {info.protocol} (they have: {have})")
            step.fix = ("the slices' port names must equal the Service's port names; with a named targetPort, "
                        "the pods must declare a container port of that name")
            return step
        eps = list(merged.get((info.family, (info.name.port, info.protocol)), ()))
        step.lines.append(f"{label}: " + ("; ".join(_ep(e) for e in eps) if eps else "no endpoints"))
        if plan is None:
            continue
        step.lines.append(f"  used here: {len(plan.cluster)} for cluster traffic, {len(plan.local)} local "
                          f"(on {f.node_name})")
        broken = _unusable(info, plan, eps, f.node_name)
        if broken:
            step.ok = False
            step.problem, step.fix = f"{label}: {broken[0]}", broken[1]
            return step
    return step


def _unusable(info: ServicePortInfo, plan: ServicePlan, eps: list[EndpointInfo],
              node: str) -> tuple[str, str] | None:
    if not eps:
        return ("no endpoints: traffic is rejected (connection refused)",
                "scale the workload up, or check that the selector matches pods")
    if not plan.has_any:
        unready = sum(not e.ready for e in eps)
        return (f"{unready} endpoint(s), none ready or serving: traffic is rejected",
                "check the pods' readiness probes (kubectl describe pod) and events")
    if info.internal_policy_local and not plan.local:
        return (f"internalTrafficPolicy Local and no endpoint on this node ({node}): traffic from this node "
                "to the cluster IP is dropped", "run an endpoint on this node, or use internalTrafficPolicy Cluster")
    if info.external_policy_local and info.externally_accessible and not plan.local:
        return (f"externalTrafficPolicy Local and no endpoint on this node ({node}): external traffic to this "
                "node is dropped (its healthCheckNodePort answers 503, so load balancers skip it)",
                "expected on nodes without endpoints; send traffic to nodes that have one, or use Cluster")
    return None


def explain(f: ServiceFacts) -> Explanation:
    """Steps 1 and 2; step 1 broken means there is nothing more to look at."""
    e = Explanation(str(f.key), [service_step(f)])
    e.targets = [f"{ip} {i.port} {i.protocol}" for i in f.ports
                 for ip in (i.cluster_ip, *i.external_ips, *i.load_balancer_ips)]
    if e.steps[0].ok:
        e.steps.append(endpoints_step(f))
    return e
