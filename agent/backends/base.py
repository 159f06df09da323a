"""The interface every proxy mode implements, and what a sync reports back."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

from agent.model.desired import ChangedPorts, DesiredState


class UnsupportedMode(RuntimeError):
    """The kernel or the machine cannot run this mode; the message says what is missing."""


class SyncError(RuntimeError):
    """Writing to the kernel failed; the previous rules stay in place. `kind` labels the metric."""

    def __init__(self, message: str, kind: str = "restore", partial: bool = False) -> None:
        super().__init__(message)
        self.kind = kind
        self.partial = partial


@dataclass(slots=True)
class SyncResult:
    written: dict[str, int] = field(default_factory=dict)  # rules/elements written, per table or map
    totals: dict[str, int] = field(default_factory=dict)  # rules/elements now present, per table or map
    detail: str = ""


class Backend(Protocol):
    name: ClassVar[str]

    def check_supported(self) -> None:
        """Raise UnsupportedMode naming what is missing and which mode would work."""

    def sync(
        self, desired: Mapping[int, DesiredState], changed: Mapping[int, ChangedPorts], *, full: bool
    ) -> SyncResult:
        """Make the kernel match `desired`; with full=False only `changed` ports need writing."""

    def render(self, desired: Mapping[int, DesiredState]) -> str:
        """Exactly what a full sync would program, as text, without touching the kernel."""

    def cleanup(self) -> None:
        """Remove everything this mode ever created, and nothing else. Idempotent."""
