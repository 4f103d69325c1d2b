"""Continuous batching with chunked prefill and preemption by recompute. Pure Python.

Each step has a token budget (``max_num_batched_tokens``). Running sequences are served first, oldest first:
a decoding sequence takes one token, a sequence still prefilling takes the next chunk of its prompt. Waiting
sequences are admitted, oldest first, with whatever budget and blocks remain, up to ``max_num_seqs`` running.

When a running sequence needs a block and none is free, the newest running sequence is preempted: its blocks
are freed and it goes back to the head of the waiting queue, to be recomputed (prompt and generated tokens)
when it is admitted again. No waiting sequence is admitted in a step that preempted.

Prefix caching: a sequence being admitted first takes the GPU blocks that already cache the leading blocks
of its tokens (shared, reference-counted), then asks the lower tiers (CPU, Redis) for the run that follows;
blocks found there get fresh GPU blocks and a ``BlockLoad`` the engine executes before the step's forward.
Only the rest is computed. At least the last token is always computed, so the step has logits to sample.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from kvstore.block_pool import BlockPool
from kvstore.redis_keys import BlockLoad, PrefixRef
from kvstore.stats import TIERS, KVStoreStats
from workers.engine_config import SchedulerConfig
from workers.sequence import FinishReason, Sequence, SequenceStatus

_READ_WAIT_S = 0.05  # the longest a step with nothing to run waits for a Redis read before looking again


@dataclass(frozen=True)
class ScheduledChunk:
    """Compute tokens ``[start, start + num_tokens)`` of ``seq`` this step; ``samples`` when that reaches the
    sequence's last token, so the step samples its next one (fixed when scheduled)."""

    seq: Sequence
    start: int
    num_tokens: int
    samples: bool

    @classmethod
    def of(cls, seq: Sequence, num_tokens: int) -> ScheduledChunk:
        start = seq.num_computed_tokens
        return cls(seq, start, num_tokens, samples=start + num_tokens == seq.num_tokens)


class LowerTiers(Protocol):
    """The tiers below the GPU, as the scheduler sees them (``workers.kv_tiers.KVTiers``)."""

    def lookup(self, block_hashes: list[bytes], prefix: PrefixRef, first_block: int = 0,
               request_id: str | None = None) -> list[str]: ...

    def cancel(self, block_hashes: list[bytes], tiers: list[str]) -> None: ...

    def prefetching(self, request_id: str) -> bool: ...

    def forget(self, request_id: str) -> None: ...

    def reading_from_end(self, request_id: str) -> bool: ...

    def resume(self, request_id: str, block_hashes: list[bytes], first_block: int, max_tokens: int,
               wait_for_it: bool) -> tuple[list[str], int]: ...

    def wait_for_reads(self, request_ids: list[str], timeout_s: float) -> None: ...


@dataclass(frozen=True)
class _PrefixMatch:
    gpu_blocks: int = 0  # the leading blocks on the GPU: cached there, or loaded this step for another sequence
    pool_hits: list[tuple[bytes, int]] = field(default_factory=list)  # of those, the cached ones (hash, block)
    lower_hashes: list[bytes] = field(default_factory=list)
    lower_tiers: list[str] = field(default_factory=list)
    lower_blocks: list[int] = field(default_factory=list)
    missed_blocks: int = 0

    def loads(self, salt: str | None) -> list[BlockLoad]:
        return [BlockLoad(*load, salt) for load in zip(self.lower_hashes, self.lower_blocks, self.lower_tiers)]

    def cached_tokens(self, block_size: int) -> dict[str, int]:
        counts = {tier: self.lower_tiers.count(tier) * block_size for tier in TIERS}
        counts["gpu"] = self.gpu_blocks * block_size
        return counts


@dataclass
class _Admitted:
    """What one step admitted; ``loading``: hash -> GPU block of every load the step runs so far."""

    chunks: list[ScheduledChunk] = field(default_factory=list)
    loads: list[BlockLoad] = field(default_factory=list)
    loading: dict[bytes, int] = field(default_factory=dict)
    pool_hits: list[tuple[bytes, int, PrefixRef]] = field(default_factory=list)


@dataclass(frozen=True)
class SchedulerOutput:
    chunks: list[ScheduledChunk]
    preempted: list[Sequence]
    loads: list[BlockLoad] = field(default_factory=list)  # run before the forward
    # (hash, block, prefix) of each block the GPU pool cached that a sequence admitted this step took: the
    # tiers below keep Redis's copy of such hot blocks (``KVTiers.move``)
    pool_hits: list[tuple[bytes, int, PrefixRef]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(chunk.num_tokens for chunk in self.chunks)


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        block_pool: BlockPool,
        block_size: int,
        lower_tiers: LowerTiers | None = None,
        stats: KVStoreStats | None = None,
    ) -> None:
        self.config = config
        self.block_pool = block_pool
        self.block_size = block_size
        self.lower_tiers = lower_tiers
        self.stats = stats or KVStoreStats()
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        chunks, preempted, loads = self._schedule_running(budget)
        budget -= sum(chunk.num_tokens for chunk in chunks)
        if not preempted:
            admitted = self._admit_waiting(budget, busy=bool(chunks), earlier_loads=loads)
            return SchedulerOutput(chunks + admitted.chunks, preempted, loads + admitted.loads, admitted.pool_hits)
        return SchedulerOutput(chunks, preempted, loads)

    def mark_computed(self, output: SchedulerOutput) -> None:
        """Call after the step ran: the scheduled tokens' KV is now in the cache."""
        for chunk in output.chunks:
            chunk.seq.num_computed_tokens = chunk.start + chunk.num_tokens

    def mark_loaded(self, loads: list[BlockLoad]) -> None:
        """Call once the loads are in their GPU blocks: those blocks now cache their hashes."""
        for load in loads:
            self.block_pool.cache(load.block_id, load.block_hash)

    def cache_full_blocks(self, output: SchedulerOutput) -> list[tuple[bytes, int, PrefixRef]]:
        """Register the blocks this step filled in the GPU prefix cache; returns (hash, block, prefix) of each
        newly cached one (for the lower tiers to store)."""
        cached = []
        for chunk in output.chunks:
            seq = chunk.seq
            if seq.hasher is None or seq.status is not SequenceStatus.RUNNING:
                continue
            num_full = seq.num_computed_tokens // self.block_size
            hashes = seq.hasher.update(seq.token_ids, seq.num_computed_tokens)
            for index in range(seq.num_cached_blocks, num_full):
                if self.block_pool.cache(seq.block_ids[index], hashes[index]):
                    cached.append((hashes[index], seq.block_ids[index], seq.prefix_ref))
            seq.num_cached_blocks = num_full
        return cached

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Retire a running or waiting sequence and free its blocks."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self._release(seq)
        if self.lower_tiers is not None:
            self.lower_tiers.forget(seq.request_id)
        seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason

    def _schedule_running(self, budget: int) -> tuple[list[ScheduledChunk], list[Sequence], list[BlockLoad]]:
        chunks: list[ScheduledChunk] = []
        preempted: list[Sequence] = []
        loads: list[BlockLoad] = []
        index = 0
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            num_tokens = min(seq.num_tokens - seq.num_computed_tokens, budget)
            last_chance = not chunks and index == len(self.running) - 1  # else the step loop could spin
            resumed, num_tokens = self._resume_reading(seq, num_tokens, alone=last_chance)
            while not self._reserve(seq, num_tokens):
                victim = self.running.pop()  # the newest; never one already scheduled this step
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    self._cancel_loads(resumed)
                    return chunks, preempted, loads
            loads += self._accept_loads(seq, resumed)
            index += 1
            if num_tokens:  # 0: it waits this step for its Redis read, which is faster than computing
                chunks.append(ScheduledChunk.of(seq, num_tokens))
                budget -= num_tokens
        return chunks, preempted, loads

    def _resume_reading(self, seq: Sequence, num_tokens: int, alone: bool) -> tuple[list[BlockLoad], int]:
        """For a sequence computing its prefix while Redis reads it from the end: the loads where the read met
        the computation (their GPU blocks allocated), and how many tokens to compute this step (after them).
        ``alone``: nothing else would run this step, so a read better waited for is waited for."""
        if not self._reading_from_end(seq):
            return [], num_tokens
        if seq.num_computed_tokens % self.block_size:  # the read meets it at a block boundary
            return [], min(num_tokens, self.block_size - seq.num_computed_tokens % self.block_size)
        first = seq.num_computed_tokens // self.block_size
        hashes = seq.reusable_block_hashes()[first:]
        tiers, num_tokens = self.lower_tiers.resume(seq.request_id, hashes, first, num_tokens, alone)
        if tiers and not self.block_pool.can_allocate(len(tiers)):
            self.lower_tiers.cancel(hashes[: len(tiers)], tiers)
            return [], num_tokens
        blocks = self.block_pool.allocate(len(tiers))
        seq.block_ids += blocks
        seq.num_computed_tokens += len(blocks) * self.block_size
        remaining = seq.num_tokens - seq.num_computed_tokens
        salt = seq.hasher.salt
        return [BlockLoad(*load, salt) for load in zip(hashes, blocks, tiers)], min(remaining, num_tokens)

    def _accept_loads(self, seq: Sequence, loads: list[BlockLoad]) -> list[BlockLoad]:
        if loads and seq.cached_tokens is not None:
            seq.cached_tokens["redis"] += len(loads) * self.block_size
        return loads

    def _cancel_loads(self, loads: list[BlockLoad]) -> None:
        """Undo ``_resume_reading``'s loads of a sequence that will not run this step (its blocks are freed)."""
        if loads:
            self.lower_tiers.cancel([load.block_hash for load in loads], [load.tier for load in loads])

    def _admit_waiting(self, budget: int, busy: bool, earlier_loads: list[BlockLoad]) -> _Admitted:
        """Admit waiting sequences in order while the budget and the pool allow. One whose prefix is still being
        read from Redis in the background keeps its place while the others are admitted behind it; where
        nothing else runs, the step waits a moment for any such read to end (the next step finds it done, or
        admits a request that arrived meanwhile): no spinning. Except a request reading from the end with
        nothing else to run: it is admitted, to compute while it reads (``_resume_reading``). A block another
        sequence loads this step (``earlier_loads``, or one admitted before) is shared, not looked up again."""
        admitted = _Admitted(loading={load.block_hash: load.block_id for load in earlier_loads})
        reading: list[Sequence] = []
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            last_hope = not (busy or admitted.chunks or reading or len(self.waiting) > 1)  # nothing else to run
            if not (last_hope and self._reading_from_end(seq)) and self._reading_lower_tiers(seq):
                reading.append(self.waiting.popleft())
                continue
            num_tokens = self._admit(seq, budget, alone=not (busy or admitted.chunks), admitted=admitted)
            if num_tokens is None:
                break
            budget -= num_tokens
        self.waiting.extendleft(reversed(reading))
        if reading and not (busy or admitted.chunks):
            self.lower_tiers.wait_for_reads([seq.request_id for seq in reading], _READ_WAIT_S)
        return admitted

    def _admit(self, seq: Sequence, budget: int, alone: bool, admitted: _Admitted) -> int | None:
        """Move ``seq``, the head of the waiting queue, to running with up to ``budget`` tokens this step (0:
        it waits this step for its Redis read, which is faster than computing); the tokens, or None (and no
        change) when the pool cannot hold them. ``alone``: nothing else runs this step."""
        match = self._match_prefix(seq, admitted.loading) if seq.num_computed_tokens == 0 else _PrefixMatch()
        num_tokens = min(seq.num_tokens - seq.num_computed_tokens, budget)
        resumed, num_tokens = self._resume_reading(seq, num_tokens, alone=alone)
        if not self._reserve(seq, num_tokens):
            self._cancel_loads(resumed)
            self._unmatch(seq, match)
            return None
        self.waiting.popleft()
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
        if num_tokens:
            admitted.chunks.append(ScheduledChunk.of(seq, num_tokens))
        self._count_match(seq, match)
        loads = match.loads(seq.hasher.salt if seq.hasher is not None else None) + self._accept_loads(seq, resumed)
        admitted.loading.update((load.block_hash, load.block_id) for load in loads)
        admitted.loads += loads
        admitted.pool_hits += [(block_hash, block_id, seq.prefix_ref) for block_hash, block_id in match.pool_hits]
        return num_tokens

    def _reading_from_end(self, seq: Sequence) -> bool:
        return self.lower_tiers is not None and self.lower_tiers.reading_from_end(seq.request_id)

    def _reading_lower_tiers(self, seq: Sequence) -> bool:
        return (seq.num_computed_tokens == 0 and self.lower_tiers is not None
                and self.lower_tiers.prefetching(seq.request_id))

    def _match_prefix(self, seq: Sequence, loading: dict[bytes, int]) -> _PrefixMatch:
        """Take the GPU blocks caching ``seq``'s leading blocks, then those that ``loading`` (hash -> block) fills
        this step for other sequences, and room for what the lower tiers hold after them (only for sequences
        with a hasher: the engine gives them one when prefix caching is on). Two sequences sharing a prefix and
        admitted in one step share its blocks, loaded once. (Running sequences whose reads from the end meet on
        the same blocks in one step each load their own copy: ``KVTiers`` stages one per load.)"""
        if seq.hasher is None:
            return _PrefixMatch()
        hashes = seq.reusable_block_hashes()
        gpu_blocks = self.block_pool.match_prefix(hashes)
        pool_hits = list(zip(hashes, gpu_blocks))
        for block_hash in hashes[len(gpu_blocks) :]:  # the loads run before the forward that reads them
            if block_hash not in loading:
                break
            gpu_blocks.append(loading[block_hash])
        self.block_pool.share(gpu_blocks)
        rest = hashes[len(gpu_blocks) :]
        tiers = []
        if rest and self.lower_tiers is not None:  # (a prefetch with nothing left to read ends with the request)
            tiers = self.lower_tiers.lookup(rest, seq.prefix_ref, len(gpu_blocks), seq.request_id)
        if tiers and not self.block_pool.can_allocate(len(tiers)):
            self.lower_tiers.cancel(rest[: len(tiers)], tiers)
            tiers = []
        lower_blocks = self.block_pool.allocate(len(tiers))
        seq.block_ids = gpu_blocks + lower_blocks
        seq.num_computed_tokens = len(seq.block_ids) * self.block_size
        seq.num_cached_blocks = len(gpu_blocks)  # loaded blocks are registered by mark_loaded
        return _PrefixMatch(len(gpu_blocks), pool_hits, rest[: len(tiers)], tiers, lower_blocks,
                            len(hashes) - len(gpu_blocks))

    def _unmatch(self, seq: Sequence, match: _PrefixMatch) -> None:
        if match.lower_tiers:
            self.lower_tiers.cancel(match.lower_hashes, match.lower_tiers)
        self._release(seq)
        seq.num_computed_tokens = 0
        seq.num_cached_blocks = 0

    def _count_match(self, seq: Sequence, match: _PrefixMatch) -> None:
        self.stats["gpu"].hit_blocks += match.gpu_blocks
        self.stats["gpu"].miss_blocks += match.missed_blocks
        if seq.cached_tokens is None:
            seq.cached_tokens = match.cached_tokens(self.block_size)

    def _reserve(self, seq: Sequence, num_tokens: int) -> bool:
        """Give ``seq`` enough blocks to hold ``num_tokens`` more tokens; False (and no change) if the pool can't."""
        blocks_needed = -(-(seq.num_computed_tokens + num_tokens) // self.block_size) - len(seq.block_ids)
        if blocks_needed <= 0:
            return True
        if not self.block_pool.can_allocate(blocks_needed):
            return False
        seq.block_ids += self.block_pool.allocate(blocks_needed)
        return True

    def _preempt(self, seq: Sequence) -> None:
        if self.lower_tiers is not None:
            self.lower_tiers.forget(seq.request_id)  # a read from the end stops; readmitted, it looks up anew
        self._release(seq)
        seq.num_computed_tokens = 0
        seq.num_cached_blocks = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def _release(self, seq: Sequence) -> None:
        self.block_pool.free(reversed(seq.block_ids))  # tail first: a shared prefix is evicted last
        seq.block_ids = []
