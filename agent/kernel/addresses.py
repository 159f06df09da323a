"""This node's own IP addresses, read from the kernel over netlink."""

from __future__ import annotations

from pyroute2 import IPRoute


def local_ips() -> list[str]:
    with IPRoute() as ipr:
        return [str(a.get_attr("IFA_ADDRESS")) for a in ipr.get_addr()]
