"""Which blocks a worker holds, as a stream of changes the router's prefix index follows. Pure Python.

Each event says that blocks were stored in, or removed from, one tier. The log is bounded: past
``max_events`` it drops everything and marks itself ``overflowed``, and a subscriber must take a fresh
snapshot instead of merging (an index that merges a partial stream would be silently wrong).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KVEvent:
    tier: str  # "gpu", "cpu" or "redis"
    stored: bool  # False: removed
    block_hashes: tuple[bytes, ...]


class KVEventLog:
    def __init__(self, max_events: int = 65536) -> None:
        self.max_events = max_events
        self._events: list[KVEvent] = []
        self._count = 0
        self.overflowed = False

    def record(self, tier: str, stored: bool, block_hashes: list[bytes] | tuple[bytes, ...]) -> None:
        if not block_hashes:
            return
        self._events.append(KVEvent(tier, stored, tuple(block_hashes)))
        self._count += len(block_hashes)
        if self._count > self.max_events:
            self._events.clear()
            self._count = 0
            self.overflowed = True

    def drain(self) -> tuple[list[KVEvent], bool]:
        """(events since the last drain, whether some were lost and a snapshot is needed)."""
        events, overflowed = self._events, self.overflowed
        self._events, self._count, self.overflowed = [], 0, False
        return events, overflowed
