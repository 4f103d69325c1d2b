"""Which batch rows score which prompt tokens (``workers.prompt_logprobs.plan_scoring``), and the router's relay
of the scores (``router.servicer.Relayed``): exact rows, targets and what is sent when."""

from __future__ import annotations

import pytest

from protos.kvtier.v1 import generation_pb2 as pb
from router.servicer import Relayed
from workers.prompt_logprobs import PromptScores, plan_scoring
from workers.sampler import TokenLogprobs
from workers.sampling_params import SamplingParams
from workers.scheduler import ScheduledChunk
from workers.sequence import Sequence


def sequence(request_id: str, prompt: list[int], generated: int = 0) -> Sequence:
    return Sequence(request_id, prompt + [99] * generated, len(prompt), SamplingParams())


def scored(count: int) -> PromptScores:
    return PromptScores(1, [TokenLogprobs(0, -1.0, ())] * count)


def test_a_chunk_scores_the_next_token_of_each_position_before_the_last_and_decodes_score_nothing():
    first = sequence("a", [10, 11, 12, 13, 14, 15])  # positions 0..3 this step: tokens 11..14
    second = sequence("b", [20, 21, 22])  # positions 0..2, all of it: tokens 21, 22 (position 2 samples)
    decoding = sequence("c", [30, 31], generated=1)
    scores = {"a": PromptScores(2), "b": PromptScores(0), "c": None}
    chunks = [ScheduledChunk(first, 0, 4, False), ScheduledChunk(decoding, 2, 1, True),
              ScheduledChunk(second, 0, 3, True)]
    plan = plan_scoring(chunks, lambda seq: scores[seq.request_id])
    assert plan.rows == [0, 1, 2, 3, 5, 6]  # batch rows: a at 0..3, c at 4, b at 5..7
    assert plan.targets == [11, 12, 13, 14, 21, 22]
    assert plan.counts == [2, 2, 2, 2, 0, 0]
    assert [(owner.count, seq.request_id, rows) for owner, seq, rows in plan.owners] == [(2, "a", 4), (0, "b", 2)]


def test_a_chunk_computed_again_scores_only_what_was_not_scored_and_a_gap_is_an_error():
    seq = sequence("a", list(range(40, 80)))
    plan = plan_scoring([ScheduledChunk(seq, 16, 24, True)], lambda _: scored(20))  # positions 16..39: 20..38
    assert plan.rows == list(range(4, 23)) and plan.targets == list(range(61, 80))
    assert plan_scoring([ScheduledChunk(seq, 16, 4, False)], lambda _: scored(20)).rows == []  # all scored
    with pytest.raises(RuntimeError, match="positions 10..16 were not scored"):
        plan_scoring([ScheduledChunk(seq, 16, 8, False)], lambda _: scored(10))


def test_the_reuse_limit_follows_the_scores_until_all_are_in():
    seq = sequence("a", list(range(40, 80)))
    scores = scored(20)
    scores.limit_reuse(seq)
    assert seq.reusable_tokens_limit == 20
    scores.scored += scored(19).scored
    scores.limit_reuse(seq)
    assert seq.reusable_tokens_limit is None


def piece(start: int) -> pb.GenerateResponse:
    return pb.GenerateResponse(prompt_logprobs=pb.PromptLogprobs(start=start))


def test_the_router_holds_the_prompt_logprobs_until_the_first_delta_and_forgets_them_with_a_failed_worker():
    relayed = Relayed()
    assert relayed.take(piece(1)) == [] and relayed.take(piece(1025)) == []
    relayed.new_worker()  # the worker failed: the next one sends every piece again
    assert relayed.take(piece(1)) == [] and not relayed.prompt_logprobs_sent
    delta = pb.GenerateResponse(delta=pb.Delta(token_ids=[5, 6]))
    assert relayed.take(delta) == [piece(1), delta]
    assert relayed.prompt_logprobs_sent and relayed.streamed == [5, 6] and relayed.first_token_at is not None
    final = pb.GenerateResponse(final=pb.Final())
    assert relayed.take(final) == [final]
