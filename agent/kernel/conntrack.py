"""Deleting stale UDP conntrack entries so clients of a removed endpoint move on."""

from __future__ import annotations

import logging

from agent.kernel.commands import CommandError, have, run
from agent.model.state import StaleFlow

log = logging.getLogger("agent.conntrack")


def argv_for(flow: StaleFlow) -> list[str]:
    """The conntrack command deleting exactly the flows `flow` names:
    - an endpoint that went away: flows to the frontend that were DNATed to it;
    - a service that had no endpoint and now has one: flows to the frontend that were not DNATed
      (their reply would come from the frontend itself). Flows the new rules already sent to an
      endpoint are left alone: deleting one mid-request loses its reply."""
    argv = ["conntrack", "-D", "-f", "ipv4" if flow.family == 4 else "ipv6", "-p", "udp"]
    if flow.frontend is not None:
        argv += ["--orig-dst", flow.frontend]
    argv += ["--orig-port-dst", str(flow.port)]
    if flow.endpoint_ip is not None:
        argv += ["--dst-nat", flow.endpoint_ip]
    elif flow.frontend is not None:
        argv += ["--reply-src", flow.frontend]
    else:  # a node port on any node address: not DNATed means the reply comes from that port
        argv += ["--reply-port-src", str(flow.port)]
    return argv


def flush(flows: list[StaleFlow]) -> None:
    if not have("conntrack"):
        log.warning("conntrack tool missing; stale UDP flows not cleared (apt-get install conntrack)")
        return
    for flow in dict.fromkeys(flows):
        try:
            run(argv_for(flow), timeout=30)
            log.info("conntrack entries deleted %s", " ".join(argv_for(flow)[2:]))
        except CommandError as exc:
            if "0 flow entries" not in exc.stderr:
                log.warning("conntrack delete failed argv=%r error=%r", argv_for(flow), exc.stderr)
