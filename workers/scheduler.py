"""Continuous batching with chunked prefill and preemption by recompute. Pure Python.

Each step has a token budget (``max_num_batched_tokens``). Running sequences are served first, in order:
a decoding sequence takes one token, a sequence still prefilling takes the next chunk of its prompt. Waiting
sequences are admitted, in order, with whatever budget and blocks remain, up to ``max_num_seqs`` running.

Order is by priority (a lower value first, as in vLLM; 0 is normal), then by arrival: both queues are kept
sorted by priority, and within one priority a sequence joins the tail (the head, when it is preempted).

When a running sequence needs a block and none is free, the last running sequence (the newest of the least
urgent) is preempted: its blocks are freed and it goes back to the head of its priority in the waiting
queue, to be recomputed (prompt and generated tokens) when it is admitted again. No waiting sequence is
admitted in a step that preempted so. And when the head of the waiting queue is more urgent than the last
running sequence but its first chunk finds no blocks or no running slot, running sequences less urgent than
it are preempted, last first, until it fits; it is admitted in the same step. Running sequences less urgent
than it also leave its first chunk's share of the token budget (their prefill chunks shrink; a decode keeps
its one token), so a long prompt's prefill does not hold it back.

Prefix caching: a sequence being admitted first takes the GPU blocks that already cache the leading blocks
of its tokens (shared, reference-counted), then asks the lower tiers (CPU, Redis) for the run that follows;
blocks found there get fresh GPU blocks and a ``BlockLoad`` the engine executes before the step's forward.
Only the rest is computed. At least the last token is always computed, so the step has logits to sample.
A waiting sequence whose next block to compute a running sequence as urgent or more is computing keeps its
place (while something else runs) and finds the block cached later (``workers.blocks_in_flight``).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from kvstore.block_pool import BlockPool
from kvstore.redis_keys import BlockLoad, PrefixRef
from kvstore.stats import TIERS, KVStoreStats
from workers.blocks_in_flight import BlocksInFlight
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
    in_flight: BlocksInFlight | None = None  # what the running sequences compute, once a waiting one asks


@dataclass(frozen=True)
class SchedulerOutput:
    chunks: list[ScheduledChunk]
    preempted: list[Sequence]
    loads: list[BlockLoad] = field(default_factory=list)  # run before the forward
    # (hash, block, prefix) of each block the GPU pool cached that a sequence admitted this step took: the
    # tiers below keep Redis's copy of such hot blocks (``KVTiers.move``)
    pool_hits: list[tuple[bytes, int, PrefixRef]] = field(default_factory=list)
    yielded: int = 0  # of ``preempted``, the first ones: those that made room for a more urgent request

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
        self._refused: Sequence | None = None  # the waiting sequence the last admission found no blocks for

    def add(self, seq: Sequence) -> None:
        """Queue ``seq`` behind every waiting sequence of its priority or a more urgent one."""
        _insert_after_peers(self.waiting, seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        yielded = self._preempt_for_priority(budget)
        chunks, preempted, loads = self._schedule_running(budget, self._urgent_waiting(budget))
        budget -= sum(chunk.num_tokens for chunk in chunks)
        if not preempted:
            admitted = self._admit_waiting(budget, busy=bool(chunks), earlier_loads=loads)
            return SchedulerOutput(chunks + admitted.chunks, yielded, loads + admitted.loads, admitted.pool_hits,
                                   len(yielded))
        return SchedulerOutput(chunks, yielded + preempted, loads, yielded=len(yielded))

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

    def _preempt_for_priority(self, budget: int) -> list[Sequence]:
        """Preempt running sequences less urgent than the head of the waiting queue, last first, while its first
        chunk would find no running slot or no blocks; those preempted, in order."""
        preempted = []
        while (head := self._urgent_head()) is not None:
            refused = self._refused is head  # the estimate said it fits, yet it did not: make room for one more
            if not refused and len(self.running) < self.config.max_num_seqs and self._fits_beside_running(head, budget):
                break
            self._refused = None
            victim = self.running.pop()
            self._preempt(victim)
            preempted.append(victim)
        return preempted

    def _fits_beside_running(self, seq: Sequence, budget: int) -> bool:
        """Whether the free blocks hold what the running sequences take this step and ``seq``'s first chunk after
        the leading blocks the GPU pool caches. An estimate for ``_preempt_for_priority``: each running sequence
        is counted with its next chunk under the whole budget (an upper bound), and ``seq``'s hits in the lower
        tiers, which need blocks too, are not asked for (a refusal the estimate missed makes room next step)."""
        hits = self.block_pool.match_prefix(seq.reusable_block_hashes()) if seq.hasher is not None else []
        idle_hits = sum(1 for block_id in hits if self.block_pool.ref_count(block_id) == 0)  # come off the free list
        first_chunk = min(seq.num_tokens - len(hits) * self.block_size, budget)
        needed = -(-first_chunk // self.block_size) + idle_hits
        for running in self.running:
            needed += self._blocks_needed(running, min(running.num_tokens - running.num_computed_tokens, budget))
        return self.block_pool.can_allocate(needed)

    def _urgent_head(self) -> Sequence | None:
        """The head of the waiting queue when it is more urgent than the last running sequence and could be
        admitted now (not still being read from the lower tiers: it is admitted once its read ends), else None."""
        if not (self.waiting and self.running) or self.running[-1].priority <= self.waiting[0].priority:
            return None
        return None if self._reading_lower_tiers(self.waiting[0]) else self.waiting[0]

    def _urgent_waiting(self, budget: int) -> tuple[int, int] | None:
        """(priority, first chunk's tokens) of the urgent head (``_urgent_head``) when it has a running slot
        this step (``_preempt_for_priority`` made room), else None."""
        head = self._urgent_head()
        if head is None or len(self.running) >= self.config.max_num_seqs:
            return None
        return head.priority, min(head.num_tokens, budget)

    @staticmethod
    def _budget_for(seq: Sequence, budget: int, urgent: tuple[int, int] | None) -> int:
        """The budget ``seq`` may take this step: all of it, unless it is less urgent than the waiting head
        (``urgent``): then what that head's first chunk leaves, at least one token (a decode goes on)."""
        if urgent is None or seq.priority <= urgent[0]:
            return budget
        return max(1, budget - urgent[1])

    def _schedule_running(self, budget: int, urgent: tuple[int, int] | None = None
                          ) -> tuple[list[ScheduledChunk], list[Sequence], list[BlockLoad]]:
        chunks: list[ScheduledChunk] = []
        preempted: list[Sequence] = []
        loads: list[BlockLoad] = []
        index = 0
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            num_tokens = min(seq.num_tokens - seq.num_computed_tokens, self._budget_for(seq, budget, urgent))
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
        sequence loads this step (``earlier_loads``, or one admitted before) is shared, not looked up again. One
        whose next block to compute a running sequence computes (``_trails_in_flight``) keeps its place too, while
        something runs this step; it finds the block cached later instead of computing it twice."""
        admitted = _Admitted(loading={load.block_hash: load.block_id for load in earlier_loads})
        reading: list[Sequence] = []
        held: list[Sequence] = []  # keep their places: reading, or trailing a computation of their prefix
        self._refused = None
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            last_hope = not (busy or admitted.chunks or reading or len(self.waiting) > 1)  # nothing else to run
            if not (last_hope and self._reading_from_end(seq)) and self._reading_lower_tiers(seq):
                reading.append(seq)
                held.append(self.waiting.popleft())
                continue
            if (busy or admitted.chunks) and self._trails_in_flight(seq, admitted):
                held.append(self.waiting.popleft())
                continue
            num_tokens = self._admit(seq, budget, alone=not (busy or admitted.chunks), admitted=admitted)
            if num_tokens is None:
                self._refused = seq
                break
            if admitted.in_flight is not None:
                admitted.in_flight.add(seq)
            budget -= num_tokens
        self.waiting.extendleft(reversed(held))
        if reading and not (busy or admitted.chunks):
            self.lower_tiers.wait_for_reads([seq.request_id for seq in reading], _READ_WAIT_S)
        return admitted

    def _trails_in_flight(self, seq: Sequence, admitted: _Admitted) -> bool:
        """Whether the first block ``seq`` would compute is one a running sequence as urgent or more computes
        this step or later (``workers.blocks_in_flight``): then ``seq`` waits to find it cached."""
        if seq.hasher is None or seq.num_computed_tokens:
            return False
        hashes = seq.reusable_block_hashes()
        first = len(self.block_pool.match_prefix(hashes))
        while first < len(hashes) and hashes[first] in admitted.loading:
            first += 1
        if first == len(hashes):
            return False
        if admitted.in_flight is None:
            admitted.in_flight = BlocksInFlight(self.block_size)
            for running in self.running:
                admitted.in_flight.add(running)
        return admitted.in_flight.computed_by_another(hashes[first], seq.priority)

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
        _insert_after_peers(self.running, seq)
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

    def _blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """The blocks ``seq`` lacks to hold ``num_tokens`` more tokens."""
        return max(0, -(-(seq.num_computed_tokens + num_tokens) // self.block_size) - len(seq.block_ids))

    def _reserve(self, seq: Sequence, num_tokens: int) -> bool:
        """Give ``seq`` enough blocks to hold ``num_tokens`` more tokens; False (and no change) if the pool can't."""
        blocks_needed = self._blocks_needed(seq, num_tokens)
        if blocks_needed == 0:
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
        _insert_before_peers(self.waiting, seq)

    def _release(self, seq: Sequence) -> None:
        self.block_pool.free(reversed(seq.block_ids))  # tail first: a shared prefix is evicted last
        seq.block_ids = []


def _insert_after_peers(queue: list[Sequence] | deque[Sequence], seq: Sequence) -> None:
    """Put ``seq`` after every sequence of ``queue`` (sorted by priority) of its priority or a lower value."""
    index = len(queue)
    while index > 0 and queue[index - 1].priority > seq.priority:
        index -= 1
    queue.insert(index, seq)


def _insert_before_peers(queue: deque[Sequence], seq: Sequence) -> None:
    """Put ``seq`` before every sequence of ``queue`` (sorted by priority) of its priority or a higher value."""
    index = 0
    while index < len(queue) and queue[index].priority < seq.priority:
        index += 1
    queue.insert(index, seq)
