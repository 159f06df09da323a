"""What the eBPF mode writes in its BPF maps, as bytes, and why. Pure: no bcc, no kernel.

The layout (keys and values of every map in lb.c) has a version, part of the pin path: a new agent
whose layout differs gets new maps, never a reinterpretation of old ones.

Per frontend two service entries ("scopes"):
- sockets (0): what this node's pods and processes get at connect()/sendmsg(): every frontend,
  with the endpoints in-cluster traffic uses (externalTrafficPolicy Local: all of them, kube-proxy's
  short circuit);
- tc (1): what traffic arriving from outside gets: the frontend's own endpoints (Local: this
  node's), masquerade unless the client address must be kept, source ranges.
A service entry is a master (slot 0: count, flags, affinity, id) and one slot per backend.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from agent.model.desired import DesiredState
from agent.model.endpoints import EndpointInfo
from agent.model.frontends import Frontend, FrontendKey

LAYOUT = 1
F_REJECT, F_DROP, F_MASQ, F_MASQ_OUTSIDE, F_RANGES = 1, 2, 4, 8, 16
SCOPE_SOCKETS, SCOPE_TC = 0, 1
PROTOCOLS = {"TCP": 6, "UDP": 17, "SCTP": 132}
CLUSTER_CIDR_ID = 0xC0000000

_SVC_TAIL = struct.Struct("=BBHH")  # proto, scope, slot, family (after addr[16] and the port)
_SVC_VAL = struct.Struct("=IHHII")  # backend_id, count, flags, affinity, svc_id
_LPM = struct.Struct("=II")  # prefixlen, id (then addr[16])


def addr16(address: str) -> bytes:
    return ipaddress.ip_address(address).packed.ljust(16, b"\0")


def svc_key(f: FrontendKey, scope: int, slot: int) -> bytes:
    family = 6 if ":" in f.address else 4
    return addr16(f.address) + struct.pack("!H", f.port) + _SVC_TAIL.pack(PROTOCOLS[f.protocol], scope, slot, family)


def svc_val(backend_id: int = 0, count: int = 0, flags: int = 0, affinity: int = 0, svc_id: int = 0) -> bytes:
    return _SVC_VAL.pack(backend_id, count, flags, affinity, svc_id)


def backend_val(ep: EndpointInfo, protocol: str) -> bytes:
    family = 6 if ":" in ep.ip else 4
    return addr16(ep.ip) + struct.pack("!H", ep.port) + struct.pack("=BB", PROTOCOLS[protocol], family)


def id_key(n: int) -> bytes:
    return struct.pack("=I", n)


def lpm_key(ident: int, cidr: str) -> bytes:
    net = ipaddress.ip_network(cidr, strict=False)
    return _LPM.pack(32 + net.prefixlen, ident) + net.network_address.packed.ljust(16, b"\0")


def decode_svc_key(raw: bytes) -> tuple[FrontendKey, int, int]:
    """(frontend, scope, slot) of a svcs key."""
    proto, scope, slot, family = _SVC_TAIL.unpack_from(raw, 18)
    address = str(ipaddress.ip_address(raw[:4] if family == 4 else raw[:16]))
    name = next((k for k, v in PROTOCOLS.items() if v == proto), str(proto))
    return FrontendKey(address, struct.unpack_from("!H", raw, 16)[0], name), scope, slot


def decode_svc_val(raw: bytes) -> tuple[int, int, int, int, int]:
    backend_id, count, flags, affinity, svc_id = _SVC_VAL.unpack_from(raw)
    return backend_id, count, flags, affinity, svc_id


def decode_backend(raw: bytes) -> tuple[str, int]:
    family = raw[19]
    return str(ipaddress.ip_address(raw[:4] if family == 4 else raw[:16])), struct.unpack_from("!H", raw, 16)[0]


@dataclass(frozen=True, slots=True)
class ScopeEntry:
    """One service entry: its flags and affinity, and the endpoints in slot order."""

    flags: int
    affinity: int
    endpoints: tuple[EndpointInfo, ...]
    source_ranges: tuple[str, ...] = ()


def _unserved_flag(unserved: str | None) -> int:
    return F_DROP if unserved == "drop" else F_REJECT


def entries_of(f: Frontend) -> dict[int, ScopeEntry]:
    """The service entries of one frontend, per scope."""
    inner = tuple(sorted({(e.ip, e.port): e for e in f.in_cluster_endpoints}.values()))
    outer = tuple(sorted({(e.ip, e.port): e for e in f.endpoints}.values()))
    sock_flags = 0
    if not inner:
        # cluster IP with internalTrafficPolicy Local and endpoints elsewhere: drop, as kube-proxy;
        # any other frontend without in-cluster endpoints has none at all: refuse at connect()
        sock_flags = _unserved_flag(f.unserved if f.kind == "ClusterIP" else "reject")
    tc_flags = 0 if outer else _unserved_flag(f.unserved)
    if f.kind == "ClusterIP":
        tc_flags |= F_MASQ_OUTSIDE
    elif not f.preserve_source:
        tc_flags |= F_MASQ
    if f.source_ranges:
        tc_flags |= F_RANGES
    return {
        SCOPE_SOCKETS: ScopeEntry(sock_flags, f.affinity_seconds, inner),
        SCOPE_TC: ScopeEntry(tc_flags, f.affinity_seconds, outer, f.source_ranges),
    }


def cluster_cidr_keys(cidrs: Iterable[str]) -> list[bytes]:
    out = []
    for c in cidrs:
        net = ipaddress.ip_network(c, strict=False)
        out.append(lpm_key(CLUSTER_CIDR_ID | net.version, c))
    return out


def render_family(desired: DesiredState) -> str:
    """The map entries a full sync writes for one family, one line each (ids are given at write time)."""
    fam = desired.family
    lines = [f"# IPv{fam}: BPF map entries (layout v{LAYOUT}); backend ids are allocated when written"]
    for f in sorted(desired.frontends.values(), key=lambda f: f.key):
        for scope, e in entries_of(f).items():
            where = "sockets" if scope == SCOPE_SOCKETS else "tc"
            flags = [n for bit, n in ((F_REJECT, "reject"), (F_DROP, "drop"), (F_MASQ, "masquerade"),
                                      (F_MASQ_OUTSIDE, "masquerade-outside-cluster"), (F_RANGES, "source-ranges"))
                     if e.flags & bit]
            extra = f" affinity={e.affinity}s" if e.affinity else ""
            lines.append(f"svcs {f.key} {where} slot=0 count={len(e.endpoints)} flags={','.join(flags) or '-'}"
                         f"{extra} ({f.kind} {f.service})")
            lines += [f"svcs {f.key} {where} slot={i} -> backend {ep.address}" for i, ep in enumerate(e.endpoints, 1)]
            if scope == SCOPE_TC:
                lines += [f"ranges {f.key} {cidr}" for cidr in e.source_ranges]
    lines += [f"ranges cluster-cidr {c}" for c in desired.node.cluster_cidrs]
    return "\n".join(lines) + "\n"
