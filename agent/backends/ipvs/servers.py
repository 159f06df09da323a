"""What IPVS holds, as plain values: virtual servers and their real servers. Pure (no kernel), so
the render module and the writer share them."""

from __future__ import annotations

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
