"""A fixed pool of KV-cache block ids with reference counts and a free list.

Pure Python: block ids are ints, and the pool never touches the tensors they index.

Invariants:
- every id in ``range(num_blocks)`` is either free (reference count 0, on the free list) or in use
  (reference count >= 1, off the free list);
- ``allocate`` takes ids from the head of the free list and ``free`` returns them to its tail, so ids are
  reused oldest-freed first (the order a later prefix cache evicts in).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable


class BlockPoolError(RuntimeError):
    """A block id was used against the pool's invariants (double free, out of range, or pool exhausted)."""


class BlockPool:
    """Hands out KV-cache block ids and tracks how many sequences hold each one."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self._ref_counts = [0] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))

    @property
    def num_blocks(self) -> int:
        return len(self._ref_counts)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    def can_allocate(self, count: int) -> bool:
        return count <= len(self._free)

    def allocate(self, count: int) -> list[int]:
        """Take ``count`` ids from the head of the free list, each with reference count 1."""
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        if count > len(self._free):
            raise BlockPoolError(f"asked for {count} blocks, {len(self._free)} free")
        block_ids = []
        for _ in range(count):
            block_id, _ = self._free.popitem(last=False)
            self._ref_counts[block_id] = 1
            block_ids.append(block_id)
        return block_ids

    def share(self, block_ids: Iterable[int]) -> None:
        """Add one reference to blocks already in use (another sequence now reads them)."""
        for block_id in block_ids:
            if self.ref_count(block_id) == 0:
                raise BlockPoolError(f"block {block_id} is free and cannot be shared")
            self._ref_counts[block_id] += 1

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop one reference from each block; a block whose count reaches 0 goes to the tail of the free list."""
        for block_id in block_ids:
            if self.ref_count(block_id) == 0:
                raise BlockPoolError(f"block {block_id} is already free")
            self._ref_counts[block_id] -= 1
            if self._ref_counts[block_id] == 0:
                self._free[block_id] = None

    def ref_count(self, block_id: int) -> int:
        if not 0 <= block_id < len(self._ref_counts):
            raise BlockPoolError(f"block id {block_id} is outside the pool of {len(self._ref_counts)}")
        return self._ref_counts[block_id]

    def free_ids(self) -> list[int]:
        """The free list, head first (the order ``allocate`` hands ids out)."""
        return list(self._free)
