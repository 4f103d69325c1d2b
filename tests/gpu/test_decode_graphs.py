"""Decode steps on captured CUDA graphs (skipped without CUDA): the same tokens as eager steps, graphs really
replayed, and no host synchronisation in a replayed step."""

from __future__ import annotations

import pytest

from kvstore.config import CpuTierConfig, KVStoreConfig
from tests.gpu.sync import no_host_sync
from tests.hf_reference import random_prompts, save_random_model
from workers.engine import LLMEngine
from workers.engine_config import CacheConfig, EngineConfig
from workers.runner import build_host_batch
from workers.sampling_params import SamplingParams

pytestmark = pytest.mark.gpu
NO_TIERS = KVStoreConfig(cpu=CpuTierConfig(enabled=False))


def engine_for(model_dir, graphs: str, dtype: str = "float32") -> LLMEngine:
    """``graphs``: "off" (plain steps), "eager" (the padded static inputs, run eagerly) or "captured"."""
    config = EngineConfig(model=str(model_dir), device="cuda", dtype=dtype, attention_backend="triton",
                          cuda_graphs=graphs == "captured", cuda_graph_max_batch=8, max_model_len=1024,
                          cache=CacheConfig(num_blocks=256))
    engine = LLMEngine.from_config(config, NO_TIERS, progress=False)
    if graphs == "eager":
        engine.runner.enable_decode_graphs(8, 1024, with_logits=True, capture=False)
    return engine


def generate(engine: LLMEngine, prompts: list[list[int]]) -> list[list[int]]:
    params = [SamplingParams(max_tokens=4 + 3 * i, temperature=0, ignore_eos=True) for i in range(len(prompts))]
    return [c.token_ids for c in engine.generate(prompts, params)]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_graph_replays_generate_what_the_same_steps_run_eagerly_do(tmp_path, dtype):
    """Same kernels, shapes and split-K: bit for bit the same, so the tokens match in bf16 too. Batches of 10
    (too big for a graph), then 8, 4, 2 and 1 as requests end."""
    model_dir = save_random_model("llama3", tmp_path)
    prompts = random_prompts([1, 17, 100, 300, 5, 64, 33, 250, 12, 90], vocab_size=320, seed=4)
    expected = generate(engine_for(model_dir, "eager", dtype), prompts)
    engine = engine_for(model_dir, "captured", dtype)
    graphs = engine.runner.decode_graphs
    assert sorted(graphs._graphs) == [1, 2, 4, 8]
    assert generate(engine, prompts) == expected
    assert all(graphs.steps_by_bucket[size] > 0 for size in (1, 2, 4, 8))


def test_graph_replays_in_fp32_generate_what_plain_steps_do(tmp_path):
    model_dir = save_random_model("qwen2", tmp_path)
    prompts = random_prompts([3, 40, 200, 7, 120], vocab_size=320, seed=6)
    assert generate(engine_for(model_dir, "captured"), prompts) == generate(engine_for(model_dir, "off"), prompts)


def test_logprobs_on_graph_replays_are_those_of_eager_steps(tmp_path):
    """The logits a replay leaves in its static buffer give the same log-probabilities as an eager step's."""
    model_dir = save_random_model("llama3", tmp_path)
    prompts = random_prompts([9, 60, 130], vocab_size=320, seed=7)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=4)
    eager, captured = (engine_for(model_dir, graphs).generate(prompts, params) for graphs in ("eager", "captured"))
    for plain, replayed in zip(eager, captured):
        assert replayed.token_ids == plain.token_ids and replayed.logprobs == plain.logprobs


def test_a_replayed_decode_step_does_not_synchronise_the_host(tmp_path):
    model_dir = save_random_model("llama3", tmp_path)
    engine = engine_for(model_dir, "captured")
    for prompt in random_prompts([30, 70, 5], vocab_size=320, seed=5):
        engine.add_request(f"r{len(prompt)}", prompt, SamplingParams(max_tokens=50, temperature=0))
    while engine.stats.generated_tokens < 3:
        engine.step()  # prefill: every sequence has its first token
    plan = engine.scheduler.schedule()
    batch = build_host_batch(plan.chunks, engine.cache_shape.block_size, engine.runner.table_rows)
    assert engine.runner.decode_graphs.fits(batch)
    logits = no_host_sync(lambda: engine.runner.run(batch, with_logits=True))
    assert logits.shape == (3, engine.model_config.vocab_size)
