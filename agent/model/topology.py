"""Which endpoints serve a service port on this node (kube-proxy's CategorizeEndpoints).

- Cluster endpoints: ready ones (narrowed to this zone by topology hints when every ready endpoint
  carries hints and one names this zone); when none is ready, serving-and-terminating ones.
- Local endpoints (internal or external traffic policy Local): ready ones on this node, else
  serving-and-terminating ones on this node.
- has_any: some endpoint anywhere could serve, so "no local endpoint" means drop, not reject.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from agent.model.endpoints import EndpointInfo
from agent.model.serviceport import ServicePortInfo


@dataclass(frozen=True, slots=True)
class Categorized:
    cluster: tuple[EndpointInfo, ...]
    local: tuple[EndpointInfo, ...]
    has_any: bool
    hints_ignored: str = ""  # why zone hints were not used, for a log line


def _zone_filter(endpoints: Sequence[EndpointInfo], zone: str) -> tuple[bool, str]:
    ready = [e for e in endpoints if e.ready]
    if not ready or any(e.zone_hints is None for e in ready):
        return False, ""
    if not zone:
        return False, "node has no topology.kubernetes.io/zone label"
    if not any(zone in (e.zone_hints or ()) for e in ready):
        return False, f"no endpoint has a hint for zone {zone}"
    return True, ""


def categorize(
    info: ServicePortInfo, endpoints: Sequence[EndpointInfo], node_name: str, zone: str
) -> Categorized:
    cluster: tuple[EndpointInfo, ...] = ()
    local: tuple[EndpointInfo, ...] = ()
    has_any = False
    why = ""
    if info.uses_cluster_endpoints:
        use_zone, why = _zone_filter(endpoints, zone)
        cluster = tuple(
            e for e in endpoints if e.ready and (not use_zone or zone in (e.zone_hints or ()))
        )
        if not cluster:
            cluster = tuple(e for e in endpoints if e.serving and e.terminating)
        has_any = bool(cluster)
    if info.uses_local_endpoints:
        mine = [e for e in endpoints if e.node_name == node_name]
        local = tuple(e for e in mine if e.ready)
        if not local:
            local = tuple(e for e in mine if e.serving and e.terminating)
        has_any = has_any or any(e.ready or (e.serving and e.terminating) for e in endpoints)
    return Categorized(cluster, local, has_any, why)
