"""IPVS over generic netlink: typed virtual and real servers, batched writes, raw dumps.

Every trap met on the way stays in this module:
- real servers default to direct routing in the kernel's eyes unless told: we always send
  IP_VS_CONN_F_MASQ (masquerade, i.e. DNAT) explicitly;
- the scheduler is always sent (the kernel and libraries default to wlc);
- updating uses IPVS_CMD_SET_* (some libraries map "update" to a delete);
- an IPv6 virtual server needs its netmask as a prefix length (128, host order), an IPv4 one the
  mask itself (255.255.255.255); anything else is EINVAL;
- dumps are decoded from the attributes the kernel sent, never from a library's defaults;
- the kernel sets IP_VS_SVC_F_HASHED (0x2) on every service it holds: masked out when comparing;
- timeouts (`ipvsadm --set`) are IPVS_CMD_SET_CONFIG with three u32 attributes.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Sequence

from agent.backends.ipvs.servers import F_HASHED, RealServer, ServiceKey, VirtualServer
from agent.kernel.netlink import (
    GENL_HDR,
    NETLINK_GENERIC,
    NetlinkError,
    Request,
    Socket,
    be16,
    cstr,
    genl_family,
    ip_bytes,
    ip_text,
    nla,
    nla_be16,
    nla_nested,
    nla_str,
    nla_u16,
    nla_u32,
    parse_attrs,
    u16,
    u32,
)

# linux/ip_vs.h
CMD_NEW_SERVICE, CMD_SET_SERVICE, CMD_DEL_SERVICE, CMD_GET_SERVICE = 1, 2, 3, 4
CMD_NEW_DEST, CMD_SET_DEST, CMD_DEL_DEST, CMD_GET_DEST = 5, 6, 7, 8
CMD_SET_CONFIG, CMD_GET_CONFIG, CMD_FLUSH = 12, 13, 17
ATTR_SERVICE, ATTR_DEST, ATTR_TIMEOUT_TCP, ATTR_TIMEOUT_TCP_FIN, ATTR_TIMEOUT_UDP = 1, 2, 4, 5, 6
SVC_AF, SVC_PROTOCOL, SVC_ADDR, SVC_PORT, SVC_FWMARK, SVC_SCHED, SVC_FLAGS, SVC_TIMEOUT, SVC_NETMASK = range(1, 10)
DEST_ADDR, DEST_PORT, DEST_FWD, DEST_WEIGHT, DEST_U_THRESH, DEST_L_THRESH, DEST_ACTIVE, DEST_INACTIVE = range(1, 9)
DEST_PERSIST, DEST_ADDR_FAMILY = 9, 11
CONN_F_MASQ = 0x0
PROTOCOLS = {"TCP": socket.IPPROTO_TCP, "UDP": socket.IPPROTO_UDP, "SCTP": 132}
PROTOCOL_NAMES = {v: k for k, v in PROTOCOLS.items()}


def _svc_attrs(key: ServiceKey, full: VirtualServer | None) -> bytes:
    fam, packed = ip_bytes(key.address)
    attrs = [nla_u16(SVC_AF, fam), nla_u16(SVC_PROTOCOL, PROTOCOLS[key.protocol]),
             nla(SVC_ADDR, packed.ljust(16, b"\0")), nla_be16(SVC_PORT, key.port)]
    if full is not None:
        mask = struct.pack("=I", 128) if fam == socket.AF_INET6 else b"\xff\xff\xff\xff"
        attrs += [nla_str(SVC_SCHED, full.scheduler),
                  nla(SVC_FLAGS, struct.pack("=II", full.flags, 0xFFFFFFFF)),
                  nla_u32(SVC_TIMEOUT, full.timeout), nla(SVC_NETMASK, mask)]
    return nla_nested(ATTR_SERVICE, attrs)


def _dest_attrs(rs: RealServer) -> bytes:
    fam, packed = ip_bytes(rs.address)
    return nla_nested(ATTR_DEST, [
        nla(DEST_ADDR, packed.ljust(16, b"\0")), nla_be16(DEST_PORT, rs.port),
        nla_u32(DEST_FWD, CONN_F_MASQ if rs.masquerade else 3), nla_u32(DEST_WEIGHT, rs.weight),
        nla_u32(DEST_U_THRESH, 0), nla_u32(DEST_L_THRESH, 0), nla_u16(DEST_ADDR_FAMILY, fam),
    ])


def _genl(cmd: int, body: bytes) -> bytes:
    return GENL_HDR.pack(cmd, 1, 0) + body


class Ipvs:
    """The IPVS tables of the caller's network namespace."""

    def __init__(self) -> None:
        self._sock = Socket(NETLINK_GENERIC)
        try:
            self.family = genl_family(self._sock, "IPVS")
        except NetlinkError:
            self._sock.close()
            raise

    def close(self) -> None:
        self._sock.close()

    # -- requests (built, then applied in one batch) ------------------------------------------

    def add_service(self, vs: VirtualServer) -> Request:
        return Request(self.family, _genl(CMD_NEW_SERVICE, _svc_attrs(vs.key, vs)), f"add virtual server {vs.key}")

    def update_service(self, vs: VirtualServer) -> Request:
        return Request(self.family, _genl(CMD_SET_SERVICE, _svc_attrs(vs.key, vs)), f"update virtual server {vs.key}")

    def delete_service(self, key: ServiceKey) -> Request:
        return Request(self.family, _genl(CMD_DEL_SERVICE, _svc_attrs(key, None)), f"delete virtual server {key}")

    def add_dest(self, key: ServiceKey, rs: RealServer) -> Request:
        return Request(self.family, _genl(CMD_NEW_DEST, _svc_attrs(key, None) + _dest_attrs(rs)),
                       f"add real server {rs.address}:{rs.port} to {key}")

    def update_dest(self, key: ServiceKey, rs: RealServer) -> Request:
        return Request(self.family, _genl(CMD_SET_DEST, _svc_attrs(key, None) + _dest_attrs(rs)),
                       f"set real server {rs.address}:{rs.port} of {key} to weight {rs.weight}")

    def delete_dest(self, key: ServiceKey, rs: RealServer) -> Request:
        return Request(self.family, _genl(CMD_DEL_DEST, _svc_attrs(key, None) + _dest_attrs(rs)),
                       f"delete real server {rs.address}:{rs.port} of {key}")

    def apply(self, requests: Sequence[Request]) -> list[NetlinkError]:
        return self._sock.apply(requests)

    # -- reading ------------------------------------------------------------------------------

    def services(self) -> list[VirtualServer]:
        """Every virtual server (fwmark-based ones, which we never make, are skipped)."""
        out = []
        for body in self._sock.dump(self.family, _genl(CMD_GET_SERVICE, b"")):
            outer = parse_attrs(body, GENL_HDR.size)
            if ATTR_SERVICE not in outer:
                continue
            vs = _decode_service(outer[ATTR_SERVICE])
            if vs is not None:
                out.append(vs)
        return out

    def dests(self, key: ServiceKey) -> list[RealServer]:
        out = []
        for body in self._sock.dump(self.family, _genl(CMD_GET_DEST, _svc_attrs(key, None))):
            outer = parse_attrs(body, GENL_HDR.size)
            if ATTR_DEST in outer:
                out.append(_decode_dest(outer[ATTR_DEST], key))
        return out

    # -- settings -----------------------------------------------------------------------------

    def set_timeouts(self, tcp: int, tcpfin: int, udp: int) -> None:
        """`ipvsadm --set tcp tcpfin udp` (seconds; 0 keeps that timeout as it is)."""
        body = nla_u32(ATTR_TIMEOUT_TCP, tcp) + nla_u32(ATTR_TIMEOUT_TCP_FIN, tcpfin) + nla_u32(ATTR_TIMEOUT_UDP, udp)
        self._sock.request(Request(self.family, _genl(CMD_SET_CONFIG, body), "set IPVS timeouts"))

    def timeouts(self) -> tuple[int, int, int]:
        """`ipvsadm --list --timeout`: (tcp, tcpfin, udp) seconds."""
        a = parse_attrs(self._sock.get(self.family, _genl(CMD_GET_CONFIG, b""), "read IPVS timeouts"), GENL_HDR.size)
        tcp, fin, udp = (u32(a[k]) if k in a else 0 for k in (ATTR_TIMEOUT_TCP, ATTR_TIMEOUT_TCP_FIN, ATTR_TIMEOUT_UDP))
        return tcp, fin, udp


def _decode_service(raw: memoryview) -> VirtualServer | None:
    a = parse_attrs(raw)
    if SVC_ADDR not in a or SVC_PORT not in a or SVC_PROTOCOL not in a:
        return None  # a firewall-mark service
    fam = u16(a[SVC_AF])
    proto = PROTOCOL_NAMES.get(u16(a[SVC_PROTOCOL]), str(u16(a[SVC_PROTOCOL])))
    flags = struct.unpack_from("=I", a[SVC_FLAGS])[0] if SVC_FLAGS in a else 0
    return VirtualServer(
        key=ServiceKey(proto, ip_text(fam, a[SVC_ADDR]), be16(a[SVC_PORT])),
        scheduler=cstr(a[SVC_SCHED]) if SVC_SCHED in a else "",
        flags=flags & ~F_HASHED,
        timeout=u32(a[SVC_TIMEOUT]) if SVC_TIMEOUT in a else 0,
    )


def _decode_dest(raw: memoryview, key: ServiceKey) -> RealServer:
    a = parse_attrs(raw)
    fam = u16(a[DEST_ADDR_FAMILY]) if DEST_ADDR_FAMILY in a else (socket.AF_INET6 if ":" in key.address
                                                                   else socket.AF_INET)
    return RealServer(
        address=ip_text(fam, a[DEST_ADDR]),
        port=be16(a[DEST_PORT]),
        weight=u32(a[DEST_WEIGHT]) if DEST_WEIGHT in a else 0,
        masquerade=(u32(a[DEST_FWD]) & 0x7) == CONN_F_MASQ if DEST_FWD in a else False,
        active=u32(a[DEST_ACTIVE]) if DEST_ACTIVE in a else 0,
        inactive=u32(a[DEST_INACTIVE]) if DEST_INACTIVE in a else 0,
    )
