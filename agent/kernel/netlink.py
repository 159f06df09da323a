"""A small netlink client: attributes encoded and decoded with struct, many requests per send.

Why not pyroute2's message classes for the hot paths: encoding one IPVS message through them costs
about 300 µs here (6 ms inside a user-mode-linux guest), so a full sync of 10k Services (110k
messages) would take half a minute before the kernel saw any of it. Encoding with struct costs a
few µs, and batching hundreds of requests per send() keeps system calls (expensive in a UML guest)
few. pyroute2 still does the rare, one-off work (creating links).

Only what the agent needs: generic netlink family lookup, acked requests in batches with the error
of each, dumps, and rtnetlink addresses (dump, add, delete).
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import socket
import struct
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

NETLINK_ROUTE = 0
NETLINK_GENERIC = 16

NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_ROOT = 0x100
NLM_F_MATCH = 0x200
NLM_F_DUMP = NLM_F_ROOT | NLM_F_MATCH
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLM_F_REPLACE = 0x100

NLMSG_ERROR = 2
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10
SO_RCVBUFFORCE = 33  # not in Python's socket module
NLMSG_DONE = 3
NLA_F_NESTED = 0x8000

GENL_ID_CTRL = 0x10
CTRL_CMD_GETFAMILY = 3
CTRL_ATTR_FAMILY_ID = 1
CTRL_ATTR_FAMILY_NAME = 2

RTM_NEWADDR = 20
RTM_DELADDR = 21
RTM_GETADDR = 22
IFA_ADDRESS = 1
IFA_LOCAL = 2
IFA_F_NODAD = 0x02
RT_SCOPE_UNIVERSE = 0
RT_SCOPE_HOST = 254

_HDR = struct.Struct("=IHHII")  # nlmsghdr: len, type, flags, seq, pid
_NLA = struct.Struct("=HH")
_IFADDR = struct.Struct("=BBBBI")  # ifaddrmsg: family, prefixlen, flags, scope, index


class NetlinkError(OSError):
    """The kernel answered a request with an error (errno, and what the request was)."""

    def __init__(self, code: int, what: str) -> None:
        super().__init__(code, f"{what}: {os.strerror(code)}")
        self.what = what


# -- attributes -----------------------------------------------------------------------------------

def message(kind: int, flags: int, seq: int, payload: bytes) -> bytes:
    """One netlink message: header and payload."""
    return _HDR.pack(_HDR.size + len(payload), kind, flags, seq, 0) + payload


def nla(kind: int, payload: bytes) -> bytes:
    """One attribute, padded to 4 bytes."""
    raw = _NLA.pack(_NLA.size + len(payload), kind) + payload
    return raw + b"\0" * (-len(raw) % 4)


def nla_nested(kind: int, attrs: Iterable[bytes]) -> bytes:
    return nla(kind | NLA_F_NESTED, b"".join(attrs))


def nla_u8(kind: int, v: int) -> bytes:
    return nla(kind, struct.pack("=B", v))


def nla_u16(kind: int, v: int) -> bytes:
    return nla(kind, struct.pack("=H", v))


def nla_u32(kind: int, v: int) -> bytes:
    return nla(kind, struct.pack("=I", v))


def nla_be16(kind: int, v: int) -> bytes:
    return nla(kind, struct.pack("!H", v))


def nla_str(kind: int, v: str) -> bytes:
    return nla(kind, v.encode() + b"\0")


def parse_attrs(data: bytes | memoryview, start: int = 0, end: int | None = None) -> dict[int, memoryview]:
    """type -> payload of every attribute in data[start:end] (the nested flag stripped)."""
    view = memoryview(data)
    stop = len(view) if end is None else end
    out: dict[int, memoryview] = {}
    pos = start
    while pos + _NLA.size <= stop:
        length, kind = _NLA.unpack_from(view, pos)
        if length < _NLA.size:
            break
        out[kind & 0x3FFF] = view[pos + _NLA.size:pos + length]
        pos += (length + 3) & ~3
    return out


def u16(b: memoryview) -> int:
    return int(struct.unpack_from("=H", b)[0])


def u32(b: memoryview) -> int:
    return int(struct.unpack_from("=I", b)[0])


def be16(b: memoryview) -> int:
    return int(struct.unpack_from("!H", b)[0])


def cstr(b: memoryview) -> str:
    return bytes(b).split(b"\0", 1)[0].decode(errors="replace")


def ip_bytes(address: str) -> tuple[int, bytes]:
    """(AF_INET or AF_INET6, packed address)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        return family, socket.inet_pton(family, address)
    except OSError:
        raise ValueError(f"{address!r} is not an IP address") from None


def ip_text(family: int, raw: memoryview | bytes) -> str:
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, bytes(raw[:4]))
    return str(ipaddress.ip_address(bytes(raw[:16])))  # ipaddress's spelling, as the model's


# -- the socket ---------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Request:
    """One request of a batch: its type, flags (NLM_F_REQUEST|NLM_F_ACK added), payload, and a
    description for the error message when the kernel refuses it."""

    type: int
    payload: bytes
    what: str
    flags: int = 0


class Socket:
    """A netlink socket in the caller's network namespace."""

    # per send(): every request gets an ack, each its own skb of about 1 KiB of receive buffer, so
    # the count is bounded too (1,000 address adds in one send overran the buffer: ENOBUFS)
    BATCH_BYTES = 48 * 1024
    BATCH_REQUESTS = 256
    RCVBUF = 4 << 20
    RECV_BYTES = 1 << 20

    def __init__(self, protocol: int, timeout: float | None = None) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, protocol)
        self._sock.settimeout(timeout)  # None: block (a reply always comes; `timeout` bounds it)
        try:  # root may exceed net.core.rmem_max; others get what it allows
            self._sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, self.RCVBUF)
        except OSError:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.RCVBUF)
        with contextlib.suppress(OSError):  # error acks carry the header only, not the refused request
            self._sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
        self._sock.bind((0, 0))
        self._seq = 0
        # received into, then copied out at the datagram's size: recv(1 MiB) allocated and freed
        # 1 MiB per datagram, and a dump of 100k small replies spent seconds in the kernel on it
        self._buf = bytearray(self.RECV_BYTES)

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Socket:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _next(self) -> int:
        self._seq = (self._seq + 1) & 0x7FFFFFFF or 1
        return self._seq

    def _messages(self) -> Iterator[tuple[int, int, int, memoryview]]:
        """(type, flags, seq, payload) of every message in one recv()."""
        n = self._sock.recv_into(self._buf)
        view = memoryview(bytes(memoryview(self._buf)[:n]))
        pos = 0
        while pos + _HDR.size <= len(view):
            length, kind, flags, seq, _ = _HDR.unpack_from(view, pos)
            if length < _HDR.size:
                break
            yield kind, flags, seq, view[pos + _HDR.size:pos + length]
            pos += (length + 3) & ~3

    def apply(self, requests: Sequence[Request]) -> list[NetlinkError]:
        """Send every request (acked), many per send(); return the errors, one per refused request
        (the others took effect: netlink has no transactions)."""
        errors: list[NetlinkError] = []
        i = 0
        while i < len(requests):
            buf: list[bytes] = []
            size = 0
            by_seq: dict[int, Request] = {}
            while i < len(requests) and (not buf or (size < self.BATCH_BYTES and len(buf) < self.BATCH_REQUESTS)):
                r = requests[i]
                seq = self._next()
                buf.append(message(r.type, NLM_F_REQUEST | NLM_F_ACK | r.flags, seq, r.payload))
                size += _HDR.size + len(r.payload)
                by_seq[seq] = r
                i += 1
            self._sock.send(b"".join(buf))
            while by_seq:
                for kind, _, seq, payload in self._messages():
                    if kind != NLMSG_ERROR or seq not in by_seq:
                        continue
                    r = by_seq.pop(seq)
                    code = -int(struct.unpack_from("=i", payload)[0])
                    if code:
                        errors.append(NetlinkError(code, r.what))
        return errors

    def batch(self, requests: Sequence[Request], begin: Request, end: Request) -> list[NetlinkError]:
        """`requests` between `begin` and `end` in ONE send (nfnetlink applies such a batch as one
        transaction: all of it or, when the kernel refuses a request, none); the errors of the
        refused requests. `begin` and `end` are sent without an ack; nfnetlink acks each request
        only after the whole batch was committed or aborted."""
        first = self._next()
        msgs = [message(begin.type, NLM_F_REQUEST | begin.flags, first, begin.payload)]
        by_seq: dict[int, Request] = {}
        for r in requests:
            seq = self._next()
            msgs.append(message(r.type, NLM_F_REQUEST | NLM_F_ACK | r.flags, seq, r.payload))
            by_seq[seq] = r
        msgs.append(message(end.type, NLM_F_REQUEST | end.flags, self._next(), end.payload))
        self._sock.send(b"".join(msgs))
        errors: list[NetlinkError] = []
        timeout = self._sock.gettimeout()
        try:
            while by_seq:
                try:
                    answers = list(self._messages())
                except TimeoutError:
                    if errors:  # the kernel answered a refusal and nothing more (e.g. out of memory)
                        return errors
                    raise
                for kind, _, seq, payload in answers:
                    if kind != NLMSG_ERROR or (seq not in by_seq and seq != first):
                        continue
                    code = -int(struct.unpack_from("=i", payload)[0])
                    if seq == first:
                        return [NetlinkError(code or errno.EIO, "batch")]
                    r = by_seq.pop(seq)
                    if code:
                        errors.append(NetlinkError(code, r.what))
                        # The batch is aborted. The other answers come together with this one,
                        # except when the kernel could not queue them (it then answers one
                        # request with ENOMEM): wait briefly, not for the full timeout.
                        self._sock.settimeout(0.2)
        finally:
            self._sock.settimeout(timeout)
        return errors

    def request(self, r: Request) -> None:
        """One acked request; NetlinkError when refused."""
        errors = self.apply([r])
        if errors:
            raise errors[0]

    def get(self, kind: int, payload: bytes, what: str) -> memoryview:
        """The one reply to a (non-dump) get request."""
        seq = self._next()
        self._sock.send(message(kind, NLM_F_REQUEST, seq, payload))
        while True:
            for mtype, _, mseq, body in self._messages():
                if mseq != seq:
                    continue
                if mtype == NLMSG_ERROR:
                    raise NetlinkError(-int(struct.unpack_from("=i", body)[0]) or errno.EIO, what)
                return body

    def dump(self, kind: int, payload: bytes) -> list[memoryview]:
        """Every message a dump request returns (their payloads, after the netlink header)."""
        return list(self.stream(kind, payload))

    def stream(self, kind: int, payload: bytes) -> Iterator[memoryview]:
        """The messages of a dump one by one, as they arrive (a consumer that keeps only a digest
        holds one datagram at a time); NetlinkError when the kernel refuses the dump. Consume it
        to the end: the socket serves nothing else until then."""
        seq = self._next()
        self._sock.send(message(kind, NLM_F_REQUEST | NLM_F_DUMP, seq, payload))
        while True:
            for mtype, _, mseq, body in self._messages():
                if mseq != seq:
                    continue
                if mtype == NLMSG_DONE:
                    return
                if mtype == NLMSG_ERROR:
                    code = -int(struct.unpack_from("=i", body)[0])
                    if code:
                        raise NetlinkError(code, "dump")
                    return
                yield body


class KeptSocket:
    """One netlink socket kept open between uses, for calls made at every sync: closing a
    NETLINK_NETFILTER socket right after an nf_tables commit took ~11 ms here, a third of a
    one-endpoint sync at 10k Services. Reopened after any error (a reply may still be in flight)."""

    def __init__(self, protocol: int, timeout: float | None = None) -> None:
        self.protocol = protocol
        self.timeout = timeout
        self._sock: Socket | None = None
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def use(self) -> Iterator[Socket]:
        with self._lock:
            if self._sock is None:
                self._sock = Socket(self.protocol, self.timeout)
            try:
                yield self._sock
            except BaseException:
                self._sock.close()
                self._sock = None
                raise


# -- generic netlink ------------------------------------------------------------------------------------

GENL_HDR = struct.Struct("=BBH")  # cmd, version, reserved


def genl_family(sock: Socket, name: str) -> int:
    """The id of a generic netlink family (e.g. "IPVS"); NetlinkError(ENOENT) when the kernel has none."""
    seq = sock._next()
    payload = GENL_HDR.pack(CTRL_CMD_GETFAMILY, 1, 0) + nla_str(CTRL_ATTR_FAMILY_NAME, name)
    sock._sock.send(message(GENL_ID_CTRL, NLM_F_REQUEST, seq, payload))
    while True:
        for kind, _, mseq, body in sock._messages():
            if mseq != seq:
                continue
            if kind == NLMSG_ERROR:
                code = -int(struct.unpack_from("=i", body)[0])
                raise NetlinkError(code or errno.ENOENT, f"generic netlink family {name}")
            attrs = parse_attrs(body, GENL_HDR.size)
            return u16(attrs[CTRL_ATTR_FAMILY_ID])


# -- rtnetlink addresses ------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Address:
    ifindex: int
    address: str
    prefixlen: int


def dump_addresses(sock: Socket, family: int = socket.AF_UNSPEC) -> list[Address]:
    """Every address of every interface (IFA_LOCAL, else IFA_ADDRESS)."""
    out = []
    for body in sock.dump(RTM_GETADDR, _IFADDR.pack(family, 0, 0, 0, 0)):
        fam, plen, _, _, index = _IFADDR.unpack_from(body)
        attrs = parse_attrs(body, _IFADDR.size)
        raw = attrs.get(IFA_LOCAL) or attrs.get(IFA_ADDRESS)
        if raw is not None and fam in (socket.AF_INET, socket.AF_INET6):
            out.append(Address(index, ip_text(fam, raw), plen))
    return out


def address_request(add: bool, ifindex: int, address: str) -> Request:
    """Add (or delete) `address`/32 (or /128) on an interface, without duplicate address detection."""
    fam, packed = ip_bytes(address)
    plen = 32 if fam == socket.AF_INET else 128
    body = _IFADDR.pack(fam, plen, IFA_F_NODAD if fam == socket.AF_INET6 else 0, RT_SCOPE_UNIVERSE, ifindex)
    body += nla(IFA_LOCAL, packed) + nla(IFA_ADDRESS, packed)
    if add:
        return Request(RTM_NEWADDR, body, f"add address {address} to interface {ifindex}", NLM_F_CREATE | NLM_F_REPLACE)
    return Request(RTM_DELADDR, body, f"delete address {address} from interface {ifindex}")
