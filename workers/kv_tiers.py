"""Rank 0's side of the tiers below the GPU: what to look up, spill, load and write, and Redis itself.

- ``prefetch``: when a request arrives, its blocks beyond the GPU's and CPU tier's hits are read from Redis
  on a prefetch thread (``workers.redis_fetch``; requests wanting the same blocks share one read:
  ``workers.redis_prefetches``); the scheduler keeps the request waiting while that read runs and the step
  has other work (``prefetching``), so a long read does not stall the running requests.
- ``lookup``: for the hashes after a request's GPU hits, the longest contiguous run in the CPU tier, then in
  Redis (the prefetch's outcome, or a read now): each block's manifest, then every unit it lists, each
  verified, joined into a block with every KV head. A missing unit or a corrupt value (deleted) ends the run.
  CPU entries are pinned and Redis blocks staged until the step's moves run.
- ``move``: before the step's forward, one ``TierOps`` for all ranks: gather the blocks that became full last
  step (queued for Redis as head-range units, then the manifest), spill what the GPU pool evicted to the CPU
  tier, load this step's CPU and Redis hits. ``apply`` runs the ops on every rank (``BlockMover``).
  The GPU pool's hits of the step's new requests are gathered for Redis too where it may lack them, and
  refreshed there once per ``refresh_s`` (``workers.redis_refresh``).
The pure decisions live in ``kvstore`` (tier policy, codec, keys, cost model).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import TypeVar

import torch

from kvstore import codec
from kvstore.config import KVStoreConfig, parse_size
from kvstore.cost_model import FetchCostModel
from kvstore.events import KVEventLog
from kvstore.known_blocks import KnownBlocks
from kvstore.redis_keys import BlockLoad, PrefixRef, SaltSelection, block_key, flush_pattern, manifest_key
from kvstore.redis_store import RedisStore
from kvstore.stats import KVStoreStats
from kvstore.tier_policy import LRUTierPolicy
from kvstore.write_behind import Item, WriteBehind
from workers.block_mover import GatheredBlocks, TierOps
from workers.kv_cache import KVCacheShape
from workers.redis_end_reads import EndReads, Follower
from workers.redis_fetch import FetchOutcome, RedisFetcher
from workers.redis_prefetches import Prefetch, Prefetches
from workers.redis_refresh import RedisRefresher
from workers.redis_staging import host_bytes

log = logging.getLogger(__name__)
_PREFETCH_GRACE_S = 0.002  # how long the scheduler's first look waits for a prefetch: a miss's round trip
_KNOWN_IN_REDIS = 1 << 18  # hashes remembered as in Redis (written or read), so they are not written twice
ApplyOps = Callable[[TierOps, "list[torch.Tensor] | None"], "GatheredBlocks | None"]
LoadClock = Callable[[bool], "list[float]"]  # BlockMover.settled_load_seconds: GPU-timed loads (CUDA)
T = TypeVar("T")


def cpu_tier_slots(config: KVStoreConfig, full_block_bytes: int) -> int:
    """CPU slots every rank allocates: the configured capacity in whole blocks of the full model."""
    if not (config.prefix_caching and config.cpu.enabled):
        return 0
    return max(1, parse_size(config.cpu.capacity) // full_block_bytes)


@dataclass
class _Moves:
    """What one ``move`` planned, to complete once the ops ran."""

    ops: TierOps = field(default_factory=TierOps)
    stored: list[tuple[bytes, PrefixRef]] = field(default_factory=list)
    spilled: list[bytes] = field(default_factory=list)
    cpu_loaded: list[bytes] = field(default_factory=list)
    payload: list[torch.Tensor] | None = None  # the staged Redis blocks, in ``ops.full_loads`` order


class KVTiers:
    def __init__(
        self,
        full_shape: KVCacheShape,  # the block with every KV head, as stored
        unit_ranges: list[tuple[int, int]],  # the head ranges this group writes as units
        config: KVStoreConfig,
        num_cpu_slots: int,
        fingerprint: str,
        stats: KVStoreStats,
        cost_model: FetchCostModel,
        apply: ApplyOps,
        gpu_hits: Callable[[list[bytes]], int],  # how many leading hashes the GPU pool caches
        events: KVEventLog | None = None,
        pin_staging: bool = False,  # stage Redis blocks in pinned memory (CUDA: asynchronous uploads)
        gather_piece_blocks: int = 0,  # the pieces of the gathers for Redis, besides single blocks (0: none)
        load_clock: LoadClock | None = None,  # None: loads finish inside ``apply`` and the host clock times them
    ) -> None:
        self.events = events or KVEventLog()
        self.shape = full_shape
        self.unit_ranges = unit_ranges
        self.fingerprint = fingerprint
        self.stats = stats
        self.cost_model = cost_model
        self.apply = apply
        self.block_bytes = full_shape.bytes_per_block
        self.cpu = LRUTierPolicy(num_cpu_slots) if num_cpu_slots else None
        # between lookup and move, per hash: its CPU slot, or its staged Redis block [L, 2, bs, Hkv, D], once for
        # each load of it this step (two requests' reads from the end may meet on the same blocks in one step)
        self._cpu_pins: dict[bytes, list[int]] = {}
        self._staged: dict[bytes, list[torch.Tensor]] = {}
        self._uncounted: list[Future[FetchOutcome]] = []  # reads done with (or of requests that ended first)
        self._granted_grace: set[str] = set()  # requests whose prefetch ``prefetching`` waited for once
        self._pin_staging = pin_staging
        self._load_clock = load_clock
        self._gpu_hits = gpu_hits
        self._untimed_loads: deque[tuple[int, int]] = deque()  # (CPU, Redis) blocks of loads not yet timed
        self._settle_lock = threading.Lock()
        self._fold_lock = threading.Lock()  # taking finished reads and refreshes off their lists (two threads do)
        self._known_in_redis = KnownBlocks(_KNOWN_IN_REDIS, config.redis.refresh_interval_s)
        self._dtype_name = str(full_shape.dtype).removeprefix("torch.")
        if self.cpu:
            log.info("CPU tier: %d blocks, %.2f GiB", num_cpu_slots, num_cpu_slots * self.block_bytes / 2**30)
        self._open_redis(config, pin_staging, gather_piece_blocks)

    def _open_redis(self, config: KVStoreConfig, pin_staging: bool, gather_piece_blocks: int) -> None:
        """The Redis side: the store, its write-behind writer, the reads (prefetches, from the end) and refreshes
        on the prefetch threads; every part None without ``kvstore.redis.url``."""
        self.redis = RedisStore(config.redis) if config.redis.url else None
        if self.redis is None:
            self.writer = self._fetcher = self._prefetcher = self._prefetches = None
            self._refresher = self._end_reads = None
            return
        self.writer = self._make_writer(config)
        self._fetcher = RedisFetcher(self.redis, self.fingerprint, self.shape, self.cost_model, self.unit_of,
                                     self._unit_key, self._staging_block)
        self._prefetcher = ThreadPoolExecutor(config.redis.prefetch_threads, "kvtier-redis-prefetch")
        self._prefetches = Prefetches(self._prefetcher, self._fetcher.fetch)
        self._refresher = RedisRefresher(self.redis, self.fingerprint, self._fetcher.layouts_of, self._unit_key,
                                         self._prefetcher)
        self._end_reads = EndReads(self._fetcher, self._prefetcher, self.cost_model, self.block_bytes,
                                   self.shape.block_size) \
            if _computes_while_reading(config.redis.compute_while_reading, pin_staging) else None
        self.redis.open_read_connections()
        if pin_staging:
            self._reserve_staging(parse_size(config.redis.staging_memory) // self.block_bytes, gather_piece_blocks)

    def _reserve_staging(self, count: int, piece_blocks: int) -> None:
        """Pin ``count`` blocks' worth of host memory once and free it: torch's caching host allocator keeps
        pinned memory it has handed out, by size, so Redis reads (single blocks) and the gathers for Redis
        (``BlockMover``: pieces of ``piece_blocks``, and single blocks) get it back without waiting for
        cudaHostAlloc inside a step. With pieces, half of it is pieces."""
        began = time.perf_counter()
        num_pieces = count // 2 // piece_blocks if piece_blocks > 1 else 0
        singles = count - num_pieces * piece_blocks
        pieces = [torch.empty((piece_blocks, *self.shape.dims[1:]), dtype=self.shape.dtype, pin_memory=True)
                  for _ in range(num_pieces)]
        blocks = [self._staging_block() for _ in range(singles)]
        del blocks, pieces
        log.info("Redis staging: %d host blocks and %d pieces of %d pinned, %.2f GiB, in %.2f s", singles,
                 num_pieces, piece_blocks, count * self.block_bytes / 2**30, time.perf_counter() - began)

    def _staging_block(self) -> torch.Tensor:
        return torch.empty(self.shape.dims[1:], dtype=self.shape.dtype, pin_memory=self._pin_staging)

    def _make_writer(self, config: KVStoreConfig) -> WriteBehind:
        redis_config = config.redis
        return WriteBehind(self.redis, redis_config.write_queue_blocks, redis_config.write_batch_blocks,
                           parse_size(redis_config.write_batch_bytes))

    # --- lookup --------------------------------------------------------------------------------------------

    def prefetch(self, request_id: str, block_hashes: list[bytes], prefix: PrefixRef, first_block: int) -> None:
        """A request arrived: start reading from Redis, on the prefetch thread, the blocks of ``block_hashes``
        (those after its GPU hits, block ``first_block`` first) that follow what the CPU tier holds now. From
        their end backward, where computing the first of them meanwhile ends sooner (``workers.redis_end_reads``:
        the request computes from the start and ``resume`` meets the read); else from the start, and until that
        read is done the scheduler leaves the request waiting and runs the others (``prefetching``). Where
        another request reads a run they start with from the end, it waits for that instead, and reads only
        its blocks after the run (``EndReads.follow``)."""
        if self.redis is None:
            return
        in_cpu = self.cpu.lookup(block_hashes) if self.cpu is not None else 0
        if in_cpu < len(block_hashes):
            rest, start = block_hashes[in_cpu:], first_block + in_cpu
            if self._end_reads is not None and (common := self._end_reads.follow(request_id, rest, prefix, start)):
                self.stats["redis"].shared_reads += 1
                if common < len(rest):
                    self._prefetches.start(request_id, rest[common:], prefix, start + common)
            elif self._end_reads is None or not self._end_reads.start(request_id, rest, prefix, start):
                self.stats["redis"].shared_reads += self._prefetches.start(request_id, rest, prefix, start)

    def prefetching(self, request_id: str) -> bool:
        """Whether the request's prefetch is still reading (one from the end: and is better waited for than
        computed beside). The first time it is asked, it waits a moment for the prefetch: a prefix that is not
        in Redis is known in one round trip, and that request need not wait a step for it (the lookup did as
        much on the step loop before there were prefetches)."""
        if self._end_reads is not None and self._end_reads.leader_of(request_id) is not None:
            return True  # its leader's computation and read have not met yet
        futures = self._reads_of(request_id)
        if all(future.done() for future in futures):
            return False
        if request_id not in self._granted_grace:
            self._granted_grace.add(request_id)
            wait(futures, timeout=_PREFETCH_GRACE_S)
        if self.reading_from_end(request_id):
            return self._end_reads.should_wait(request_id)
        return not all(future.done() for future in futures)

    def wait_for_reads(self, request_ids: list[str], timeout_s: float) -> None:
        """Wait until a Redis read of one of these requests is done, or ``timeout_s`` passed."""
        futures = [future for request_id in request_ids for future in self._reads_of(request_id) if not future.done()]
        if futures:
            wait(futures, timeout=timeout_s, return_when=FIRST_COMPLETED)

    def _reads_of(self, request_id: str) -> list[Future[FetchOutcome]]:
        """The request's Redis reads: from the end, or its prefetch (perhaps shared with others), and the read
        from the end of the request it follows."""
        if self.reading_from_end(request_id):
            return [self._end_reads.future(request_id)]
        prefetch = self._prefetches.get(request_id) if self._prefetches is not None else None
        futures = prefetch.futures() if prefetch is not None else []
        leader = self._end_reads.leader_of(request_id) if self._end_reads is not None else None
        if leader is not None:
            futures.append(self._end_reads.future(leader))
        return futures

    def forget(self, request_id: str) -> None:
        """The request is over (or preempted) before its prefetch was used: what it read is dropped (and
        counted)."""
        self._granted_grace.discard(request_id)
        futures = self._prefetches.forget(request_id) if self._prefetches is not None else []
        if self._end_reads is not None:
            self._end_reads.unfollow(request_id)
            orphans = self._end_reads.orphans(request_id)
            futures.append(self._end_reads.forget(request_id))
            for orphan, follower in orphans:
                self._read_orphaned_run(orphan, follower)
        self._uncounted += [future for future in futures if future is not None and not future.cancel()]

    def _read_orphaned_run(self, request_id: str, follower: Follower) -> None:
        """A follower whose leader went before its read and computation met reads the run itself, from the
        start, but for the leading blocks the GPU pool caches now (those the leader computed); its read of its
        blocks after the run goes on."""
        run = follower.hashes[: follower.in_common]
        on_gpu = self._gpu_hits(run)
        self._prefetches.start_before(request_id, run[on_gpu:], follower.prefix, follower.first_block + on_gpu)

    def reading_from_end(self, request_id: str) -> bool:
        return self._end_reads is not None and request_id in self._end_reads

    def resume(self, request_id: str, block_hashes: list[bytes], first_block: int, max_tokens: int,
               wait_for_it: bool) -> tuple[list[str], int]:
        """A step of a request whose Redis read comes from the end (``reading_from_end``); ``block_hashes`` are
        its blocks from ``first_block``, the first not computed. Returns the tiers of the leading ones staged
        now (["redis", ...]: the read met the computation), and how many of ``max_tokens`` to compute this step
        (after those; 0: wait, the read is faster; with ``wait_for_it`` it waits here instead)."""
        staged, tokens = self._end_reads.advance(request_id, first_block, max_tokens, wait_for_it)
        news = self._end_reads.take_news()
        self._uncounted += news.finished
        self.stats["redis"].skipped_fetches += news.skipped
        for block_hash, salt in news.in_redis:  # the blocks the request computes need not be written again
            self._remember_in_redis([block_hash], salt)  # (the staged blocks are among them)
        self._forget_in_redis(news.absent)
        met = self._stage_leading(staged or {}, block_hashes)
        self.stats["redis"].hit_blocks += met
        self.stats["redis"].miss_blocks -= met  # the lookup counted them as missed
        return ["redis"] * met, tokens

    def lookup(self, block_hashes: list[bytes], prefix: PrefixRef, first_block: int = 0,
               request_id: str | None = None) -> list[str]:
        """The tier of each leading hash found below the GPU (["cpu", "cpu", "redis", ...]); pins and stages them.
        ``block_hashes[0]`` is block ``first_block`` of its sequence (the blocks before it are on the GPU). The
        Redis part is the request's prefetch where it has one (waited for, if still reading), else read now."""
        self._count_finished_reads()
        tiers: list[str] = []
        if self.cpu is not None:
            hits = block_hashes[: self.cpu.lookup(block_hashes)]
            for block_hash, slot in zip(hits, self.cpu.prepare_load(hits)):
                _push(self._cpu_pins, block_hash, slot)
            tiers += ["cpu"] * len(hits)
        rest = block_hashes[len(tiers) :]
        prefetched = self._prefetches.take(request_id) if self._prefetches is not None else None
        self._granted_grace.discard(request_id)
        if self._end_reads is not None:
            self._end_reads.unfollow(request_id)  # what it followed is on the GPU now
        if prefetched is not None and not rest:  # the CPU tier holds the rest by now
            self._uncounted += prefetched.owned()
        elif self.reading_from_end(request_id):  # the scheduler meets that read (``resume``)
            if not rest:
                self.forget(request_id)
        elif self.redis is not None and rest:
            outcome = self._redis_read(prefetched, rest, prefix, first_block + len(tiers))
            tiers += ["redis"] * self._take(outcome, rest, prefix.salt)
        self._count_lookup(block_hashes, tiers)
        return tiers

    def _redis_read(self, prefetched: Prefetch | None, rest: list[bytes], prefix: PrefixRef,
                    first_block: int) -> FetchOutcome:
        """The prefetch's outcome if it read from where ``rest`` starts (without the counts of a read it shared:
        that read's owner counts them); otherwise a read now."""
        if prefetched is not None:
            outcome = prefetched.outcome()
            if not outcome.staged or rest[0] in outcome.staged:
                return outcome
            self._take_counts(outcome)  # the hits before it shrank since (evicted): read from there
        return self._fetcher.fetch(rest, prefix, first_block)

    def _take(self, outcome: FetchOutcome, wanted: list[bytes], salt: str | None) -> int:
        """Stage the leading run of ``wanted`` (``salt``'s blocks) that ``outcome`` read and count what it
        counted; the rest of what it read is dropped (the GPU or CPU tier came to hold those blocks since the
        prefetch began)."""
        self._take_counts(outcome)
        run = self._stage_leading(outcome.staged, wanted)
        self._remember_in_redis(wanted[:run], salt)
        return run

    def _take_counts(self, outcome: FetchOutcome) -> None:
        """A read's counts, and what it found Redis lacks."""
        self.stats["redis"].add(outcome.stats)
        self._forget_in_redis(outcome.absent)

    def _stage_leading(self, staged: dict[bytes, torch.Tensor], wanted: list[bytes]) -> int:
        """Stage the leading run of ``wanted`` that ``staged`` holds, until the step's moves; its length."""
        run = 0
        while run < len(wanted) and wanted[run] in staged:
            _push(self._staged, wanted[run], staged[wanted[run]])
            run += 1
        return run

    def _count_finished_reads(self) -> None:
        """Count what the prefetches of finished requests read, once they are done; their blocks are dropped.
        (The step loop and a stats reader may both call this.)"""
        with self._fold_lock:  # (in place: the step loop adds to the list without it)
            done = [future for future in self._uncounted if future.done()]
            for future in done:
                self._uncounted.remove(future)
        for future in done:
            if future.exception() is not None:
                log.warning("a Redis read for a request that ended first failed: %r", future.exception())
                self.stats["redis"].errors += 1
            else:
                self._take_counts(future.result())

    def cancel(self, block_hashes: list[bytes], tiers: list[str]) -> None:
        """Undo ``lookup`` for loads that will not happen (the request could not be admitted)."""
        cpu_hashes = [h for h, tier in zip(block_hashes, tiers) if tier == "cpu"]
        if cpu_hashes:
            self.cpu.complete_load(cpu_hashes)
            for block_hash in cpu_hashes:
                if block_hash in self._cpu_pins:
                    _pop(self._cpu_pins, block_hash)
        for block_hash, tier in zip(block_hashes, tiers):
            if tier == "redis" and block_hash in self._staged:
                _pop(self._staged, block_hash)
        for tier in ("cpu", "redis"):  # the lookup counted these as hits
            self.stats[tier].hit_blocks -= tiers.count(tier)

    # --- moves ---------------------------------------------------------------------------------------------

    def move(
        self,
        evicted: list[tuple[bytes, int]],
        loads: list[BlockLoad],
        stores: list[tuple[bytes, int, PrefixRef]],
        pool_hits: list[tuple[bytes, int, PrefixRef]],
    ) -> None:
        """Before a forward: gather ``stores`` for Redis, spill ``evicted`` to the CPU tier, run ``loads``.
        ``pool_hits``, the GPU pool's blocks this step's new requests found cached: those Redis does not hold (as
        far as this worker knows) are gathered for Redis too, and those due are refreshed there."""
        self._count_finished_reads()
        self._take_refreshes()
        self.stats["gpu"].evicted_blocks += len(evicted)
        moves = self._plan(evicted, loads, stores, pool_hits)
        self._refresh_due(pool_hits)
        if moves.ops.empty:
            return
        counts = (len(moves.ops.cpu_loads), len(moves.ops.full_loads))  # blocks loaded from (CPU, Redis)
        if self._load_clock is not None and any(counts):
            with self._settle_lock:  # before the loads run: every GPU timing finds its counts here
                self._untimed_loads.append(counts)
        began = time.perf_counter()
        gathered = self.apply(moves.ops, moves.payload)
        self._account_loads(counts, time.perf_counter() - began)
        self._complete(moves, gathered)

    def _plan(self, evicted, loads, stores, pool_hits) -> _Moves:
        moves = _Moves()
        if self.writer is not None:  # (no Redis: nothing to sort out)
            self._plan_writes(moves, stores, pool_hits)
        moves.ops.reused.extend(block for _, block in evicted)
        if self.cpu is not None and evicted:
            block_of = dict(evicted)
            planned = self.cpu.prepare_store([h for h, _ in evicted])
            moves.spilled = [h for h, _ in planned]
            moves.ops.spills.extend((block_of[h], slot) for h, slot in planned)
        for load in loads:
            if load.tier == "cpu":
                moves.cpu_loaded.append(load.block_hash)
                moves.ops.cpu_loads.append((_pop(self._cpu_pins, load.block_hash), load.block_id))
        redis_loads = [load for load in loads if load.tier == "redis"]
        if redis_loads:
            moves.ops.full_loads.extend(load.block_id for load in redis_loads)
            moves.payload = [_pop(self._staged, load.block_hash) for load in redis_loads]
        return moves

    def _plan_writes(self, moves: _Moves, stores: list[tuple[bytes, int, PrefixRef]],
                     pool_hits: list[tuple[bytes, int, PrefixRef]]) -> None:
        """Gather for Redis the blocks it may lack, each once (a block two requests hit, or one computed last
        step and hit now): the computed ones, then the GPU hits, as many as the write queue has room for. A
        computed block that does not fit is a dropped write; a hit that does not fit is not counted, it is
        tried again at its next hit (counting it at every hit would count one block many times)."""
        unique: dict[bytes, tuple[bytes, int, PrefixRef]] = {}
        for block_hash, block, prefix in [*stores, *pool_hits]:
            if block_hash not in self._known_in_redis:
                unique.setdefault(block_hash, (block_hash, block, prefix))
        fresh = list(unique.values())
        room = self.writer.room()
        computed = len({block_hash for block_hash, _, _ in stores} & unique.keys())
        self.stats["redis"].dropped_writes += max(0, computed - room)
        moves.stored = [(block_hash, prefix) for block_hash, _, prefix in fresh[:room]]
        moves.ops.gather_blocks.extend(block for _, block, _ in fresh[:room])

    def _refresh_due(self, pool_hits: list[tuple[bytes, int, PrefixRef]]) -> None:
        """Start a refresh of the hits due one (``kvstore.known_blocks``), one per prefix."""
        if self._refresher is None or not pool_hits:
            return
        due = set(self._known_in_redis.due([block_hash for block_hash, _, _ in pool_hits], time.monotonic()))
        by_prefix: dict[PrefixRef, dict[bytes, None]] = {}
        for block_hash, _, prefix in pool_hits:
            if block_hash in due:
                by_prefix.setdefault(prefix, {})[block_hash] = None
        for prefix, block_hashes in by_prefix.items():
            self._refresher.start(list(block_hashes), prefix)

    def _take_refreshes(self) -> None:
        """Count the refreshes that ended and forget the blocks Redis lost (the step loop and a stats reader may
        both call this)."""
        if self._refresher is None:
            return
        with self._fold_lock:
            outcomes = self._refresher.take_done()
        for outcome in outcomes:
            self.stats["redis"].add(outcome.stats)
            self._known_in_redis.forget(outcome.lost)

    def wait_for_refreshes(self, timeout_s: float | None = None) -> None:
        """Until the refreshes started so far ended (their outcomes are taken at the next move or stats read)."""
        if self._refresher is not None:
            self._refresher.wait(timeout_s)

    def _account_loads(self, counts: tuple[int, int], seconds: float) -> None:
        self.stats["cpu"].bytes_out += counts[0] * self.block_bytes
        self.stats["redis"].bytes_out += counts[1] * self.block_bytes
        if self._load_clock is None:
            self._charge_load_time(counts, seconds)
        else:  # asynchronous: timed on the GPU once they ran
            self.settle_load_times(wait=False)

    def settle_load_times(self, wait: bool) -> None:
        """Charge the tiers the GPU time of the loads that finished (all of them if ``wait``). The step loop
        and a stats reader may both call this."""
        if self._load_clock is None:
            return
        with self._settle_lock:
            for seconds in self._load_clock(wait):
                self._charge_load_time(self._untimed_loads.popleft(), seconds)

    def _charge_load_time(self, counts: tuple[int, int], seconds: float) -> None:
        """The loads ran together: each tier is charged its share of the time."""
        if not any(counts):
            return
        for tier, count in zip(("cpu", "redis"), counts):
            if count:
                self.stats[tier].transfer_seconds += seconds * count / sum(counts)

    def _complete(self, moves: _Moves, gathered: GatheredBlocks | None) -> None:
        if moves.spilled:
            self.cpu.complete_store(moves.spilled, ok=True)
            self.stats["cpu"].stored_blocks += len(moves.spilled)
            self.stats["cpu"].bytes_in += len(moves.spilled) * self.block_bytes
            evicted = self.cpu.take_evicted()
            self.stats["cpu"].evicted_blocks += len(evicted)
            self.events.record("cpu", False, evicted)
            self.events.record("cpu", True, moves.spilled)
        if moves.cpu_loaded:
            self.cpu.complete_load(moves.cpu_loaded)
        if moves.stored:
            self._write(moves.stored, gathered)

    def _write(self, blocks: list[tuple[bytes, PrefixRef]], gathered: GatheredBlocks) -> None:
        """Queue the blocks for the writer's thread, which encodes each one's units, then its manifest, once the
        copies off the GPU are done (one ordered stream: a manifest follows its units)."""
        def encoded_blocks() -> Iterator[list[Item]]:
            host = gathered.wait()  # n blocks [L, 2, bs, Hkv, D]
            for (block_hash, prefix), block in zip(blocks, host):
                items = [(self._unit_key(block_hash, heads, prefix),
                          codec.encode_parts(self.unit_of(block_hash, heads), _unit_bytes(block, heads)))
                         for heads in self.unit_ranges]
                manifest = codec.encode_manifest(bytes.fromhex(self.fingerprint), block_hash, self.unit_ranges)
                yield [*items, (manifest_key(self.fingerprint, prefix, block_hash), manifest)]

        for block_hash, prefix in blocks:
            self._remember_in_redis([block_hash], prefix.salt)
        self.stats["redis"].dropped_writes += self.writer.submit(encoded_blocks, len(blocks))
        self.events.record("redis", True, [block_hash for block_hash, _ in blocks])

    # --- flush, stats, close -------------------------------------------------------------------------------

    def flush(self, salts: SaltSelection = SaltSelection(), redis: bool = True,
              local: list[bytes] | None = None) -> dict[str, int | None]:
        """Drop this model's blocks of the selected salts from Redis (unless ``redis`` is False) and from the CPU
        tier: every block, or only ``local``'s (the salts', which the CPU tier cannot tell); counts per tier
        (Redis: keys, None when it did not answer). The blocks remembered as in Redis (all, or the salts') are
        forgotten either way."""
        dropped: dict[str, int | None] = {"cpu": 0, "redis": 0}
        if self.cpu:
            held = self.cpu.lru_order()
            dropped["cpu"] = self.cpu.clear() if local is None else self.cpu.drop(local)
            kept = set(self.cpu.lru_order())  # entries a load in flight pins stay
            self.events.record("cpu", False, [h for h in held if h not in kept])
        if salts.everything:
            self._known_in_redis.clear()
        else:
            self._known_in_redis.forget_salts(salts)
        if self.redis is not None:
            self.writer.flush()  # (what is queued lands before a delete, this worker's or another's)
        if self.redis is not None and redis:
            dropped["redis"] = self.redis.delete_matching(flush_pattern(self.fingerprint, salts))
        return dropped

    def sync_writer_stats(self) -> None:
        """Fold the write-behind thread's counters, the finished Redis reads' and the loads' GPU times into the
        tiers' stats."""
        self.settle_load_times(wait=True)
        self._count_finished_reads()
        self._take_refreshes()
        if self.writer is None:
            return
        redis_stats = self.stats["redis"]
        redis_stats.stored_blocks = self.writer.written
        redis_stats.bytes_in = self.writer.bytes_written
        redis_stats.errors = max(redis_stats.errors, self.redis.errors)

    def close(self) -> None:
        if self._end_reads is not None:
            self._end_reads.stop_all()
        if self._prefetcher is not None:
            self._prefetcher.shutdown(wait=True, cancel_futures=True)
        if self.writer is not None:
            self.writer.close()
            self.sync_writer_stats()
        if self.redis is not None:
            self.redis.close()

    # --- helpers -------------------------------------------------------------------------------------------

    def _unit_key(self, block_hash: bytes, heads: tuple[int, int], prefix: PrefixRef) -> str:
        return block_key(self.fingerprint, prefix, block_hash, heads)

    def unit_of(self, block_hash: bytes, heads: tuple[int, int] | None = None) -> codec.BlockUnit:
        start, end = heads or (0, self.shape.num_kv_heads)
        shape = self.shape
        return codec.BlockUnit(
            fingerprint=bytes.fromhex(self.fingerprint), block_hash=block_hash, dtype=self._dtype_name,
            shape=(shape.num_layers, 2, shape.block_size, end - start, shape.head_dim),
            head_start=start, head_end=end, total_heads=shape.num_kv_heads,
        )

    def _forget_in_redis(self, block_hashes: list[bytes]) -> None:
        """Redis does not hold these (any more): written again when computed, whoever wrote them before."""
        self._known_in_redis.forget(block_hashes)

    def _remember_in_redis(self, block_hashes: list[bytes], salt: str | None) -> None:
        self._known_in_redis.confirm(block_hashes, salt, time.monotonic())

    def _count_lookup(self, block_hashes: list[bytes], tiers: list[str]) -> None:
        for tier in ("cpu", "redis"):
            self.stats[tier].hit_blocks += tiers.count(tier)
        if len(tiers) < len(block_hashes):
            self.stats["redis" if self.redis is not None else "cpu"].miss_blocks += len(block_hashes) - len(tiers)


def _push(table: dict[bytes, list[T]], block_hash: bytes, value: T) -> None:
    table.setdefault(block_hash, []).append(value)


def _pop(table: dict[bytes, list[T]], block_hash: bytes) -> T:
    """One of ``block_hash``'s values (the last pushed); the hash leaves the table with its last value."""
    values = table[block_hash]
    value = values.pop()
    if not values:
        del table[block_hash]
    return value


def _unit_bytes(block: torch.Tensor, heads: tuple[int, int]) -> memoryview:
    """The raw bytes of ``block``'s KV heads ``[start, end)`` (block [L, 2, bs, Hkv, D]); no copy for all heads."""
    return host_bytes(block[:, :, :, heads[0] : heads[1]].contiguous())


def _computes_while_reading(setting: str, on_cuda: bool) -> bool:
    """``kvstore.redis.compute_while_reading``: "auto" is on with CUDA only, where the computing runs on the GPU
    beside the host's reading (on the CPU both take the same cores: the Redis hit measured slower with it)."""
    return setting == "on" or (setting == "auto" and on_cuda)
