"""Prompt log-probabilities (``SamplingParams.prompt_logprobs``): which rows of a step's batch score which
prompt tokens, and their scores.

Prompt token t's log-probability comes from the logits at position t - 1, so a chunk computing positions
[a, b) of a P-token prompt scores tokens a + 1 .. min(b, P - 1) (position P - 1's logits sample the first
generated token instead). Invariants: a request's scores are kept in token order, token 1 first, each token
scored once; a chunk computed again after a preemption scores only the tokens not scored yet; and until the
last is scored the caches supply no block at or after the first position still to score
(``Sequence.reusable_tokens_limit``), so no position is skipped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from workers.sampler import TokenLogprobs, logprobs_of
from workers.scheduler import ScheduledChunk
from workers.sequence import Sequence
from workers.uploads import upload

# Rows turned into logits at once: bounds the [rows, vocab] fp32 logits (512 x 128k: 256 MiB)
SCORING_SLICE_ROWS = 512


@dataclass
class PromptScores:
    """One request's prompt tokens scored so far, token 1 first, with ``count`` alternatives each."""

    count: int
    scored: list[TokenLogprobs] = field(default_factory=list)

    def complete(self, seq: Sequence) -> bool:
        return len(self.scored) == seq.num_prompt_tokens - 1

    def limit_reuse(self, seq: Sequence) -> None:
        """What the caches may supply ``seq``: only blocks before its first unscored position, until all are."""
        seq.reusable_tokens_limit = None if self.complete(seq) else len(self.scored)


@dataclass
class ScoringPlan:
    """A step's scoring: batch rows, the prompt token each one scores, the alternatives wanted; and for each
    request scored, its scores and how many of the rows (consecutive, in order) are its."""

    rows: list[int] = field(default_factory=list)
    targets: list[int] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    owners: list[tuple[PromptScores, Sequence, int]] = field(default_factory=list)


def plan_scoring(chunks: list[ScheduledChunk], scores_of: Callable[[Sequence], PromptScores | None]) -> ScoringPlan:
    """The rows of the step's batch (chunks in order, as ``workers.runner.build_host_batch`` lays them out)
    that score prompt tokens not yet scored."""
    plan = ScoringPlan()
    offset = 0
    for chunk in chunks:
        scores, seq = scores_of(chunk.seq), chunk.seq
        if scores is not None:
            done = len(scores.scored)  # positions [0, done) have scored their next token
            if done < chunk.start:
                raise RuntimeError(f"request {seq.request_id}: positions {done}..{chunk.start} were not scored")
            first, end = done, min(chunk.start + chunk.num_tokens, seq.num_prompt_tokens - 1)
            if first < end:
                plan.rows += range(offset + first - chunk.start, offset + end - chunk.start)
                plan.targets += seq.token_ids[first + 1 : end + 1]
                plan.counts += [scores.count] * (end - first)
                plan.owners.append((scores, seq, end - first))
        offset += chunk.num_tokens
    return plan


def score(plan: ScoringPlan, hidden: torch.Tensor, compute_logits: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Append each owner's new scores, from ``hidden`` [R, hidden] (the final hidden states of ``plan.rows``):
    the log-softmax of each row's logits at its target and at its most likely tokens; then limit what the
    caches may supply each owner (``PromptScores.limit_reuse``)."""
    targets = upload(plan.targets, hidden.device)  # [R]
    found: list[TokenLogprobs] = []
    for start in range(0, len(plan.rows), SCORING_SLICE_ROWS):
        end = min(start + SCORING_SLICE_ROWS, len(plan.rows))
        logits = compute_logits(hidden[start:end])  # [n, V] fp32
        found += logprobs_of(logits, targets[start:end], list(range(end - start)), plan.counts[start:end])
    taken = 0
    for scores, seq, num_rows in plan.owners:
        scores.scored += found[taken : taken + num_rows]
        scores.limit_reuse(seq)
        taken += num_rows
