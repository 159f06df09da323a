"""Lean typed records decoded from Kubernetes API JSON: only the fields the agent reads.

Decoding ignores unknown fields, so the same structs read what the API serves, what a watch
streams, and what a `--source` YAML file holds. A wrong type (a port that is a list, say) fails
the decode of that one object, which the caller logs and skips.
"""

from __future__ import annotations

from typing import Any

import msgspec

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
SERVICE_PROXY_NAME_LABEL = "service.kubernetes.io/service-proxy-name"
HEADLESS_LABEL = "service.kubernetes.io/headless"
ZONE_LABEL = "topology.kubernetes.io/zone"
TRIGGER_TIME_ANNOTATION = "endpoints.kubernetes.io/last-change-trigger-time"


class Meta(msgspec.Struct, rename="camel", frozen=True):
    name: str = ""
    namespace: str = ""
    labels: dict[str, str] = {}
    annotations: dict[str, str] = {}
    resource_version: str = ""
    deletion_timestamp: str | None = None


class ServicePort(msgspec.Struct, rename="camel", frozen=True):
    port: int = 0
    name: str = ""
    protocol: str = "TCP"
    target_port: int | str | None = None
    node_port: int = 0


class ClientIPConfig(msgspec.Struct, rename="camel", frozen=True):
    timeout_seconds: int = 10800


class SessionAffinityConfig(msgspec.Struct, rename="camel", frozen=True):
    client_ip: ClientIPConfig | None = msgspec.field(default=None, name="clientIP")


class ServiceSpec(msgspec.Struct, rename="camel", frozen=True):
    type: str = "ClusterIP"
    cluster_ip: str = msgspec.field(default="", name="clusterIP")
    cluster_ips: list[str] = msgspec.field(default_factory=list, name="clusterIPs")
    ports: list[ServicePort] = []
    external_ips: list[str] = msgspec.field(default_factory=list, name="externalIPs")
    session_affinity: str = "None"
    session_affinity_config: SessionAffinityConfig | None = None
    external_traffic_policy: str = "Cluster"
    internal_traffic_policy: str = "Cluster"
    health_check_node_port: int = 0
    load_balancer_source_ranges: list[str] = []
    external_name: str = ""
    traffic_distribution: str | None = None


class LoadBalancerIngress(msgspec.Struct, rename="camel", frozen=True):
    ip: str = ""
    hostname: str = ""
    ip_mode: str | None = None


class LoadBalancerStatus(msgspec.Struct, rename="camel", frozen=True):
    ingress: list[LoadBalancerIngress] = []


class ServiceStatus(msgspec.Struct, rename="camel", frozen=True):
    load_balancer: LoadBalancerStatus = LoadBalancerStatus()


class Service(msgspec.Struct, rename="camel", frozen=True):
    metadata: Meta = Meta()
    spec: ServiceSpec = ServiceSpec()
    status: ServiceStatus = ServiceStatus()


class EndpointConditions(msgspec.Struct, rename="camel", frozen=True):
    ready: bool | None = None
    serving: bool | None = None
    terminating: bool | None = None


class ForZone(msgspec.Struct, rename="camel", frozen=True):
    name: str = ""


class EndpointHints(msgspec.Struct, rename="camel", frozen=True):
    for_zones: list[ForZone] = []


class Endpoint(msgspec.Struct, rename="camel", frozen=True):
    addresses: list[str] = []
    conditions: EndpointConditions = EndpointConditions()
    node_name: str | None = None
    zone: str | None = None
    hints: EndpointHints | None = None


class EndpointPort(msgspec.Struct, rename="camel", frozen=True):
    name: str | None = None
    port: int | None = None
    protocol: str | None = "TCP"


class EndpointSlice(msgspec.Struct, rename="camel", frozen=True):
    metadata: Meta = Meta()
    address_type: str = "IPv4"
    endpoints: list[Endpoint] | None = None
    ports: list[EndpointPort] | None = None


class NodeAddress(msgspec.Struct, rename="camel", frozen=True):
    type: str = ""
    address: str = ""


class NodeStatus(msgspec.Struct, rename="camel", frozen=True):
    addresses: list[NodeAddress] = []


class NodeSpec(msgspec.Struct, rename="camel", frozen=True):
    pod_cidrs: list[str] = msgspec.field(default_factory=list, name="podCIDRs")


class Node(msgspec.Struct, rename="camel", frozen=True):
    metadata: Meta = Meta()
    spec: NodeSpec = NodeSpec()
    status: NodeStatus = NodeStatus()


class ServiceCIDRSpec(msgspec.Struct, rename="camel", frozen=True):
    cidrs: list[str] = []


class ServiceCIDR(msgspec.Struct, rename="camel", frozen=True):
    """networking.k8s.io/v1 ServiceCIDR: a range the cluster allocates ClusterIPs from."""

    metadata: Meta = Meta()
    spec: ServiceCIDRSpec = ServiceCIDRSpec()


Record = Service | EndpointSlice | Node | ServiceCIDR
KIND_TYPES: dict[str, type[Service] | type[EndpointSlice] | type[Node] | type[ServiceCIDR]] = {
    "Service": Service,
    "EndpointSlice": EndpointSlice,
    "Node": Node,
    "ServiceCIDR": ServiceCIDR,
}


class DecodeError(ValueError):
    """An object the agent cannot read; the message names the object and the field."""


def _describe(obj: Any) -> str:
    if isinstance(obj, dict):
        meta = obj.get("metadata") or {}
        if isinstance(meta, dict):
            return f"{obj.get('kind', '?')} {meta.get('namespace', '')}/{meta.get('name', '?')}"
    return "object"


def from_builtins(kind: str, obj: Any) -> Record:
    """Convert one decoded JSON/YAML object into its record, or raise DecodeError."""
    typ = KIND_TYPES.get(kind)
    if typ is None:
        raise DecodeError(f"{_describe(obj)}: unsupported kind {kind!r}")
    try:
        return msgspec.convert(obj, type=typ, strict=False)
    except msgspec.ValidationError as exc:
        raise DecodeError(f"{_describe(obj)}: {exc}") from exc


def from_json(kind: str, raw: bytes) -> Record:
    """Decode one object's JSON bytes (a list item or a watch event's object)."""
    typ = KIND_TYPES.get(kind)
    if typ is None:
        raise DecodeError(f"unsupported kind {kind!r}")
    try:
        return msgspec.json.decode(raw, type=typ, strict=False)
    except msgspec.ValidationError as exc:
        try:
            what = _describe({"kind": kind, **msgspec.json.decode(raw)})
        except (msgspec.DecodeError, TypeError):
            what = kind
        raise DecodeError(f"{what}: {exc}") from exc
    except msgspec.DecodeError as exc:
        raise DecodeError(f"{kind}: malformed JSON: {exc}") from exc
