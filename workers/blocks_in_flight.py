"""The full blocks that running sequences are computing, for the scheduler to admit a request that shares them
after they are cached, not beside them. Pure Python.

Requests that share a prefix nothing caches yet (a burst of questions on one new document, a system prompt
after a flush) would each compute it when admitted in the same step, or while the first is still prefilling
it: the prefix cache only serves blocks once they are computed. So a waiting request whose next block to
compute is in flight on a running sequence as urgent or more waits; at a later step it finds the block cached
and computes only what follows (as SGLang's in-batch prefix caching). A block's hash names its whole prefix
and the tenant's salt, so only a request with that same prefix waits.
"""

from __future__ import annotations

from workers.sequence import Sequence


class BlocksInFlight:
    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self._priority: dict[bytes, int] = {}  # block hash -> the most urgent priority computing it

    def add(self, seq: Sequence) -> None:
        """``seq``'s full blocks from its first uncomputed token on (call when it runs, before the step)."""
        if seq.hasher is None:
            return
        hashes = seq.hasher.update(seq.token_ids)
        for block_hash in hashes[seq.num_computed_tokens // self.block_size :]:
            known = self._priority.get(block_hash)
            self._priority[block_hash] = seq.priority if known is None else min(known, seq.priority)

    def computed_by_another(self, block_hash: bytes, priority: int) -> bool:
        """Whether a running sequence of ``priority`` or a more urgent one computes ``block_hash``."""
        computing = self._priority.get(block_hash)
        return computing is not None and computing <= priority
