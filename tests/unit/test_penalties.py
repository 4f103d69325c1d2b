"""``workers.penalties`` on random logits against transformers' repetition penalty processor and the OpenAI
presence/frequency reference (``tests.hf_reference.OpenAIPenalties``): bit for bit, negative logits included."""

from __future__ import annotations

import torch

from tests.hf_reference import OpenAIPenalties
from workers.penalties import PenaltyState, penalized
from workers.sampling_params import SamplingParams


def test_penalized_rows_equal_transformers_processors_and_other_rows_are_untouched():
    from transformers import RepetitionPenaltyLogitsProcessor

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=generator) * 4  # [S, V], about half negative
    prompt, output = [3, 7, 7, 11, 42], [7, 19, 19, 19, 0]
    tokens = prompt + output
    params = SamplingParams(repetition_penalty=1.7, presence_penalty=0.6, frequency_penalty=-0.4)
    state = PenaltyState(tokens, len(output), 50, torch.device("cpu"))
    got = penalized(logits, [1], [params], [state])
    ids = torch.tensor([tokens])
    want = RepetitionPenaltyLogitsProcessor(1.7)(ids, logits[1:2].clone())
    want = OpenAIPenalties(0.6, -0.4, len(prompt))(ids, want)
    assert torch.equal(got[1], want[0])
    assert torch.equal(got[0], logits[0]) and torch.equal(got[2], logits[2])
    assert (logits[1, tokens] < 0).any() and (logits[1, tokens] > 0).any()  # both branches are taken


def test_a_sampled_token_is_counted_on_the_device():
    state = PenaltyState([1, 2], 0, 8, torch.device("cpu"))
    state.add(torch.tensor(5))
    state.add(torch.tensor(5))
    assert state.seen.nonzero().flatten().tolist() == [1, 2, 5]
    assert state.counts.tolist() == [0, 0, 0, 0, 0, 2.0, 0, 0]
