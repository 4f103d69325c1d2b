"""The GPU tier's block ids: reference counts, a free list in LRU order, and the prefix cache. Pure Python.

Block ids are ints; the pool never touches the tensors they index.

Invariants:
- every id in ``range(num_blocks)`` is either free (reference count 0, on the free list) or in use
  (reference count >= 1, off the free list);
- a block may be *cached*: it holds the full block whose hash maps to it (``cached_block(hash) == id``), whether
  in use or free. A free cached block is reused last-freed-last: ``allocate`` takes the head of the free list,
  and if that block was cached its hash is dropped and reported by ``take_evicted`` (so its contents can
  be spilled to a lower tier before they are overwritten);
- ``free`` appends to the tail, so blocks are evicted oldest-freed first. Sequences free their blocks tail
  first, so a shared prefix outlives the suffixes that follow it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence

from kvstore.events import KVEventLog


class BlockPoolError(RuntimeError):
    """A block id was used against the pool's invariants (double free, out of range, or pool exhausted)."""


class BlockPool:
    """Hands out KV-cache block ids, tracks who holds each, and remembers which full block each one caches."""

    def __init__(self, num_blocks: int, events: KVEventLog | None = None) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.events = events or KVEventLog()
        self._ref_counts = [0] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._hash_of: dict[int, bytes] = {}
        self._block_of: dict[bytes, int] = {}
        self._evicted: list[tuple[bytes, int]] = []

    @property
    def num_blocks(self) -> int:
        return len(self._ref_counts)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        return len(self._block_of)

    def can_allocate(self, count: int) -> bool:
        return count <= len(self._free)

    def allocate(self, count: int) -> list[int]:
        """Take ``count`` ids from the head of the free list, each with reference count 1 and no cached hash."""
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        if count > len(self._free):
            raise BlockPoolError(f"asked for {count} blocks, {len(self._free)} free")
        block_ids = []
        for _ in range(count):
            block_id, _ = self._free.popitem(last=False)
            self._uncache(block_id, evicted=True)
            self._ref_counts[block_id] = 1
            block_ids.append(block_id)
        return block_ids

    def share(self, block_ids: Iterable[int]) -> None:
        """Add one reference to each block; a free (cached) block comes off the free list."""
        for block_id in block_ids:
            if self.ref_count(block_id) == 0:
                if block_id not in self._hash_of:
                    raise BlockPoolError(f"block {block_id} is free and holds nothing to share")
                del self._free[block_id]
            self._ref_counts[block_id] += 1

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop one reference from each block; at 0 it goes to the tail of the free list (cached blocks stay so)."""
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

    # --- prefix cache -------------------------------------------------------------------------------------

    def cache(self, block_id: int, block_hash: bytes) -> bool:
        """Record that in-use ``block_id`` now holds the full block ``block_hash``.

        False (and nothing recorded) when another block already caches that hash: the first copy wins, and
        this one is plain storage that returns to the free list uncached."""
        if self.ref_count(block_id) == 0:
            raise BlockPoolError(f"block {block_id} is free; only a block in use can be cached")
        if block_hash in self._block_of or block_id in self._hash_of:
            return False
        self._hash_of[block_id] = block_hash
        self._block_of[block_hash] = block_id
        self.events.record("gpu", True, [block_hash])
        return True

    def cached_hashes(self) -> list[bytes]:
        """Every hash the pool caches (a snapshot for the router's index)."""
        return list(self._block_of)

    def cached_block(self, block_hash: bytes) -> int | None:
        return self._block_of.get(block_hash)

    def match_prefix(self, block_hashes: Sequence[bytes]) -> list[int]:
        """The blocks caching the longest leading run of ``block_hashes`` (nothing is shared yet)."""
        matched = []
        for block_hash in block_hashes:
            block_id = self._block_of.get(block_hash)
            if block_id is None:
                break
            matched.append(block_id)
        return matched

    def take_evicted(self) -> list[tuple[bytes, int]]:
        """(hash, block id) of every cached block reallocated since the last call, in eviction order."""
        evicted, self._evicted = self._evicted, []
        return evicted

    def reset_cache(self) -> int:
        """Forget every cached hash (a flush); returns how many were dropped. Nothing counts as evicted."""
        dropped = len(self._block_of)
        self.events.record("gpu", False, list(self._block_of))
        self._hash_of.clear()
        self._block_of.clear()
        return dropped

    def uncache(self, block_hashes: Iterable[bytes]) -> int:
        """Forget these hashes (a flush of some): a free block that cached one is plain free storage now, one in
        use stays its holder's. How many were cached; nothing counts as evicted."""
        block_ids = [self._block_of[h] for h in block_hashes if h in self._block_of]
        for block_id in block_ids:
            self._uncache(block_id, evicted=False)
        return len(block_ids)

    def _uncache(self, block_id: int, evicted: bool) -> None:
        block_hash = self._hash_of.pop(block_id, None)
        if block_hash is not None:
            del self._block_of[block_hash]
            self.events.record("gpu", False, [block_hash])
            if evicted:
                self._evicted.append((block_hash, block_id))
