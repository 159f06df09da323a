"""What IPVS holds, as plain values: virtual servers and their real servers. Pure (no kernel), so
the render module and the writer share them."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, replace

F_PERSISTENT = 0x1  # ClientIP affinity: persistence with a timeout
F_HASHED = 0x2  # set by the kernel on every service it holds; never compared
F_SCHED1 = 0x8  # sh-fallback / mh-fallback
F_SCHED2 = 0x10  # sh-port / mh-port ("FlagSourceHash" in kube-proxy, set for mh)


@dataclass(frozen=True, slots=True, order=True)
class ServiceKey:
    """What identifies a virtual server: protocol, address, port."""

    protocol: str
    address: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{self.protocol} {host}:{self.port}"


@dataclass(frozen=True, slots=True)
class VirtualServer:
    key: ServiceKey
    scheduler: str = "rr"
    flags: int = 0  # without F_HASHED
    timeout: int = 0  # persistence (ClientIP affinity), seconds; 0: none


@dataclass(frozen=True, slots=True, order=True)
class RealServer:
    address: str
    port: int
    weight: int = 1
    masquerade: bool = True
    active: int = 0  # connection counts, from dumps only
    inactive: int = 0

    @property
    def key(self) -> tuple[str, int]:
        return (self.address, self.port)

    def settings(self) -> RealServer:
        """Without the counters: what is compared with what we want."""
        return replace(self, active=0, inactive=0)


def _proc_addr(text: str) -> tuple[str, int]:
    """`0A600001:0050` or `[fd00:0096:...:0001]:0035` -> (address, port)."""
    host, _, port = text.rpartition(":")
    if host.startswith("["):
        return str(ipaddress.ip_address(host[1:-1])), int(port, 16)
    return str(ipaddress.ip_address(int(host, 16))), int(port, 16)


def parse_proc_ip_vs(text: str) -> dict[ServiceKey, list[RealServer]]:
    """Every virtual server (by key) with its real servers, weights and connection counts, from
    /proc/net/ip_vs: one read instead of one netlink dump per virtual server. Firewall-mark
    services (`FWM`) are skipped."""
    out: dict[ServiceKey, list[RealServer]] = {}
    current: list[RealServer] | None = None
    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        if parts[0] in ("TCP", "UDP", "SCTP") and len(parts) >= 2:
            address, port = _proc_addr(parts[1])
            current = out.setdefault(ServiceKey(parts[0], address, port), [])
        elif parts[0] == "FWM":
            current = None
        elif parts[0] == "->" and current is not None and len(parts) >= 6 and parts[1][0] in "0123456789ABCDEF[":
            address, port = _proc_addr(parts[1])
            current.append(RealServer(address, port, weight=int(parts[3]), masquerade=parts[2] == "Masq",
                                      active=int(parts[4]), inactive=int(parts[5])))
    return out
