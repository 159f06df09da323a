"""EndpointSlices reduced to what the node needs: per service port, the endpoints and their state."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from agent.model.records import SERVICE_NAME_LABEL, TRIGGER_TIME_ANNOTATION, EndpointSlice
from agent.model.serviceport import PROTOCOLS, NamespacedName, Problem

FAMILIES = {"IPv4": 4, "IPv6": 6}
MAX_ENDPOINTS_PER_SLICE = 1000


@dataclass(frozen=True, slots=True, order=True)
class EndpointInfo:
    """One endpoint (address:port) of one service port."""

    ip: str
    port: int
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    node_name: str = ""
    zone_hints: frozenset[str] | None = None

    @property
    def address(self) -> str:
        return f"[{self.ip}]:{self.port}" if ":" in self.ip else f"{self.ip}:{self.port}"


PortKey = tuple[str, str]  # (port name, protocol)


@dataclass(frozen=True, slots=True)
class SliceInfo:
    """One EndpointSlice, validated: which service it belongs to, and its endpoints per port."""

    service: NamespacedName
    family: int
    ports: tuple[tuple[PortKey, tuple[EndpointInfo, ...]], ...]
    trigger_time: str = ""


def slice_info(es: EndpointSlice) -> tuple[SliceInfo | None, list[Problem]]:
    meta = es.metadata
    obj = f"{meta.namespace}/{meta.name}"
    problems: list[Problem] = []

    def bad(reason: str, detail: str) -> None:
        problems.append(Problem("EndpointSlice", obj, reason, detail))

    svc_name = meta.labels.get(SERVICE_NAME_LABEL, "")
    if not svc_name:
        bad("no_service_label", f"has no {SERVICE_NAME_LABEL} label; skipped")
        return None, problems
    family = FAMILIES.get(es.address_type)
    if family is None:
        # FQDN slices are legal but not proxied; not worth a warning.
        return None, problems
    eps = es.endpoints or []
    if len(eps) > MAX_ENDPOINTS_PER_SLICE:
        bad("too_many_endpoints", f"{len(eps)} endpoints, more than {MAX_ENDPOINTS_PER_SLICE}; slice skipped")
        return None, problems

    addresses: list[tuple[str, bool, bool, bool, str, frozenset[str] | None]] = []
    for ep in eps:
        if not ep.addresses:
            continue
        raw = ep.addresses[0]  # kube-proxy uses only the first address
        try:
            ip = ipaddress.ip_address(raw)
        except ValueError:
            bad("invalid_ip", f"endpoint address {raw!r} is not an IP address; endpoint skipped")
            continue
        if ip.version != family:
            bad("invalid_ip", f"endpoint address {raw} is not {es.address_type}; endpoint skipped")
            continue
        c = ep.conditions
        ready = c.ready is not False
        serving = c.serving if c.serving is not None else ready
        terminating = bool(c.terminating)
        hints = None
        if ep.hints is not None and ep.hints.for_zones:
            hints = frozenset(z.name for z in ep.hints.for_zones)
        addresses.append((str(ip), ready, serving, terminating, ep.node_name or "", hints))

    ports: list[tuple[PortKey, tuple[EndpointInfo, ...]]] = []
    for p in es.ports or []:
        proto = (p.protocol or "TCP").upper()
        if proto not in PROTOCOLS:
            bad("unknown_protocol", f"port {p.name!r}: protocol {p.protocol!r} is not TCP, UDP or SCTP; skipped")
            continue
        if p.port is None or not 1 <= p.port <= 65535:
            bad("invalid_port", f"port {p.name!r}: {p.port} is missing or out of 1..65535; skipped")
            continue
        infos = tuple(EndpointInfo(a[0], p.port, a[1], a[2], a[3], a[4], a[5]) for a in addresses)
        ports.append(((p.name or "", proto), infos))
    trigger = meta.annotations.get(TRIGGER_TIME_ANNOTATION, "")
    return SliceInfo(NamespacedName(meta.namespace, svc_name), family, tuple(ports), trigger), problems


def merge_slices(
    slices: Iterable[SliceInfo],
) -> tuple[dict[tuple[int, PortKey], tuple[EndpointInfo, ...]], list[str]]:
    """Merge a service's slices into endpoints per (family, port); duplicates keep the readiest copy.

    Returns the merged endpoints and a description of each duplicate found.
    """
    merged: dict[tuple[int, PortKey], dict[tuple[str, int], EndpointInfo]] = {}
    duplicates: list[str] = []
    for s in slices:
        for key, eps in s.ports:
            bucket = merged.setdefault((s.family, key), {})
            for ep in eps:
                k = (ep.ip, ep.port)
                old = bucket.get(k)
                if old is None:
                    bucket[k] = ep
                    continue
                if old != ep:
                    duplicates.append(f"{ep.address} (port {key[0] or '-'}/{key[1]})")
                if (ep.ready, ep.serving) > (old.ready, old.serving):
                    bucket[k] = ep
    out = {k: tuple(sorted(v.values())) for k, v in merged.items()}
    return out, duplicates
