"""One read of a run of blocks from Redis into host blocks staged for the GPU: each block's manifest, then every
unit it lists, verified as it arrives (``workers.redis_staging``); the first missing or corrupt value (deleted)
ends the run. It may run on the step loop or on the prefetch thread (``KVTiers.prefetch``): it returns what it
staged and counted, and the step loop takes both over (``FetchOutcome``), so the tiers' own state is only ever
changed there. The cost model, which it consults and feeds between rounds, is thread-safe.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from kvstore import codec
from kvstore.cost_model import FetchCostModel
from kvstore.redis_keys import PrefixRef, manifest_key
from kvstore.redis_store import RedisStore
from kvstore.stats import TierStats
from workers.kv_cache import KVCacheShape
from workers.redis_staging import StagedUnits, UnitRead

log = logging.getLogger(__name__)
_BATCH_BLOCKS = 32  # blocks per MGET round: the first tells whether a prefix is there at all
_PROBE_BLOCKS = 8  # the first round's blocks per reader while Redis's rate is unknown: it measures it
UnitOf = Callable[[bytes, tuple[int, int]], codec.BlockUnit]
UnitKey = Callable[[bytes, tuple[int, int], PrefixRef], str]


@dataclass
class FetchOutcome:
    """What one read staged (the leading verified run, in order) and counted (errors, corrupt values, skipped
    fetches, seconds); the step loop adds the counts to the Redis tier's stats when it takes the outcome."""

    staged: dict[bytes, torch.Tensor] = field(default_factory=dict)  # hash -> [L, 2, bs, Hkv, D]
    stats: TierStats = field(default_factory=TierStats)


@dataclass(frozen=True)
class RedisFetcher:
    redis: RedisStore
    fingerprint: str  # hex
    shape: KVCacheShape  # the block with every KV head, as stored
    cost_model: FetchCostModel
    unit_of: UnitOf
    unit_key: UnitKey
    staging_block: Callable[[], torch.Tensor]

    def fetch(self, block_hashes: list[bytes], prefix: PrefixRef, first_block: int) -> FetchOutcome:
        """Stage the longest verified run of ``block_hashes`` (block ``first_block`` of its sequence first).
        Before each round the cost model decides again for the blocks left, so what the first round measured
        stops a fetch slower than recomputing the rest; with no Redis rate yet (a fresh process) that round is
        a short probe."""
        outcome = FetchOutcome()
        block_size, block_bytes = self.shape.block_size, self.shape.bytes_per_block
        while len(outcome.staged) < len(block_hashes):
            found = len(outcome.staged)
            if not self.cost_model.should_fetch("redis", len(block_hashes) - found, block_bytes, block_size,
                                                start_token=(first_block + found) * block_size):
                outcome.stats.skipped_fetches += 1
                break
            batch = block_hashes[found : found + self._round_blocks()]
            began = time.perf_counter()
            verified = self._fetch_batch(batch, prefix, outcome)
            seconds = time.perf_counter() - began
            outcome.stats.transfer_seconds += seconds
            self.cost_model.observe_fetch("redis", verified * block_bytes, seconds)
            if verified < len(batch):
                break
        return outcome

    def _round_blocks(self) -> int:
        """Blocks per round: enough for every parallel reader to get its share (``kvstore.redis_store`` splits
        no slice below 8 keys), so that the probe too measures the rate of a parallel read."""
        parallel = self.redis.config.read_parallelism
        if not self.cost_model.has_rate("redis"):
            return _PROBE_BLOCKS * parallel
        return max(_BATCH_BLOCKS, _PROBE_BLOCKS * parallel)

    def _fetch_batch(self, hashes: list[bytes], prefix: PrefixRef, outcome: FetchOutcome) -> int:
        """Manifests, then units, for up to a batch of blocks; stages the leading verified run."""
        layouts = self._layouts(hashes, prefix, outcome.stats)
        units = [UnitRead(index, heads, self.unit_of(hashes[index], heads))
                 for index, ranges in enumerate(layouts) for heads in ranges]
        blocks = [self.staging_block() for _ in layouts]  # [L, 2, bs, Hkv, D]: whole units land straight in them
        staged = StagedUnits(units, blocks)
        if units and not self.redis.read_into([self.unit_key(hashes[u.block], u.heads, prefix) for u in units],
                                              staged):
            outcome.stats.errors += 1
            return 0
        verified = self._leading_verified(staged, hashes, prefix, outcome.stats)
        outcome.staged.update(zip(hashes[:verified], blocks))
        return verified

    def _layouts(self, hashes: list[bytes], prefix: PrefixRef, stats: TierStats) -> list[list[tuple[int, int]]]:
        """The head ranges of each leading block whose manifest is there and sound."""
        values = self.redis.get_many([manifest_key(self.fingerprint, prefix, h) for h in hashes])
        if values is None:
            stats.errors += 1
            return []
        layouts = []
        for block_hash, value in zip(hashes, values):
            ranges = self._decode_manifest(block_hash, value, prefix, stats)
            if ranges is None:
                break
            layouts.append(ranges)
        return layouts

    def _leading_verified(self, staged: StagedUnits, hashes: list[bytes], prefix: PrefixRef,
                          stats: TierStats) -> int:
        """Blocks before the first with a unit missing or corrupt (its manifest, and a corrupt unit, deleted)."""
        for index, (unit, outcome) in enumerate(zip(staged.units, staged.outcome)):
            if outcome == "ok":
                staged.assemble(index)
                continue
            block_hash = hashes[unit.block]
            if isinstance(outcome, codec.CorruptValue):
                self._discard(self.unit_key(block_hash, unit.heads, prefix), outcome, stats)
            self.redis.delete([manifest_key(self.fingerprint, prefix, block_hash)])  # the block is a miss now
            return unit.block
        return len(staged.blocks)

    def _decode_manifest(self, block_hash: bytes, value: bytes | None, prefix: PrefixRef,
                         stats: TierStats) -> list | None:
        if value is None:
            return None
        try:
            return codec.decode_manifest(value, bytes.fromhex(self.fingerprint), block_hash, self.shape.num_kv_heads)
        except codec.CorruptValue as error:
            self._discard(manifest_key(self.fingerprint, prefix, block_hash), error, stats)
            return None

    def _discard(self, key: str, error: Exception, stats: TierStats) -> None:
        log.warning("redis value %s is corrupt (%s): deleted, will recompute", key, error)
        stats.corrupt_values += 1
        stats.errors += 1
        self.redis.delete([key])
