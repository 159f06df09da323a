"""The iptables mode as the registry lists it. Imports nothing heavy: the writer loads on use."""

from __future__ import annotations

from agent.backends.base import Backend, ModeOptions, ModeSpec


def _make(options: ModeOptions) -> Backend:
    from agent.backends.iptables.writer import IptablesBackend

    return IptablesBackend(families=options.families, registry=options.registry)


SPEC = ModeSpec(
    name="iptables",
    summary="iptables-restore --noflush of KPA- chains (nft or legacy variant, whichever holds rules)",
    factory=_make,
)
