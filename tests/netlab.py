"""A tiny network lab for tests: namespaces, veths, a bridge, echo servers and clients.

Sockets are opened *inside* a namespace from this process (a short-lived thread joins the
namespace with setns, makes the socket, and the socket stays there), so servers and probes need no
extra processes. Everything created is recorded and removed by `Lab.close()`.
Only addresses created here are ever used.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import selectors
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL("libc.so.6", use_errno=True)
SCTP = getattr(socket, "IPPROTO_SCTP", 132)


def sh(*argv: str, check: bool = True, input: str | None = None) -> str:
    proc = subprocess.run(list(argv), capture_output=True, text=True, input=input, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def _setns(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns {path}: {os.strerror(err)}")
    finally:
        os.close(fd)


# namespaces whose sockets must belong to a cgroup (the eBPF mode's socket hooks act per cgroup):
# made by a helper process living there
HOOKED: dict[str, CgroupSockets] = {}

_HELPER = r"""
import ctypes, os, socket, sys, threading
libc = ctypes.CDLL("libc.so.6", use_errno=True)
chan = socket.socket(fileno=int(sys.argv[1]))

def make(ns, family, type_, proto, out):
    # setns in a thread of its own: the process stays in its namespace (a namespace being
    # deleted kills what lives in it, and this helper must outlive every pod)
    try:
        fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
        try:
            if libc.setns(fd, 0x40000000) != 0:
                raise OSError(ctypes.get_errno(), "setns")
        finally:
            os.close(fd)
        out.append(socket.socket(int(family), int(type_), int(proto)))
    except OSError as exc:
        out.append(exc)

while True:
    msg = chan.recv(256)
    if not msg:
        break
    out = []
    t = threading.Thread(target=make, args=(*msg.decode().split(), out))
    t.start()
    t.join()
    if isinstance(out[0], socket.socket):
        socket.send_fds(chan, [b"ok"], [out[0].fileno()])
        out[0].close()
    else:
        chan.send(f"error {out[0]}".encode())
"""


class CgroupSockets:
    """Sockets created by a helper process in a cgroup v2 directory: a socket belongs to its
    creator's cgroup, so programs attached to that cgroup see it, while this process's own sockets
    (an "outside" client's) stay outside."""

    def __init__(self, cgroup: str) -> None:
        os.makedirs(cgroup, exist_ok=True)
        self.cgroup = cgroup
        self._lock = threading.Lock()
        self._chan, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)

        def enter() -> None:
            with open(os.path.join(cgroup, "cgroup.procs"), "w") as fh:
                fh.write(str(os.getpid()))

        import sys

        self._proc = subprocess.Popen([sys.executable, "-c", _HELPER, str(child.fileno())], pass_fds=[child.fileno()],
                                      preexec_fn=enter)
        child.close()

    def socket(self, ns: str, family: int, type_: int, proto: int) -> socket.socket:
        with self._lock:
            self._chan.send(f"{ns} {int(family)} {int(type_)} {proto}".encode())
            msg, fds, _, _ = socket.recv_fds(self._chan, 256, 1)
        if not fds:
            raise OSError(msg.decode())
        return socket.socket(fileno=fds[0])

    def close(self) -> None:
        self._chan.close()
        try:
            self._proc.wait(5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
        with contextlib.suppress(OSError):
            os.rmdir(self.cgroup)


def socket_in(ns: str | None, family: int, type_: int, proto: int = 0) -> socket.socket:
    """A socket living in namespace `ns` (None: this process's own namespace)."""
    if ns is None:
        return socket.socket(family, type_, proto)
    if ns in HOOKED:
        return HOOKED[ns].socket(ns, family, type_, proto)
    box: dict[str, object] = {}

    def make() -> None:
        try:
            _setns(f"/run/netns/{ns}")
            box["sock"] = socket.socket(family, type_, proto)
        except BaseException as exc:  # handed to the caller
            box["err"] = exc

    t = threading.Thread(target=make)  # the thread dies in the namespace; ours never moves
    t.start()
    t.join()
    if "err" in box:
        raise box["err"]  # type: ignore[misc]
    sock = box["sock"]
    assert isinstance(sock, socket.socket)
    return sock


def family_of(ip: str) -> int:
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


PROTOS = {"tcp": (socket.SOCK_STREAM, 0), "udp": (socket.SOCK_DGRAM, 0), "sctp": (socket.SOCK_STREAM, SCTP)}


def sctp_available() -> bool:
    try:
        socket.socket(socket.AF_INET, socket.SOCK_STREAM, SCTP).close()
        return True
    except OSError:
        return False


def probe(ns: str | None, ip: str, port: int, proto: str = "tcp", timeout: float = 1.0,
          src_port: int = 0, sock: socket.socket | None = None, src_ip: str = "") -> str:
    """Connect, send a line, return the reply ("<server name> <client ip as seen>") or one of
    REFUSED, TIMEOUT, RESET, UNREACHABLE."""
    typ, pr = PROTOS[proto]
    fam = family_of(ip)
    own = sock is None
    s = sock or socket_in(ns, fam, typ, pr)
    try:
        s.settimeout(timeout)
        if own and (src_port or src_ip):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((src_ip or ("::" if fam == socket.AF_INET6 else "0.0.0.0"), src_port))
        s.connect((ip, port))  # a connected UDP socket is told about ICMP port unreachable
        s.sendall(b"hi\n")
        data = s.recv(512)
        return data.decode().strip() or "EMPTY"
    except ConnectionRefusedError:
        return "REFUSED"
    except ConnectionResetError:
        return "RESET"
    except TimeoutError:
        return "TIMEOUT"
    except OSError as exc:
        if exc.errno in (113, 101):  # EHOSTUNREACH, ENETUNREACH
            return "UNREACHABLE"
        raise
    finally:
        if own:
            s.close()


def http_get(ns: str | None, ip: str, port: int, path: str, timeout: float = 3) -> tuple[int, str]:
    """(status, body) of a plain HTTP/1.0 GET made from inside namespace `ns`."""
    s = socket_in(ns, family_of(ip), socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect((ip, port))
        s.sendall(f"GET {path} HTTP/1.0\r\nHost: {ip}\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    finally:
        s.close()
    head, _, body = data.decode(errors="replace").partition("\r\n\r\n")
    return int(head.split()[1]), body


def metric_sum(exposition: str, name: str) -> float:
    """The sum of every sample of metric `name` (all label sets) in Prometheus text format."""
    total = 0.0
    for line in exposition.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def who(answers: Sequence[str]) -> set[str]:
    """The servers that answered ('<name> <peer>' replies)."""
    return {a.split()[0] for a in answers}


class EchoServer:
    """Answers every TCP/SCTP connection and UDP datagram with '<name> <peer ip>'.

    One thread per server multiplexes all its sockets and connections (selectors): a client that
    connects and says nothing never holds up the next one, and a busy test process runs few threads."""

    WAIT_FOR_DATA = 1.0  # a connection that sends nothing for this long is closed unanswered

    def __init__(self, ns: str, name: str, ports: Sequence[tuple[str, int]], families: Sequence[int]) -> None:
        self.name = name
        self._socks: list[socket.socket] = []
        self._stop = threading.Event()
        self._sel = selectors.DefaultSelector()
        for proto, port in ports:
            if proto == "sctp" and not sctp_available():
                continue
            typ, pr = PROTOS[proto]
            for fam in families:
                s = socket_in(ns, fam, typ, pr)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if fam == socket.AF_INET6:
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                s.bind(("::" if fam == socket.AF_INET6 else "0.0.0.0", port))
                if typ == socket.SOCK_STREAM:
                    s.listen(128)
                s.setblocking(False)
                self._socks.append(s)
                self._sel.register(s, selectors.EVENT_READ, "udp" if proto == "udp" else "listen")
        self._wake_r, self._wake_w = socket.socketpair()  # close() wakes the loop at once
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._thread = threading.Thread(target=self._serve, name=f"echo-{name}", daemon=True)
        self._thread.start()

    def _reply(self, peer: str) -> bytes:
        return f"{self.name} {peer}\n".encode()

    def _serve(self) -> None:
        pending: dict[socket.socket, tuple[float, str]] = {}  # connection -> (deadline, peer ip)
        while not self._stop.is_set():
            try:
                events = self._sel.select(timeout=0.2)
            except (OSError, ValueError):
                return  # closed under us
            for key, _ in events:
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if key.data == "wake":
                    break
                with contextlib.suppress(OSError):
                    if key.data == "udp":
                        _, peer = sock.recvfrom(512)
                        sock.sendto(self._reply(peer[0]), peer)
                    elif key.data == "listen":
                        conn, peer = sock.accept()
                        conn.setblocking(False)
                        pending[conn] = (time.monotonic() + self.WAIT_FOR_DATA, peer[0])
                        self._sel.register(conn, selectors.EVENT_READ, "conn")
                    else:
                        _, peer_ip = pending.pop(sock)
                        self._sel.unregister(sock)
                        try:
                            if sock.recv(512):
                                sock.sendall(self._reply(peer_ip))
                        finally:
                            sock.close()
            now = time.monotonic()
            for conn in [c for c, (deadline, _) in pending.items() if deadline < now]:
                del pending[conn]
                with contextlib.suppress(KeyError, ValueError):
                    self._sel.unregister(conn)
                conn.close()
        for conn in pending:
            conn.close()

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        self._thread.join(2)
        for s in [*self._socks, self._wake_r, self._wake_w]:
            s.close()
        self._sel.close()


@dataclass
class Lab:
    """Creates namespaces and links with unique names; close() removes all of them."""

    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    namespaces: list[str] = field(default_factory=list)
    servers: list[EchoServer] = field(default_factory=list)
    procs: list[subprocess.Popen[str]] = field(default_factory=list)
    _links: int = 0

    def ns(self, role: str) -> str:
        name = f"kpa-{self.tag}-{role}"
        sh("ip", "netns", "add", name)
        self.namespaces.append(name)
        self.exec(name, "ip", "link", "set", "lo", "up")
        return name

    def drop_ns(self, ns: str) -> None:
        """Delete one namespace made by ns() now (its veths go with it), killing what runs in it."""
        for pid in sh("ip", "netns", "pids", ns, check=False).split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), 9)
        sh("ip", "netns", "del", ns, check=False)
        if ns in self.namespaces:
            self.namespaces.remove(ns)

    def exec(self, ns: str, *argv: str, check: bool = True) -> str:
        return sh("ip", "netns", "exec", ns, *argv, check=check)

    def link_name(self, prefix: str) -> str:
        self._links += 1
        return f"{prefix}{self.tag[:4]}{self._links}"

    def veth(self, a_ns: str, b_ns: str, a_if: str | None = None, b_if: str | None = None) -> tuple[str, str]:
        a = a_if or self.link_name("va")
        b = b_if or self.link_name("vb")
        sh("ip", "link", "add", a, "netns", a_ns, "type", "veth", "peer", "name", b, "netns", b_ns)
        self.exec(a_ns, "ip", "link", "set", a, "up")
        self.exec(b_ns, "ip", "link", "set", b, "up")
        return a, b

    def addr(self, ns: str, dev: str, *cidrs: str) -> None:
        for c in cidrs:
            args = ["ip", "addr", "add", c, "dev", dev] + (["nodad"] if ":" in c else [])
            self.exec(ns, *args)

    def route(self, ns: str, *spec: str) -> None:
        self.exec(ns, "ip", "-6" if any(":" in s for s in spec) else "-4", "route", "add", *spec)

    def sysctl(self, ns: str, *settings: str) -> None:
        for s in settings:
            self.exec(ns, "sysctl", "-qw", s)

    def serve(self, ns: str, name: str, ports: Sequence[tuple[str, int]], v6: bool = True) -> EchoServer:
        fams = [socket.AF_INET] + ([socket.AF_INET6] if v6 else [])
        srv = EchoServer(ns, name, ports, fams)
        self.servers.append(srv)
        return srv

    def spawn(self, ns: str, argv: Sequence[str], log_path: str) -> subprocess.Popen[str]:
        """Run argv in namespace `ns` (nsenter, not `ip netns exec`, whose fresh /sys would hide
        /sys/fs/bpf from the program)."""
        out = open(log_path, "a")  # noqa: SIM115 (owned by the process)
        proc = subprocess.Popen(["nsenter", f"--net=/run/netns/{ns}", *argv], stdout=out, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for srv in self.servers:
            srv.close()
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        for ns in reversed(self.namespaces):
            sh("ip", "netns", "pids", ns, check=False)
            for pid in sh("ip", "netns", "pids", ns, check=False).split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), 9)
            sh("ip", "netns", "del", ns, check=False)
        self.namespaces.clear()


def recv_line(sock: socket.socket) -> bytes:
    """Bytes up to and including the first newline (or all there were, if the peer closed first)."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def wait_for(predicate: object, timeout: float = 15.0, interval: float = 0.1) -> bool:
    assert callable(predicate)
    end = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() > end:
            return False
        time.sleep(interval)


@contextlib.contextmanager
def scratch_netns(prefix: str) -> Iterator[str]:
    """A network namespace of the caller's own, `prefix-<random>`, deleted afterwards."""
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@contextlib.contextmanager
def lab() -> Iterator[Lab]:
    lb = Lab()
    try:
        yield lb
    finally:
        lb.close()


def ebpf_maps(pins: str) -> str:
    """The eBPF mode's service and backend map entries under a pin directory, decoded (for failure
    reports)."""
    import ctypes

    from agent.backends.ebpf import layout as L

    try:
        from bcc import libbcc
    except ImportError:
        return "(bcc not importable)"

    def entries(name: str, ksize: int, vsize: int) -> list[tuple[bytes, bytes]]:
        fd = libbcc.lib.bpf_obj_get(f"{pins}/{name}".encode())
        if fd < 0:
            return []
        out = []
        key, nxt, val = (ctypes.create_string_buffer(ksize), ctypes.create_string_buffer(ksize),
                         ctypes.create_string_buffer(vsize))
        first = True
        while libbcc.lib.bpf_get_next_key(fd, None if first else key, nxt) == 0:
            first = False
            if libbcc.lib.bpf_lookup_elem(fd, nxt, val) == 0:
                out.append((nxt.raw, val.raw))
            ctypes.memmove(key, nxt, ksize)
        os.close(fd)
        return out

    backends = {struct_id: L.decode_backend(v) for k, v in entries("backends", 4, 20)
                for struct_id in [int.from_bytes(k, "little")]}
    lines = []
    for k, v in sorted(entries("svcs", 24, 16), key=lambda kv: L.decode_svc_key(kv[0])):
        fkey, scope, slot = L.decode_svc_key(k)
        backend_id, count, flags, _affinity, svc_id = L.decode_svc_val(v)
        where = "sockets" if scope == 0 else "tc"
        if slot == 0:
            lines.append(f"{fkey} {where} count={count} flags={flags} id={svc_id}")
        else:
            lines.append(f"{fkey} {where} slot {slot} -> #{backend_id} {backends.get(backend_id, 'MISSING')}")
    import ipaddress
    import struct as _struct

    def ip(raw: bytes) -> str:
        return str(ipaddress.ip_address(raw[:4])) if raw[4:16] == bytes(12) else str(ipaddress.ip_address(raw[:16]))

    for name in ("ct_fwd", "ct_rev"):
        for k, v in entries(name, 40, 20):
            sport, dport = _struct.unpack_from("!HH", k, 32)
            vport = _struct.unpack_from("!H", v, 16)[0]
            lines.append(f"{name} {ip(k[:16])}:{sport} -> {ip(k[16:32])}:{dport} proto={k[36]} => {ip(v[:16])}:{vport}")
    return "\n".join(lines) or "(empty)"
