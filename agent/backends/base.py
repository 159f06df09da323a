"""What a proxy mode is: the interface every mode implements, what it is given, what a sync reports
back, and how a mode describes itself to the registry (its name, settings and factory).

A mode owns everything about its kernel state: what it writes, its own metrics (registered on the
registry it is given), the cleanup of stale flows after a sync, and what it leaves when the agent
stops. The sync loop only hands it desired state and changes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

from agent.model.desired import Changes, DesiredState, NodeContext, ServicePlan

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry


class UnsupportedMode(RuntimeError):
    """The kernel or the machine cannot run this mode; the message says what is missing."""


class SyncError(RuntimeError):
    """Writing to the kernel failed; the previous state stays in place. The mode has already
    counted it in its own metrics; `partial` says whether an incremental sync failed."""

    def __init__(self, message: str, partial: bool = False) -> None:
        super().__init__(message)
        self.partial = partial


@dataclass(slots=True)
class SyncResult:
    """What one successful sync did, in the mode's own words (for the sync log line; the mode has
    already put these in its own metrics)."""

    written: dict[str, int] = field(default_factory=dict)  # e.g. rules per table, elements per map
    totals: dict[str, int] = field(default_factory=dict)  # what the kernel holds now, same keys
    detail: str = ""
    repaired: int = 0  # service ports (or objects) found drifted and rewritten by this sync


@dataclass(slots=True)
class Programmed:
    """What the kernel holds for some service ports, in the mode's own terms (for `explain`), and
    where that differs from what the mode would write now (`differences`: drift)."""

    lines: list[str] = field(default_factory=list)
    differences: list[str] = field(default_factory=list)


class Backend(Protocol):
    """One proxy mode. Lifecycle: check_supported() -> start() -> sync()... -> close()."""

    @property
    def name(self) -> str:
        """The mode's name, as --proxy-mode takes it."""

    def check_supported(self) -> None:
        """Raise UnsupportedMode naming what is missing and which mode would work. Touches nothing."""

    def start(self) -> None:
        """Take over what a previous run of this mode left (the first sync replaces it without a gap
        in service); start the mode's own threads."""

    def sync(self, desired: Mapping[int, DesiredState], changes: Mapping[int, Changes], *, full: bool) -> SyncResult:
        """Make the kernel match `desired`; with full=False only what `changes` names needs writing.
        After writing, the mode cleans up the stale flows the changes carry. Raises SyncError
        (previous state kept) when the kernel refuses; then the same stale flows come again."""

    def render(self, desired: Mapping[int, DesiredState]) -> str:
        """Exactly what a full sync would program, as text, without touching the kernel."""

    def cleanup(self) -> None:
        """Remove everything this mode ever created, and nothing else (not another mode's state).
        Idempotent."""

    def features(self) -> dict[str, str]:
        """What this mode found and uses on this node, in words (for `status`), e.g. the iptables
        variant or the nftables writer. Cheap: nothing is probed that the mode did not already."""

    def programmed(self, nodes: Mapping[int, NodeContext], plans: Sequence[ServicePlan]) -> Programmed:
        """Read the kernel state of these service ports (their chains, map elements, virtual
        servers or map entries) and compare it with what the mode writes for them. Writes nothing."""

    def close(self, timeout: float) -> None:
        """The agent stops: leave the datapath serving, finish queued cleanup (up to `timeout` s)."""


SettingKind = Literal["str", "int", "bool", "duration", "cidrs"]


@dataclass(frozen=True, slots=True)
class Setting:
    """A mode-specific flag and its KubeProxyConfiguration field, with kube-proxy's name and default.

    `overrides` names an AgentConfig field this setting replaces while the mode runs (e.g.
    --ipvs-sync-period for sync_period), when it is given."""

    name: str  # key in AgentConfig.mode_settings, e.g. "ipvs_scheduler"
    flag: str  # e.g. "--ipvs-scheduler"
    config: tuple[str, ...]  # path in a KubeProxyConfiguration, e.g. ("ipvs", "scheduler")
    kind: SettingKind
    default: Any
    help: str
    choices: tuple[str, ...] = ()
    overrides: str = ""


@dataclass(frozen=True, slots=True)
class ModeOptions:
    """What the composition root hands a mode when it builds it."""

    families: tuple[int, ...] = (4, 6)
    settings: Mapping[str, Any] = field(default_factory=dict)  # this mode's settings, defaults filled in
    registry: CollectorRegistry | None = None  # where the mode's metrics go; None: a private registry


@dataclass(frozen=True, slots=True)
class ModeSpec:
    """A mode as the registry lists it. `factory` imports the mode's code only when called, so a
    mode whose kernel libraries are missing still lists, and says what is missing."""

    name: str
    summary: str
    factory: Callable[[ModeOptions], Backend]
    settings: tuple[Setting, ...] = ()
    # interfaces the mode creates and fills with service addresses: not this node's own addresses
    owned_links: tuple[str, ...] = ()
    frontends: bool = False  # the mode reads DesiredState.frontends (the model keeps it only then)
    # --nodeport-addresses when none is given (kube-proxy's nftables mode: "primary")
    default_nodeport_addresses: tuple[str, ...] = ()
    built: bool = True  # False: listed, but check_supported() says it is not in this release
    # a takeover (--cleanup-kube-proxy): removes what kube-proxy's mode of this name leaves besides
    # iptables chains and nftables tables; its argument says which kernel objects the running mode
    # serves itself (they stay); returns one line per change made
    kube_proxy_cleanup: Callable[[Callable[[Any], bool]], list[str]] | None = None

    def options(self, families: tuple[int, ...], given: Mapping[str, Any],
                registry: CollectorRegistry | None = None) -> ModeOptions:
        values = {s.name: given.get(s.name, s.default) for s in self.settings}
        return ModeOptions(families, values, registry)


class NotBuilt:
    """A mode listed but not built in this release: check_supported() says so, after saying what
    this machine would lack for it anyway (`gap`: "" when nothing)."""

    def __init__(self, name: str, gap: Callable[[], str]) -> None:
        self._name = name
        self._gap = gap

    @property
    def name(self) -> str:
        return self._name

    def check_supported(self) -> None:
        gap = self._gap()
        if gap:
            raise UnsupportedMode(
                f"--proxy-mode {self._name} cannot run here: {gap}. "
                "Use --proxy-mode nftables or --proxy-mode iptables, which need only netfilter"
            )
        raise UnsupportedMode(
            f"--proxy-mode {self._name} is not implemented in this release of kube-proxy-agent; "
            "use --proxy-mode nftables or --proxy-mode iptables"
        )

    def start(self) -> None:
        self.check_supported()

    def sync(self, desired: Mapping[int, DesiredState], changes: Mapping[int, Changes], *, full: bool) -> SyncResult:
        self.check_supported()
        return SyncResult()

    def render(self, desired: Mapping[int, DesiredState]) -> str:
        self.check_supported()
        return ""

    def cleanup(self) -> None:
        """Nothing was ever created."""

    def programmed(self, nodes: Mapping[int, NodeContext], plans: Sequence[ServicePlan]) -> Programmed:
        return Programmed(["this mode is not built: nothing is programmed"])

    def features(self) -> dict[str, str]:
        return {}

    def close(self, timeout: float) -> None:
        """Nothing runs."""
