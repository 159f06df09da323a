"""What upstream kube-proxy's IPVS mode leaves on a node, and removing it (`--cleanup-kube-proxy`).

kube-proxy v1.37's IPVS mode (pkg/proxy/ipvs) binds every ClusterIP, external and load-balancer IP
to the dummy interface `kube-ipvs0`, makes one virtual server per such address and port and per
node address and NodePort, and keeps its ipsets under fixed names (`KUBE-...`, `KUBE-6-...` for
IPv6). Its own cleanup flushes every virtual server on the node; this one removes only kube-proxy's:
those on `kube-ipvs0`'s addresses and those on a node address at a port of its NodePort sets, minus
the ones the running mode serves itself (the ipvs mode adopts a virtual server with the same
address and port in its first sync). Its iptables chains go with agent.kernel.kubeproxy, before
the ipsets their rules reference.
"""

from __future__ import annotations

import contextlib
import errno
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from agent.backends.ipvs.servers import ServiceKey
from agent.kernel import ipset
from agent.kernel.netlink import NETLINK_ROUTE, Socket, dump_addresses

DUMMY = "kube-ipvs0"
PROC_IP_VS = Path("/proc/net/ip_vs")
_SETS = ("LOOP-BACK", "CLUSTER-IP", "EXTERNAL-IP", "EXTERNAL-IP-LOCAL", "LOAD-BALANCER", "LOAD-BALANCER-LOCAL",
         "LOAD-BALANCER-FW", "LOAD-BALANCER-SOURCE-IP", "LOAD-BALANCER-SOURCE-CIDR", "NODE-PORT-TCP",
         "NODE-PORT-LOCAL-TCP", "NODE-PORT-UDP", "NODE-PORT-LOCAL-UDP", "NODE-PORT-SCTP-HASH",
         "NODE-PORT-LOCAL-SCTP-HASH", "HEALTH-CHECK-NODE-PORT", "IPVS-IPS")
# kube-proxy's own names: IPv4 "KUBE-X", IPv6 "KUBE-6-X" cut at ipset's 31 characters
SET_NAMES = frozenset(f"KUBE-{s}" for s in _SETS) | frozenset(f"KUBE-6-{s}"[:31] for s in _SETS)


@dataclass
class KubeProxyIpvs:
    """kube-proxy's IPVS-mode state on this node, as read from the kernel."""

    ifindex: int = 0  # of kube-ipvs0, 0 when absent
    on_dummy: set[str] = field(default_factory=set)  # addresses on kube-ipvs0
    local: set[str] = field(default_factory=set)  # every address of the node
    node_ports: set[tuple[str, int]] = field(default_factory=set)  # (protocol, port) in its NodePort sets
    sets: list[str] = field(default_factory=list)  # its ipsets present

    def owns(self, key: ServiceKey) -> bool:
        """Whether kube-proxy made (or serves) this virtual server."""
        return key.address in self.on_dummy or (
            key.address in self.local and (key.protocol.upper(), key.port) in self.node_ports)


def _port_of(entry: str, set_name: str) -> tuple[str, int] | None:
    """(protocol, port) of a NodePort set entry: "30080" (bitmap:port) or "10.0.0.1,sctp:30080"."""
    tail = entry.rsplit(",", 1)[-1]
    proto, _, port = tail.rpartition(":")
    if not port.isdigit():
        return None
    if not proto:
        proto = "UDP" if set_name.endswith("-UDP") else "SCTP" if "SCTP" in set_name else "TCP"
    return proto.upper(), int(port)


def read() -> KubeProxyIpvs:
    state = KubeProxyIpvs()
    with contextlib.suppress(OSError):
        state.ifindex = socket.if_nametoindex(DUMMY)
    with Socket(NETLINK_ROUTE) as rt:
        for a in dump_addresses(rt):
            state.local.add(a.address)
            if state.ifindex and a.ifindex == state.ifindex:
                state.on_dummy.add(a.address)
    if ipset.available():
        try:
            found = {n: m for n, m in ipset.members("KUBE-").items() if n in SET_NAMES}
        except ipset.IpsetError:  # a kernel without ipsets holds none of kube-proxy's
            found = {}
        state.sets = sorted(found)
        for name, entries in found.items():
            if "NODE-PORT" in name:
                state.node_ports |= {p for e in entries if (p := _port_of(e, name)) is not None}
    return state


def cleanup(keep: Callable[[ServiceKey], bool] = lambda _key: False) -> list[str]:
    """Remove kube-proxy's virtual servers (but those `keep` says the running mode serves), its
    dummy interface and its ipsets; one line per change made. Run after its iptables chains are
    gone (their rules reference the ipsets)."""
    state = read()
    done = []
    if PROC_IP_VS.exists():
        from agent.backends.ipvs.ipvsnl import Ipvs

        ipvs = Ipvs()
        try:
            doomed = [vs.key for vs in ipvs.services() if state.owns(vs.key) and not keep(vs.key)]
            errors = [e for e in ipvs.apply([ipvs.delete_service(k) for k in doomed])
                      if e.errno not in (errno.ENOENT, errno.ESRCH)]
            if errors:
                raise OSError(errors[0].errno, f"deleting kube-proxy's virtual server: {errors[0].what}")
        finally:
            ipvs.close()
        if doomed:
            done.append(f"removed {len(doomed)} IPVS virtual server(s) of kube-proxy's (on {DUMMY} or its NodePorts)")
    if state.ifindex:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            ipr.link("del", index=state.ifindex)
        done.append(f"removed interface {DUMMY} ({len(state.on_dummy)} address(es))")
    if state.sets:
        ipset.destroy(state.sets)
        done.append(f"removed ipsets {','.join(state.sets)}")
    return done
