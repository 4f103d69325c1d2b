"""Greedy output equals transformers' greedy ``generate`` token for token (fp32, CPU)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.hf_reference import OpenAIPenalties, hf_greedy, hf_log_softmax, random_prompts, save_random_model
from workers.engine import LLMEngine
from workers.engine_config import CacheConfig, EngineConfig, SchedulerConfig
from workers.sampling_params import SamplingParams

PROMPT_LENGTHS = [1, 5, 17, 64, 100, 150, 255, 300]
MAX_TOKENS = 24
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)


@pytest.fixture(scope="module", params=["llama3", "qwen2", "llama2", "mistral", "mistral-window", "qwen2-window"])
def reference(request, tmp_path_factory):
    """(model directory, prompts, transformers' outputs) for one model shape."""
    model_dir = save_random_model(request.param, tmp_path_factory.mktemp(request.param))
    prompts = random_prompts(PROMPT_LENGTHS, vocab_size=320, seed=1)
    expected = hf_greedy(model_dir, prompts, MAX_TOKENS)
    assert len({tuple(tokens) for tokens in expected}) == len(prompts), "degenerate reference: outputs coincide"
    return model_dir, prompts, expected


def engine_for(model_dir: Path, **cache_and_scheduler) -> LLMEngine:
    cache = CacheConfig(**{k: v for k, v in cache_and_scheduler.items() if k in ("num_blocks", "block_size")})
    scheduler = SchedulerConfig(**{k: v for k, v in cache_and_scheduler.items() if k.startswith("max_num")})
    return LLMEngine.from_config(EngineConfig(model=str(model_dir), cache=cache, scheduler=scheduler), progress=False)


def test_batch_submitted_together(reference):
    model_dir, prompts, expected = reference
    engine = engine_for(model_dir)
    assert [c.token_ids for c in engine.generate(prompts, GREEDY)] == expected
    assert engine.block_pool.num_free == engine.block_pool.num_blocks


def test_requests_staggered_across_steps(reference):
    model_dir, prompts, expected = reference
    engine = engine_for(model_dir)
    ids = [f"r{i}" for i in range(len(prompts))]
    engine.add_request(ids[0], prompts[0], GREEDY)
    engine.add_request(ids[5], prompts[5], GREEDY)
    schedule = {2: [1, 6], 5: [2, 3], 9: [4, 7]}  # step number -> requests that join before it
    outputs: dict[str, list[int]] = {rid: [] for rid in ids}
    step = 0
    while engine.has_unfinished() or step <= max(schedule):
        for index in schedule.get(step, []):
            engine.add_request(ids[index], prompts[index], GREEDY)
        for output in engine.step():
            outputs[output.request_id] += output.new_token_ids
        step += 1
    assert [outputs[rid] for rid in ids] == expected


def test_the_same_prompts_again_read_their_cached_blocks_and_give_the_same_tokens(reference):
    """The prefix cache on the exactness models: for the windowed ones a cached prefix is longer than the window."""
    model_dir, prompts, expected = reference
    engine = engine_for(model_dir)
    engine.generate(prompts, GREEDY)
    again = engine.generate(prompts, GREEDY)
    assert [c.token_ids for c in again] == expected
    assert [c.usage.cached_tokens.gpu for c in again] == [(len(p) - 1) // 16 * 16 for p in prompts]


def test_logprobs_are_transformers_log_softmax_at_each_generated_position(reference):
    """Every prompt in one batch, with 5 alternatives per token: the generated token's log-probability and each
    alternative's equal transformers' log-softmax of its logits there, and the alternatives are the 5 best."""
    model_dir, prompts, expected = reference
    completions = engine_for(model_dir).generate(prompts, SamplingParams(max_tokens=6, temperature=0, logprobs=5))
    for prompt, completion, tokens in zip(prompts, completions, expected):
        assert completion.token_ids == tokens[:6] and len(completion.logprobs) == len(completion.token_ids)
        full = prompt + completion.token_ids
        reference_logprobs = hf_log_softmax(model_dir, full[:-1])[len(prompt) - 1 :]  # [generated, vocab]
        for found, row, token in zip(completion.logprobs, reference_logprobs, completion.token_ids):
            assert found.token_id == token
            assert abs(found.logprob - row[token].item()) < 1e-4
            assert [t for t, _ in found.top][0] == token  # greedy: the best token
            values = [value for _, value in found.top]
            assert values == sorted(values, reverse=True) and len(values) == 5
            assert all(abs(value - row[t].item()) < 1e-4 for t, value in found.top)
            assert values[-1] >= row.topk(5).values[-1].item() - 1e-4  # no better token was left out


def test_prompt_logprobs_are_transformers_log_softmax_at_each_prompt_position(reference):
    """Every prompt asks for its prompt's log-probabilities (3 alternatives) in one batch, after the same
    prompts ran (the prefix cache holds them) and with prefill split in chunks: the caches supply none of
    their positions, and each prompt token's score equals transformers' log-softmax at the position before it.
    A request in the same batch that does not ask reads the cache as before."""
    model_dir, prompts, expected = reference
    engine = engine_for(model_dir, max_num_batched_tokens=64, block_size=8)
    engine.generate(prompts, GREEDY)
    scoring = SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=3)
    completions = engine.generate(prompts + [prompts[-1]], [scoring] * len(prompts) + [GREEDY])
    assert completions[-1].usage.cached_tokens.gpu == (len(prompts[-1]) - 1) // 8 * 8
    assert completions[-1].prompt_logprobs == []
    for prompt, completion, tokens in zip(prompts, completions, expected):
        assert completion.token_ids == tokens[:2] and completion.usage.cached_tokens.total == 0
        assert [found.token_id for found in completion.prompt_logprobs] == prompt[1:]
        reference_logprobs = hf_log_softmax(model_dir, prompt)[:-1]  # [P - 1, vocab]: position t - 1 scores token t
        for found, row in zip(completion.prompt_logprobs, reference_logprobs):
            assert abs(found.logprob - row[found.token_id].item()) < 1e-4
            assert [t for t, _ in found.top] == row.topk(3).indices.tolist()
            assert all(abs(value - row[t].item()) < 1e-4 for t, value in found.top)


def test_penalized_greedy_output_is_transformers_with_the_same_penalties(reference):
    """Repetition penalty (transformers' own processor) and presence and frequency penalties (OpenAI's, as a
    processor of the test's), in one batch with chunked prefill: token for token; and they change the output."""
    model_dir, prompts, expected = reference
    penalties = dict(repetition_penalty=1.8, presence_penalty=1.5, frequency_penalty=2.0)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, **penalties)
    got = [c.token_ids for c in engine_for(model_dir, max_num_batched_tokens=64).generate(prompts, params)]
    assert got == hf_greedy(model_dir, prompts, MAX_TOKENS, repetition_penalty=1.8,
                            processors=lambda prompt_len: [OpenAIPenalties(1.5, 2.0, prompt_len)])
    assert got != expected


def test_min_tokens_is_transformers_min_new_tokens(reference):
    """EOS cannot end an output before min_tokens (transformers' MinNewTokensLengthLogitsProcessor); outputs that
    would have ended earlier go on, token for token as transformers'. (Shapes without an EOS id end by length.)"""
    model_dir, prompts, expected = reference
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, min_tokens=16)
    got = [c.token_ids for c in engine_for(model_dir).generate(prompts, params)]
    assert got == hf_greedy(model_dir, prompts, MAX_TOKENS, min_new_tokens=16)
    assert all(len(tokens) >= 16 for tokens in got)


def test_a_pool_small_enough_to_force_preemption(reference):
    model_dir, prompts, expected = reference
    # 384 tokens of KV for 992 prompt tokens; chunked admission lets many sequences start, then they collide
    engine = engine_for(model_dir, num_blocks=24, max_num_batched_tokens=128)
    assert [c.token_ids for c in engine.generate(prompts, GREEDY)] == expected
    assert engine.stats.preemptions > 0
    assert engine.block_pool.num_free == 24


def test_chunked_prefill_splits_long_prompts(reference):
    model_dir, prompts, expected = reference
    budget = 64
    assert max(len(p) for p in prompts) > budget
    engine = engine_for(model_dir, max_num_batched_tokens=budget, block_size=8)
    scheduled = record_chunks(engine)
    assert [c.token_ids for c in engine.generate(prompts, GREEDY)] == expected
    assert any(not c.samples for c in scheduled), "no prompt was split into chunks"  # decode chunks always sample
    assert any(0 < c.start < c.seq.num_prompt_tokens for c in scheduled), "no chunk continued a prompt"


def record_chunks(engine: LLMEngine) -> list:
    scheduled = []
    schedule = engine.scheduler.schedule

    def recording_schedule():
        output = schedule()
        scheduled.extend(output.chunks)
        return output

    engine.scheduler.schedule = recording_schedule
    return scheduled


def test_the_cli_gives_the_same_tokens(reference):
    model_dir, prompts, expected = reference
    command = [str(Path(sys.executable).parent / "kvtier"), "generate", "--model", str(model_dir), "--json", "--quiet"]
    for prompt in prompts:
        command += ["--prompt-token-ids", ",".join(map(str, prompt))]
    command += ["--max-tokens", str(MAX_TOKENS), "--temperature", "0"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["token_ids"] for r in records] == expected
    assert [r["finish_reason"] for r in records] == ["length" if len(e) == MAX_TOKENS else "stop" for e in expected]
    assert [r["usage"]["prompt_tokens"] for r in records] == PROMPT_LENGTHS
    assert [r["usage"]["completion_tokens"] for r in records] == [len(e) for e in expected]
    assert all(r["usage"]["cached_tokens"] == {"gpu": 0, "cpu": 0, "redis": 0} for r in records)
