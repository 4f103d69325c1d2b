"""The blocks a worker believes Redis holds, and when Redis last confirmed each one. Pure Python.

A worker remembers the blocks it wrote to Redis or read from it, so that a block it computes again is not
written twice. Redis may lose a block since (a restart without persistence, ``allkeys-lru``, a TTL, a write
that failed), and a block hot in one worker's GPU pool is never read from Redis, so nothing there tells the
worker. Hence the time of each block's last confirmation: a block the worker finds again in its GPU pool
``refresh_s`` after it was last confirmed is *due*; the worker then asks Redis for it (and so resets its LRU
clock and TTL there), and writes it again if Redis lost it (``forget``).

Each block is remembered with its cache salt (a block hash is one salt's: the salt is hashed into the first
block), so a flush of one salt forgets that salt's blocks only, and the others' are not written twice.

Invariants: at most ``capacity`` blocks, the least recently confirmed forgotten first; ``due`` marks what it
returns as confirmed now, so one check is started per block per ``refresh_s`` whatever the hits meanwhile.
Thread-safe: the step loop and a stats reader (taking finished reads' news) both change it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable

from kvstore.redis_keys import SaltSelection


class KnownBlocks:
    def __init__(self, capacity: int, refresh_s: float) -> None:
        """``refresh_s`` 0: blocks are never due (no checks)."""
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if refresh_s < 0:
            raise ValueError(f"refresh_s must be >= 0, got {refresh_s}")
        self.capacity = capacity
        self.refresh_s = refresh_s
        # hash -> (time of the last confirmation, its cache salt), the least recently confirmed first
        self._confirmed: OrderedDict[bytes, tuple[float, str | None]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._confirmed)

    def __contains__(self, block_hash: bytes) -> bool:
        return block_hash in self._confirmed

    def confirm(self, block_hashes: Iterable[bytes], salt: str | None, now: float) -> None:
        """Redis holds these blocks of ``salt`` as of ``now`` (written, read or found)."""
        with self._lock:
            self._confirm(((block_hash, salt) for block_hash in block_hashes), now)

    def _confirm(self, salted_hashes: Iterable[tuple[bytes, str | None]], now: float) -> None:
        for block_hash, salt in salted_hashes:
            self._confirmed[block_hash] = (now, salt)
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

    def forget_salts(self, salts: SaltSelection) -> int:
        """Forget every block of the selected salts; how many."""
        with self._lock:
            covered = [block_hash for block_hash, (_, of) in self._confirmed.items() if salts.covers(of)]
            for block_hash in covered:
                del self._confirmed[block_hash]
        return len(covered)

    def due(self, block_hashes: Iterable[bytes], now: float) -> list[bytes]:
        """Of ``block_hashes``, the known ones last confirmed ``refresh_s`` or more before ``now``, in order,
        each once; they count as confirmed at ``now`` from here on (a check of them is about to start)."""
        if self.refresh_s == 0:
            return []
        with self._lock:
            due = []
            for block_hash in dict.fromkeys(block_hashes):
                entry = self._confirmed.get(block_hash)
                if entry is not None and now - entry[0] >= self.refresh_s:
                    due.append((block_hash, entry[1]))
            self._confirm(due, now)
        return [block_hash for block_hash, _ in due]
