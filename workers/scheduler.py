"""Continuous batching with chunked prefill and preemption by recompute. Pure Python.

Each step has a token budget (``max_num_batched_tokens``). Running sequences are served first, oldest first:
a decoding sequence takes one token, a sequence still prefilling takes the next chunk of its prompt. Waiting
sequences are admitted, oldest first, with whatever budget and blocks remain, up to ``max_num_seqs`` running.

When a running sequence needs a block and none is free, the newest running sequence is preempted: its blocks
are freed and it goes back to the head of the waiting queue, to be recomputed (prompt and generated tokens)
when it is admitted again. No waiting sequence is admitted in a step that preempted.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from kvstore.block_pool import BlockPool
from workers.engine_config import SchedulerConfig
from workers.sequence import FinishReason, Sequence, SequenceStatus


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


@dataclass(frozen=True)
class SchedulerOutput:
    chunks: list[ScheduledChunk]
    preempted: list[Sequence]

    @property
    def num_tokens(self) -> int:
        return sum(chunk.num_tokens for chunk in self.chunks)


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_pool: BlockPool, block_size: int) -> None:
        self.config = config
        self.block_pool = block_pool
        self.block_size = block_size
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        chunks, preempted = self._schedule_running(budget)
        budget -= sum(chunk.num_tokens for chunk in chunks)
        if not preempted:
            chunks += self._admit_waiting(budget)
        return SchedulerOutput(chunks, preempted)

    def mark_computed(self, output: SchedulerOutput) -> None:
        """Call after the step ran: the scheduled tokens' KV is now in the cache."""
        for chunk in output.chunks:
            chunk.seq.num_computed_tokens = chunk.start + chunk.num_tokens

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Retire a running or waiting sequence and free its blocks."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self._release(seq)
        seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason

    def _schedule_running(self, budget: int) -> tuple[list[ScheduledChunk], list[Sequence]]:
        chunks: list[ScheduledChunk] = []
        preempted: list[Sequence] = []
        index = 0
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            num_tokens = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self._reserve(seq, num_tokens):
                victim = self.running.pop()  # the newest; never one already scheduled this step
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    return chunks, preempted
            chunks.append(ScheduledChunk.of(seq, num_tokens))
            budget -= num_tokens
            index += 1
        return chunks, preempted

    def _admit_waiting(self, budget: int) -> list[ScheduledChunk]:
        chunks = []
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            num_tokens = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self._reserve(seq, num_tokens):
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            chunks.append(ScheduledChunk.of(seq, num_tokens))
            budget -= num_tokens
        return chunks

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
        self._release(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def _release(self, seq: Sequence) -> None:
        self.block_pool.free(seq.block_ids)
        seq.block_ids = []
