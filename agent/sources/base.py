"""What a source feeds: the SyncLoop implements this."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from agent.model.records import Record
from agent.model.serviceport import NamespacedName, Problem


class Sink(Protocol):
    def apply(self, kind: str, key: NamespacedName, rec: Record | None) -> None: ...

    def replace_all(self, kind: str, records: Mapping[NamespacedName, Record]) -> None: ...

    def bad_object(self, problem: Problem) -> None: ...


def key_of(rec: Record) -> NamespacedName:
    return NamespacedName(rec.metadata.namespace, rec.metadata.name)
