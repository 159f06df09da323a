"""Change trackers: previous/current per key, with changes that end where they began dropped."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class ChangeTracker(Generic[K, V]):
    """Holds the committed value per key and the pending (previous, current) changes.

    `update(key, None)` records a deletion. A change whose current equals its previous is
    dropped, so an object that flaps back to where it was causes no sync.
    """

    def __init__(self) -> None:
        self._committed: dict[K, V] = {}
        self._pending: dict[K, tuple[V | None, V | None]] = {}

    def update(self, key: K, value: V | None) -> None:
        prev = self._pending[key][0] if key in self._pending else self._committed.get(key)
        if prev == value:
            self._pending.pop(key, None)
        else:
            self._pending[key] = (prev, value)

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def committed(self) -> Mapping[K, V]:
        return self._committed

    def keys(self) -> set[K]:
        return set(self._committed)

    def drain(self) -> dict[K, tuple[V | None, V | None]]:
        """Commit every pending change and return them."""
        changes, self._pending = self._pending, {}
        for key, (_, cur) in changes.items():
            if cur is None:
                self._committed.pop(key, None)
            else:
                self._committed[key] = cur
        return changes
