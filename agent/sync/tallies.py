"""Per-node figures derived from the plans (service ports without local endpoints, health check
ports), kept up to date from each drain's changed ports: a sync costs what changed, not a scan of
every plan."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from agent.health import HealthCheckService
from agent.model.desired import ChangedPorts, DesiredState
from agent.model.serviceport import ServicePortName

PlanKey = tuple[int, ServicePortName]  # (family, service port)


@dataclass(frozen=True, slots=True)
class _Marks:
    internal_no_local: bool
    external_no_local: bool
    hc_port: int  # 0: none
    namespace: str
    name: str
    local: int


class PlanTallies:
    def __init__(self) -> None:
        self._marks: dict[PlanKey, _Marks] = {}
        self.no_local = {"internal": 0, "external": 0}
        self._hc_members: dict[int, set[PlanKey]] = {}
        self.health_checks: dict[int, HealthCheckService] = {}
        self.health_checks_changed = False  # since the last take_health_checks()

    def apply(self, desired: Mapping[int, DesiredState], changed: Mapping[int, ChangedPorts]) -> None:
        touched_ports: set[int] = set()
        for fam, ports in changed.items():
            services = desired[fam].services
            for spn in ports:
                key = (fam, spn)
                old = self._marks.pop(key, None)
                if old is not None:
                    self._count(old, -1)
                    if old.hc_port:
                        self._hc_members[old.hc_port].discard(key)
                        touched_ports.add(old.hc_port)
                plan = services.get(spn)
                if plan is None:
                    continue
                i = plan.info
                new = _Marks(i.internal_policy_local and not plan.local, i.external_policy_local and not plan.local,
                             i.health_check_node_port, i.name.namespace, i.name.name, len(plan.local))
                self._marks[key] = new
                self._count(new, +1)
                if new.hc_port:
                    self._hc_members.setdefault(new.hc_port, set()).add(key)
                    touched_ports.add(new.hc_port)
        for port in touched_ports:
            self._refresh(port)

    def _count(self, m: _Marks, sign: int) -> None:
        self.no_local["internal"] += sign * m.internal_no_local
        self.no_local["external"] += sign * m.external_no_local

    def _refresh(self, port: int) -> None:
        """One health check port's answer: the most local endpoints of any of its plans (all
        ports and families of one Service share it)."""
        members = self._hc_members.get(port)
        before = self.health_checks.get(port)
        if not members:
            self._hc_members.pop(port, None)
            self.health_checks.pop(port, None)
        else:
            marks = [self._marks[k] for k in sorted(members)]
            self.health_checks[port] = HealthCheckService(marks[0].namespace, marks[0].name, port,
                                                          max(m.local for m in marks))
        if self.health_checks.get(port) != before:
            self.health_checks_changed = True
