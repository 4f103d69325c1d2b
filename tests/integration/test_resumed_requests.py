"""A request resumed after n of its tokens (``SamplingParams.resumed_tokens``: the router's migration off a dead
worker, or a client resuming a broken stream) goes on exactly as the unbroken run: the same tokens, seeded
draws included, and the same text, with stop strings found across the break and nothing held back lost."""

from __future__ import annotations

from dataclasses import replace

import pytest

from workers.engine import LLMEngine
from workers.engine_config import CacheConfig, EngineConfig
from workers.sampling_params import SamplingParams
from workers.sequence import FinishReason
from workers.validation import InvalidRequestError

PROMPT = "Resume me exactly where I broke off"
SEEDED = SamplingParams(max_tokens=40, temperature=0.9, top_p=0.95, seed=2024, ignore_eos=True)


@pytest.fixture(scope="module")
def engine() -> LLMEngine:
    return LLMEngine.from_config(EngineConfig(model="tiny", cache=CacheConfig(num_blocks=256)), progress=False)


def streamed(engine: LLMEngine, prompt, params: SamplingParams, name: str) -> list[tuple[int, str]]:
    """Each step's (token, text released with it), then the final output's finish reason as the last item."""
    engine.add_request(name, prompt, params)
    events = []
    while engine.has_unfinished():
        for output in engine.step():
            events.append((output.new_token_ids[0] if output.new_token_ids else None, output.new_text))
            if output.finished:
                events.append(output.finish_reason)
    return events


def resumed_after(engine: LLMEngine, unbroken: list, params: SamplingParams, n: int, name: str) -> list:
    """The run resumed after the unbroken run's first ``n`` tokens, as the router resubmits it."""
    prompt = engine.tokenizer.encode(PROMPT) + [token for token, _ in unbroken[:n]]
    return streamed(engine, prompt, replace(params, max_tokens=params.max_tokens - n, resumed_tokens=n), name)


def test_a_seeded_request_resumed_after_any_token_draws_what_the_unbroken_run_drew(engine):
    unbroken = streamed(engine, PROMPT, SEEDED, "whole")
    for n in (1, 9, 39):
        assert unbroken[n:] == resumed_after(engine, unbroken, SEEDED, n, f"after-{n}"), n
    reseeded = streamed(engine, PROMPT, replace(SEEDED, seed=2025), "other-seed")
    assert [token for token, _ in reseeded[:-1]] != [token for token, _ in unbroken[:-1]]


def test_a_penalized_request_resumed_after_any_token_counts_the_resumed_tokens_as_its_output(engine):
    """Presence and frequency penalties count output tokens: the resumed run counts those it was resumed with."""
    penalized = replace(SEEDED, presence_penalty=2.0, frequency_penalty=2.0, repetition_penalty=1.5)
    unbroken = streamed(engine, PROMPT, penalized, "penalized")
    assert unbroken != streamed(engine, PROMPT, SEEDED, "unpenalized")
    for n in (1, 9, 39):
        assert unbroken[n:] == resumed_after(engine, unbroken, penalized, n, f"penalized-after-{n}"), n


def test_a_stop_string_across_the_break_is_found_and_no_held_back_text_is_lost(engine):
    greedy = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    text = "".join(piece for _, piece in streamed(engine, PROMPT, greedy, "probe")[:-1])
    stop = next(text[i : i + 3] for i in range(10, len(text) - 3) if text[i : i + 3].isprintable()
                and text.find(text[i : i + 3]) == i)  # three characters first seen past the tenth
    params = replace(greedy, stop=(stop,))
    unbroken = streamed(engine, PROMPT, params, "whole-stop")
    assert unbroken[-1] == FinishReason.STOP and stop not in "".join(piece for _, piece in unbroken[:-1])
    for n in range(1, len(unbroken) - 2):  # every break before the stop's last token
        resumed = resumed_after(engine, unbroken, params, n, f"stop-after-{n}")
        assert resumed == unbroken[n:], n  # the same tokens, text pieces and finish


def test_a_stop_string_before_min_tokens_is_text_in_the_resumed_tokens_too(engine):
    """The output's first three characters are a stop string, but min_tokens is 10: the unbroken run goes on
    past them, and so does a run resumed after 7 tokens (not refused for the stop string its tokens hold)."""
    greedy = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    text = "".join(piece for _, piece in streamed(engine, PROMPT, greedy, "min-probe")[:-1])
    params = replace(greedy, stop=(text[:3],), min_tokens=10)
    unbroken = streamed(engine, PROMPT, params, "min-whole")
    assert len(unbroken) - 1 >= 10 and "".join(piece for _, piece in unbroken[:-1]).startswith(text[:3])
    assert resumed_after(engine, unbroken, params, 7, "min-after-7") == unbroken[7:]


def test_resumed_tokens_that_hold_a_stop_string_are_refused_and_the_engine_serves_on(engine):
    prompt = engine.tokenizer.encode("ask") + engine.tokenizer.encode(" STOP here")
    with pytest.raises(InvalidRequestError, match="resumed_tokens: the resumed tokens hold a stop string"):
        engine.add_request("ended", prompt, SamplingParams(stop=("STOP",), resumed_tokens=len(prompt) - 3))
    assert not engine.has_unfinished()
    assert engine.generate(["still here"], SamplingParams(max_tokens=3, temperature=0))[0].finish_reason == "length"
