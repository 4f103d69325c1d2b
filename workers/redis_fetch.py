"""Reads of a run of blocks from Redis into host blocks staged for the GPU: each block's manifest, then every
unit it lists, verified as it arrives (``workers.redis_staging``); a missing or corrupt value (deleted) is a
miss. Two ways:
- ``fetch``: from the run's start, in rounds; the first miss ends the run. It may run on the step loop or on
  the prefetch thread (``KVTiers.prefetch``): it returns what it staged and counted, and the step loop takes
  both over (``FetchOutcome``), so the tiers' own state is only ever changed there.
- ``fetch_from_end``: from the run's end backward, in rounds, on the prefetch thread, while the step loop
  computes the run from its start: the two meet (``EndRead``: the staged suffix grows down, the step loop's
  floor grows up), and what neither did is left. A miss ends the suffix where it is.
The cost model, which both consult and feed between rounds, is thread-safe.
"""

from __future__ import annotations

import logging
import threading
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
    # the blocks after the staged run, where Redis answered that it does not hold the first of them (its
    # manifest or a unit missing or corrupt): no lookup can use them now, so they are written again when
    # computed (evicted, expired, lost in a restart, or a write that failed)
    absent: list[bytes] = field(default_factory=list)


@dataclass
class EndRead:
    """A run of blocks read from its end backward (``RedisFetcher.fetch_from_end``) while the step loop computes
    it from its start. Indices count blocks from the run's first. The prefetch thread grows the staged suffix
    ``[low, end)`` down, round by round; the step loop raises ``floor`` (the blocks below it are computed, or
    will be) and the read stops where it would go below it. Read and written under ``lock``; ``outcome``'s
    counts only once ``done``."""

    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    end: int | None = None  # the leading blocks whose manifests are there (None: not read yet)
    low: int | None = None  # the staged suffix is [low, end)
    floor: int = 0
    done: bool = False
    outcome: FetchOutcome = field(default_factory=FetchOutcome)
    rounds: int = 0  # changes of the above by the reader, each notified on ``changed``

    def __post_init__(self) -> None:
        self.changed = threading.Condition(self.lock)

    def raise_floor(self, floor: int) -> None:
        with self.lock:
            self.floor = max(self.floor, floor)

    def state(self) -> tuple[int | None, int | None, bool, int]:
        """(low, end, done, rounds), read together."""
        with self.lock:
            return self.low, self.end, self.done, self.rounds

    def wait_for_round(self, seen: int, timeout_s: float) -> None:
        """Wait until the reader changed anything since ``rounds`` was ``seen`` (or ``timeout_s`` passed)."""
        with self.changed:
            self.changed.wait_for(lambda: self.rounds != seen, timeout_s)

    def _changed(self) -> None:  # with the lock held
        self.rounds += 1
        self.changed.notify_all()


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
            self.cost_model.observe_fetch("redis", (verified or 0) * block_bytes, seconds)
            if verified is None or verified < len(batch):
                if verified is not None:
                    outcome.absent = block_hashes[found + verified :]
                break
        return outcome

    def fetch_from_end(self, block_hashes: list[bytes], prefix: PrefixRef, read: EndRead) -> None:
        """Stage the run of ``block_hashes`` whose manifests are there from its end backward, a round at a time,
        into ``read``, until it reaches ``read.floor`` or a block is missing or corrupt."""
        stats = read.outcome.stats
        try:
            layouts = self._layouts(block_hashes, prefix, stats)
            high = len(layouts or [])
            with read.lock:
                if layouts is not None:
                    read.outcome.absent = block_hashes[high:]
                read.end = read.low = high
                read._changed()
            while True:
                with read.lock:
                    floor = read.floor
                if high <= floor:
                    break
                low = max(floor, high - self._round_blocks())
                began = time.perf_counter()
                staged_low = self._fetch_range(block_hashes, layouts, low, high, prefix, read)
                seconds = time.perf_counter() - began
                stats.transfer_seconds += seconds
                self.cost_model.observe_fetch("redis", (high - staged_low) * self.shape.bytes_per_block, seconds)
                if staged_low > low:  # a block is missing or corrupt: the suffix cannot reach lower
                    break
                high = low
        finally:
            with read.lock:
                read.done = True
                read._changed()

    def _fetch_range(self, hashes: list[bytes], layouts: list[list[tuple[int, int]]], low: int, high: int,
                     prefix: PrefixRef, read: EndRead) -> int:
        """Units of blocks ``[low, high)``, verified; extends ``read``'s suffix (which starts at ``high``) by the
        verified blocks at the end of the range, and returns where it starts now."""
        read_blocks = self._read_blocks(hashes[low:high], layouts[low:high], prefix, read.outcome.stats)
        if read_blocks is None:
            return high
        blocks, sound = read_blocks
        first = len(sound)
        while first > 0 and sound[first - 1]:
            first -= 1
        with read.lock:
            read.outcome.staged.update(zip(hashes[low + first : high], blocks[first:]))
            read.low = low + first
            read._changed()
        return low + first

    def _round_blocks(self) -> int:
        """Blocks per round: enough for every parallel reader to get its share (``kvstore.redis_store`` splits
        no slice below 8 keys), so that the probe too measures the rate of a parallel read."""
        parallel = self.redis.config.read_parallelism
        if not self.cost_model.has_rate("redis"):
            return _PROBE_BLOCKS * parallel
        return max(_BATCH_BLOCKS, _PROBE_BLOCKS * parallel)

    def _fetch_batch(self, hashes: list[bytes], prefix: PrefixRef, outcome: FetchOutcome) -> int | None:
        """Manifests, then units, for up to a batch of blocks; stages the leading verified run and returns its
        length (None, counted: Redis could not be read)."""
        layouts = self._layouts(hashes, prefix, outcome.stats)
        if layouts is None:
            return None
        read_blocks = self._read_blocks(hashes[: len(layouts)], layouts, prefix, outcome.stats)
        if read_blocks is None:
            return None
        blocks, sound = read_blocks
        verified = sound.index(False) if False in sound else len(sound)
        outcome.staged.update(zip(hashes[:verified], blocks))
        return verified

    def _read_blocks(self, hashes: list[bytes], layouts: list[list[tuple[int, int]]], prefix: PrefixRef,
                     stats: TierStats) -> tuple[list[torch.Tensor], list[bool]] | None:
        """Every unit the manifests (``layouts``) list for these blocks, into fresh staging blocks
        [L, 2, bs, Hkv, D] (whole units land straight in them): the blocks and whether each is sound
        (``_sound_blocks``). None, counted, when Redis could not be read."""
        units = [UnitRead(index, heads, self.unit_of(hashes[index], heads))
                 for index, ranges in enumerate(layouts) for heads in ranges]
        blocks = [self.staging_block() for _ in layouts]
        staged = StagedUnits(units, blocks)
        if units and not self.redis.read_into([self.unit_key(hashes[u.block], u.heads, prefix) for u in units],
                                              staged):
            stats.errors += 1
            return None
        return blocks, self._sound_blocks(staged, hashes, prefix, stats)

    def _layouts(self, hashes: list[bytes], prefix: PrefixRef,
                 stats: TierStats) -> list[list[tuple[int, int]]] | None:
        """The head ranges of each leading block whose manifest is there and sound (None, counted: Redis could
        not be read)."""
        layouts = self.layouts_of(hashes, prefix, stats)
        if layouts is None:
            return None
        return layouts[: layouts.index(None)] if None in layouts else layouts

    def layouts_of(self, hashes: list[bytes], prefix: PrefixRef,
                   stats: TierStats) -> list[list[tuple[int, int]] | None] | None:
        """The head ranges of each block's units by its manifest, None where that is missing or corrupt (deleted,
        counted); None for all, counted, when Redis could not be read."""
        values = self.redis.get_many([manifest_key(self.fingerprint, prefix, h) for h in hashes])
        if values is None:
            stats.errors += 1
            return None
        return [self._decode_manifest(block_hash, value, prefix, stats) for block_hash, value in zip(hashes, values)]

    def _sound_blocks(self, staged: StagedUnits, hashes: list[bytes], prefix: PrefixRef,
                      stats: TierStats) -> list[bool]:
        """Whether each block's units all arrived sound (then they are assembled into it). A block with a unit
        missing or corrupt is a miss from now on: its manifest, and a corrupt unit, are deleted."""
        sound = [True] * len(staged.blocks)
        for index, (unit, outcome) in enumerate(zip(staged.units, staged.outcome)):
            if not sound[unit.block]:
                continue
            if outcome == "ok":
                staged.assemble(index)
                continue
            sound[unit.block] = False
            block_hash = hashes[unit.block]
            if isinstance(outcome, codec.CorruptValue):
                self._discard(self.unit_key(block_hash, unit.heads, prefix), outcome, stats)
            self.redis.delete([manifest_key(self.fingerprint, prefix, block_hash)])
        return sound

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
