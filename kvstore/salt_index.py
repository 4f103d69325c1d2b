"""Which cache salt each block a worker caches locally belongs to. Pure Python.

The GPU pool and the CPU tier index blocks by hash alone, and a hash does not tell its salt (the salt enters
only the chain's first block). A flush of one tenant's salts asks this index for their hashes and drops
only those from the local tiers. An entry is added whenever a block enters the GPU pool's cache (computed or
loaded; the CPU tier only takes blocks the GPU pool evicts); ``prune`` forgets the ones no local tier holds any
more, so the index stays near the tiers' size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from kvstore.redis_keys import SaltSelection


class SaltIndex:
    def __init__(self, prune_above: int) -> None:
        """``prune_above``: the entries past which ``add`` prunes (about twice what the local tiers hold)."""
        self.prune_above = prune_above
        self._salt_of: dict[bytes, str | None] = {}

    def __len__(self) -> int:
        return len(self._salt_of)

    def add(self, block_hashes: Iterable[bytes], salt: str | None, held: Callable[[bytes], bool]) -> None:
        """Record these hashes as ``salt``'s; past ``prune_above`` entries, first forget those not ``held``."""
        if len(self._salt_of) > self.prune_above:
            self.prune(held)
        for block_hash in block_hashes:
            self._salt_of[block_hash] = salt

    def hashes_of(self, salts: SaltSelection) -> list[bytes]:
        return [block_hash for block_hash, its_salt in self._salt_of.items() if salts.covers(its_salt)]

    def prune(self, held: Callable[[bytes], bool]) -> None:
        """Forget every hash no local tier holds (``held`` says whether one does)."""
        self._salt_of = {h: salt for h, salt in self._salt_of.items() if held(h)}
