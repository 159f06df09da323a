"""The iptables mode as the registry lists it. Imports nothing heavy: the writer loads on use."""

from __future__ import annotations

from agent.backends.base import Backend, ModeOptions, ModeSpec, Setting


def _make(options: ModeOptions) -> Backend:
    from agent.backends.iptables.writer import IptablesBackend

    return IptablesBackend(families=options.families, registry=options.registry,
                           localhost_nodeports=bool(options.settings["iptables_localhost_nodeports"]))


SETTINGS = (
    Setting("iptables_localhost_nodeports", "--iptables-localhost-nodeports", ("iptables", "localhostNodePorts"),
            "bool", True,
            "serve NodePorts on 127.0.0.1 when --nodeport-addresses allows loopback (sets route_localnet=1 "
            "and drops packets from outside the node to 127.0.0.0/8, as kube-proxy does); false: leave "
            "loopback traffic alone"),
)


SPEC = ModeSpec(
    name="iptables",
    summary="iptables-restore --noflush of KPA- chains (nft or legacy variant, whichever holds rules)",
    factory=_make,
    settings=SETTINGS,
)
