"""The blocks a worker believes Redis holds, and when Redis last confirmed each one. Pure Python.

A worker remembers the blocks it wrote to Redis or read from it, so that a block it computes again is not
written twice. Redis may lose a block since (a restart without persistence, ``allkeys-lru``, a TTL, a write
that failed), and a block hot in one worker's GPU pool is never read from Redis, so nothing there tells the
worker. Hence the time of each block's last confirmation: a block the worker finds again in its GPU pool
``refresh_s`` after it was last confirmed is *due*; the worker then asks Redis for it (and so resets its LRU
clock and TTL there), and writes it again if Redis lost it (``forget``).

Invariants: at most ``capacity`` blocks, the least recently confirmed forgotten first; ``due`` marks what it
returns as confirmed now, so one check is started per block per ``refresh_s`` whatever the hits meanwhile.
Thread-safe: the step loop and a stats reader (taking finished reads' news) both change it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable


class KnownBlocks:
    def __init__(self, capacity: int, refresh_s: float) -> None:
        """``refresh_s`` 0: blocks are never due (no checks)."""
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if refresh_s < 0:
            raise ValueError(f"refresh_s must be >= 0, got {refresh_s}")
        self.capacity = capacity
        self.refresh_s = refresh_s
        self._confirmed: OrderedDict[bytes, float] = OrderedDict()  # hash -> time of the last confirmation
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._confirmed)

    def __contains__(self, block_hash: bytes) -> bool:
        return block_hash in self._confirmed

    def confirm(self, block_hashes: Iterable[bytes], now: float) -> None:
        """Redis holds these as of ``now`` (written, read or found)."""
        with self._lock:
            self._confirm(block_hashes, now)

    def _confirm(self, block_hashes: Iterable[bytes], now: float) -> None:
        for block_hash in block_hashes:
            self._confirmed[block_hash] = now
            self._confirmed.move_to_end(block_hash)
        while len(self._confirmed) > self.capacity:
            self._confirmed.popitem(last=False)

    def forget(self, block_hashes: Iterable[bytes]) -> None:
        """Redis does not hold these (any more): they are unknown, to be written again."""
        with self._lock:
            for block_hash in block_hashes:
                self._confirmed.pop(block_hash, None)

    def clear(self) -> None:
        with self._lock:
            self._confirmed.clear()

    def due(self, block_hashes: Iterable[bytes], now: float) -> list[bytes]:
        """Of ``block_hashes``, the known ones last confirmed ``refresh_s`` or more before ``now``, in order,
        each once; they count as confirmed at ``now`` from here on (a check of them is about to start)."""
        if self.refresh_s == 0:
            return []
        with self._lock:
            due = []
            for block_hash in dict.fromkeys(block_hashes):
                confirmed = self._confirmed.get(block_hash)
                if confirmed is not None and now - confirmed >= self.refresh_s:
                    due.append(block_hash)
            self._confirm(due, now)
        return due
