"""The nftables mode as the registry lists it. Imports nothing heavy: the writer loads on use."""

from __future__ import annotations

from agent.backends.base import Backend, ModeOptions, ModeSpec


def _make(options: ModeOptions) -> Backend:
    from agent.backends.nftables.writer import NftablesBackend

    return NftablesBackend(families=options.families, registry=options.registry)


SPEC = ModeSpec(
    name="nftables",
    summary="one kube-proxy-agent table per family, verdict maps, one transaction per sync",
    factory=_make,
    # kube-proxy's nftables mode takes NodePorts only on the node's primary IPs unless told otherwise
    default_nodeport_addresses=("primary",),
)
