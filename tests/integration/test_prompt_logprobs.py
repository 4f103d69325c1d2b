"""Prompt log-probabilities on the built-in tiny model: a preempted prompt is scored once per token and reuses
its own scored blocks; short prompts; the async stream (exactness against transformers: test_exactness.py)."""

from __future__ import annotations

import asyncio
import random

import pytest

from workers.async_engine import AsyncEngine
from workers.engine import LLMEngine
from workers.engine_config import CacheConfig, EngineConfig, SchedulerConfig
from workers.sampling_params import SamplingParams

SCORING = SamplingParams(max_tokens=3, temperature=0, prompt_logprobs=2)


def tiny_engine(**scheduler) -> LLMEngine:
    config = EngineConfig(model="tiny", cache=CacheConfig(num_blocks=128, block_size=16),
                          scheduler=SchedulerConfig(**scheduler))
    return LLMEngine.from_config(config, progress=False)


def random_prompt(length: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 250) for _ in range(length)]


@pytest.fixture(scope="module")
def engine() -> LLMEngine:
    return tiny_engine()


def same_scores(found, expected, tolerance=1e-5) -> bool:
    return len(found) == len(expected) and all(
        f.token_id == e.token_id and abs(f.logprob - e.logprob) < tolerance
        and [t for t, _ in f.top] == [t for t, _ in e.top] for f, e in zip(found, expected))


def test_a_prompt_preempted_while_scored_is_scored_once_per_token_and_reuses_what_it_scored():
    """A long prompt scored in 50-token chunks is preempted (an urgent request takes the only slot) after two
    chunks; readmitted, it takes the blocks of its first 96 positions from the GPU cache (the 100 it scored end
    inside a block), computes the rest, and its scores are those of an unchunked run without the preemption,
    one per prompt token after the first."""
    prompt = random_prompt(300, seed=3)
    (alone,) = tiny_engine().generate([prompt], SCORING)
    engine = tiny_engine(max_num_batched_tokens=50, max_num_seqs=1)
    engine.add_request("scored", prompt, SCORING, priority=1)
    engine.step(), engine.step()
    hits_before = engine.kv_stats["gpu"].hit_blocks
    engine.add_request("urgent", random_prompt(20, seed=4), SamplingParams(max_tokens=2, temperature=0))
    outputs = {"scored": [], "urgent": []}
    while engine.has_unfinished():
        for output in engine.step():
            outputs[output.request_id].append(output)
    assert engine.stats.priority_preemptions == 1
    assert engine.kv_stats["gpu"].hit_blocks - hits_before == 96 // 16
    scored = [found for output in outputs["scored"] for found in output.prompt_logprobs]
    assert [len(output.prompt_logprobs) for output in outputs["scored"]] == [299, 0, 0]  # with the first token
    assert same_scores(scored, alone.prompt_logprobs)
    assert [t for output in outputs["scored"] for t in output.new_token_ids] == alone.token_ids


def test_a_one_token_prompt_has_no_scores_and_a_scored_prompt_may_generate_one_token(engine):
    one, two = engine.generate([[7], [7, 8]], SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0))
    assert one.prompt_logprobs == [] and len(one.token_ids) == 1
    assert [(found.token_id, found.top) for found in two.prompt_logprobs] == [(8, ())]
    assert two.prompt_logprobs[0].logprob < 0


def test_a_scored_prompt_stores_its_blocks_for_later_requests(engine):
    prompt = random_prompt(100, seed=5)
    engine.generate([prompt], SCORING)
    (later,) = engine.generate([prompt], SamplingParams(max_tokens=1, temperature=0))
    assert later.usage.cached_tokens.gpu == 96


def test_the_async_stream_sends_the_scores_once_with_the_first_token():
    async def stream() -> list:
        engine = AsyncEngine(tiny_engine())
        return [output async for output in engine.generate("r", random_prompt(40, seed=6), SCORING)]

    outputs = asyncio.run(stream())
    assert sum(len(output.prompt_logprobs) for output in outputs) == 39
    assert outputs[0].new_token_ids and len(outputs[0].prompt_logprobs) == 39


def test_the_cli_prints_one_score_per_prompt_position_the_first_null():
    import json
    import subprocess
    import sys
    from pathlib import Path

    kvtier = str(Path(sys.executable).parent / "kvtier")
    done = subprocess.run([kvtier, "generate", "--model", "tiny", "--prompt-token-ids", "5,6,7,8", "--max-tokens", "2",
                           "--temperature", "0", "--prompt-logprobs", "1", "--json", "--quiet"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    assert record["prompt_logprobs"][0] is None and len(record["prompt_logprobs"]) == 4
    assert [found["token_id"] for found in record["prompt_logprobs"][1:]] == [6, 7, 8]
    assert all(len(found["top"]) == 1 and found["logprob"] <= found["top"][0][1]
               for found in record["prompt_logprobs"][1:])
    assert "logprobs" not in record
