"""Refreshes, in Redis, blocks the worker found again in its GPU pool (``kvstore.known_blocks`` says which are
due): each block's manifest is read, then the manifest and the units it lists are touched, which starts their
LRU clock (and, with a TTL, their expiry) again. So a prefix hot on one worker's GPU, and therefore never read
from Redis, is not the first thing ``allkeys-lru`` evicts or a TTL expires. A block whose manifest, or a unit
of it, Redis no longer holds (evicted, expired, a restart, a write that failed) is *lost*: the worker forgets
it and writes it again at its next GPU hit.

Refreshes run on the prefetch threads; their outcomes are taken (``take_done``) by the step loop, or by a
stats read, one at a time (``KVTiers._take_refreshes``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Executor, Future, wait
from dataclasses import dataclass, field

from kvstore.redis_keys import PrefixRef, manifest_key
from kvstore.redis_store import RedisStore
from kvstore.stats import TierStats

log = logging.getLogger(__name__)
# the head ranges of each block's units by its manifest, None where it is missing or corrupt (None for all:
# Redis could not be read); counts errors and corrupt values into the stats (``RedisFetcher.layouts_of``)
LayoutsOf = Callable[[list[bytes], PrefixRef, TierStats], "list[list[tuple[int, int]] | None] | None"]
UnitKey = Callable[[bytes, tuple[int, int], PrefixRef], str]


@dataclass
class RefreshOutcome:
    lost: list[bytes] = field(default_factory=list)  # Redis lacks these: to be written again
    stats: TierStats = field(default_factory=TierStats)  # refreshed and lost blocks, errors


class RedisRefresher:
    def __init__(self, redis: RedisStore, fingerprint: str, layouts_of: LayoutsOf, unit_key: UnitKey,
                 executor: Executor) -> None:
        self.redis = redis
        self.fingerprint = fingerprint
        self._layouts_of = layouts_of
        self._unit_key = unit_key
        self._executor = executor
        self._running: list[Future[RefreshOutcome]] = []

    def start(self, block_hashes: list[bytes], prefix: PrefixRef) -> None:
        """Refresh these blocks of one prefix (one Redis Cluster slot) on a prefetch thread."""
        self._running.append(self._executor.submit(self.refresh, block_hashes, prefix))

    def take_done(self) -> list[RefreshOutcome]:
        """The outcomes of the refreshes that ended since the last call (one caller at a time; ``start`` may
        run beside it)."""
        done = [future for future in self._running if future.done()]
        for future in done:
            self._running.remove(future)
        return [_outcome_of(future) for future in done if not future.cancelled()]  # (cancelled: at close)

    def wait(self, timeout_s: float | None = None) -> None:
        """Until every refresh started so far ended (or ``timeout_s`` passed)."""
        wait(list(self._running), timeout=timeout_s)

    def refresh(self, block_hashes: list[bytes], prefix: PrefixRef) -> RefreshOutcome:
        """Touch each block's manifest and units; the blocks Redis lacks are lost. Redis unreachable: nothing is
        learnt (an error is counted), the blocks are due again one interval later."""
        outcome = RefreshOutcome()
        layouts = self._layouts_of(block_hashes, prefix, outcome.stats)
        if layouts is None:
            return outcome
        listed = [(block_hash, ranges) for block_hash, ranges in zip(block_hashes, layouts) if ranges is not None]
        outcome.lost = [block_hash for block_hash, ranges in zip(block_hashes, layouts) if ranges is None]
        key_groups = [[manifest_key(self.fingerprint, prefix, block_hash),
                       *(self._unit_key(block_hash, heads, prefix) for heads in ranges)]
                      for block_hash, ranges in listed]
        held = self.redis.touch(key_groups)  # per block: how many of its keys Redis holds
        if held is None:
            outcome.stats.errors += 1
        else:
            partial = [block_hash for (block_hash, _), keys, count in zip(listed, key_groups, held)
                       if count < len(keys)]
            outcome.lost += partial
            outcome.stats.refreshed_blocks += len(listed) - len(partial)
        outcome.stats.lost_blocks += len(outcome.lost)
        return outcome


def _outcome_of(future: Future[RefreshOutcome]) -> RefreshOutcome:
    if future.exception() is not None:  # not Redis's doing (the store counts those): a bug, logged and counted
        log.warning("a Redis refresh failed: %r", future.exception())
        return RefreshOutcome(stats=TierStats(errors=1))
    return future.result()
