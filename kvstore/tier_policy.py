"""Which block hashes a fixed-size lower tier (host RAM) holds, and in which slot. Pure Python.

Moves are two-phase, so the bytes can move asynchronously while the policy stays consistent:
- store: ``prepare_store`` picks a slot for each hash (evicting least-recently-used entries that no load
  pins) and hides the entry until ``complete_store(ok=True)``; ``ok=False`` gives the slot back;
- load: ``prepare_load`` pins the entries (they cannot be evicted) and marks them most recently used;
  ``complete_load`` unpins them.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence


class TierPolicyError(RuntimeError):
    """A hash was moved against the two-phase protocol (loading what is absent, completing what was not begun)."""


class LRUTierPolicy:
    def __init__(self, num_slots: int) -> None:
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        self.num_slots = num_slots
        self._ready: OrderedDict[bytes, int] = OrderedDict()  # head = least recently used
        self._storing: dict[bytes, int] = {}
        self._pins: dict[bytes, int] = {}
        self._free_slots: deque[int] = deque(range(num_slots))
        self._evicted: list[bytes] = []

    def __len__(self) -> int:
        return len(self._ready)

    def __contains__(self, block_hash: bytes) -> bool:
        return block_hash in self._ready

    def holds(self, block_hash: bytes) -> bool:
        """Ready, or on its way in (``prepare_store`` without ``complete_store`` yet)."""
        return block_hash in self._ready or block_hash in self._storing

    def lookup(self, block_hashes: Sequence[bytes]) -> int:
        """How many leading hashes are ready to load."""
        count = 0
        for block_hash in block_hashes:
            if block_hash not in self._ready:
                break
            count += 1
        return count

    def prepare_load(self, block_hashes: Sequence[bytes]) -> list[int]:
        slots = []
        for block_hash in block_hashes:
            if block_hash not in self._ready:
                raise TierPolicyError(f"{block_hash.hex()[:16]} is not in this tier")
            self._ready.move_to_end(block_hash)
            self._pins[block_hash] = self._pins.get(block_hash, 0) + 1
            slots.append(self._ready[block_hash])
        return slots

    def complete_load(self, block_hashes: Sequence[bytes]) -> None:
        for block_hash in block_hashes:
            pins = self._pins.get(block_hash, 0)
            if pins == 0:
                raise TierPolicyError(f"{block_hash.hex()[:16]} has no load in flight")
            if pins == 1:
                del self._pins[block_hash]
            else:
                self._pins[block_hash] = pins - 1

    def prepare_store(self, block_hashes: Sequence[bytes]) -> list[tuple[bytes, int]]:
        """(hash, slot) for each hash to write; hashes already held or in flight are skipped, and the list
        stops early when every slot is pinned or in flight."""
        planned = []
        for block_hash in dict.fromkeys(block_hashes):
            if block_hash in self._ready or block_hash in self._storing:
                continue
            slot = self._take_slot()
            if slot is None:
                break
            self._storing[block_hash] = slot
            planned.append((block_hash, slot))
        return planned

    def complete_store(self, block_hashes: Sequence[bytes], ok: bool) -> None:
        for block_hash in block_hashes:
            slot = self._storing.pop(block_hash, None)
            if slot is None:
                raise TierPolicyError(f"{block_hash.hex()[:16]} has no store in flight")
            if ok:
                self._ready[block_hash] = slot
            else:
                self._free_slots.append(slot)

    def take_evicted(self) -> list[bytes]:
        evicted, self._evicted = self._evicted, []
        return evicted

    def lru_order(self) -> list[bytes]:
        """Ready hashes, next to be evicted first."""
        return list(self._ready)

    def clear(self) -> int:
        """Drop every ready entry that no load pins; returns how many were dropped."""
        return self.drop(list(self._ready))

    def drop(self, block_hashes: Sequence[bytes]) -> int:
        """Drop these hashes' ready entries that no load pins (their slots are free again); how many."""
        dropped = [h for h in block_hashes if h in self._ready and h not in self._pins]
        for block_hash in dropped:
            self._free_slots.append(self._ready.pop(block_hash))
        return len(dropped)

    def _take_slot(self) -> int | None:
        if self._free_slots:
            return self._free_slots.popleft()
        for block_hash in self._ready:
            if block_hash not in self._pins:
                self._evicted.append(block_hash)
                return self._ready.pop(block_hash)
        return None
