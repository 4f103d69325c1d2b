"""The engine on a CUDA device (skipped without one): exact against transformers on the same GPU, bf16 runs."""

from __future__ import annotations

import pytest
import torch

from tests.hf_reference import random_prompts, save_random_model
from workers.engine import LLMEngine
from workers.engine_config import CacheConfig, EngineConfig, SchedulerConfig
from workers.sampling_params import SamplingParams

pytestmark = pytest.mark.gpu


def hf_greedy_cuda(model_dir, prompts, max_new_tokens):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).cuda().eval()
    outputs = []
    for prompt in prompts:
        ids = torch.tensor([prompt], device="cuda")
        generated = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0
        )
        outputs.append(generated[0, len(prompt):].tolist())
    return outputs


@pytest.mark.parametrize("shape", ["llama3", "qwen2"])
def test_greedy_matches_transformers_on_cuda(shape, tmp_path):
    torch.backends.cuda.matmul.allow_tf32 = False
    model_dir = save_random_model(shape, tmp_path)
    prompts = random_prompts([1, 17, 100, 300], vocab_size=320, seed=1)
    expected = hf_greedy_cuda(model_dir, prompts, 16)
    config = EngineConfig(
        model=str(model_dir), device="cuda", cache=CacheConfig(num_blocks=24),
        scheduler=SchedulerConfig(max_num_batched_tokens=128),
    )
    engine = LLMEngine.from_config(config, progress=False)
    assert [c.token_ids for c in engine.generate(prompts, SamplingParams(max_tokens=16, temperature=0))] == expected


def test_tiny_runs_in_bf16_with_a_memory_fraction():
    config = EngineConfig(model="tiny", device="cuda", dtype="bfloat16", cache=CacheConfig(memory="0.05"))
    engine = LLMEngine.from_config(config, progress=False)
    (done,) = engine.generate(["hello"], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    assert len(done.token_ids) == 8
    assert engine.runner.kv_cache.dtype == torch.bfloat16 and engine.runner.kv_cache.is_cuda


def test_the_nccl_path_runs_tp1_end_to_end(tmp_path):
    import torch.distributed as dist

    model_dir = save_random_model("llama3", tmp_path)
    prompts = random_prompts([1, 40, 200], vocab_size=320, seed=2)
    expected = hf_greedy_cuda(model_dir, prompts, 12)
    config = EngineConfig(model=str(model_dir), device="cuda", cache=CacheConfig(num_blocks=64))
    engine = LLMEngine.from_config(config, progress=False, distributed=True)
    try:
        assert dist.is_initialized() and dist.get_backend() == "nccl" and dist.get_world_size() == 1
        outputs = engine.generate(prompts, SamplingParams(max_tokens=12, temperature=0))
        assert [c.token_ids for c in outputs] == expected
    finally:
        engine.close()
    assert not dist.is_initialized()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_compiled_triton_kernel_matches_the_reference_in_half_precision(dtype):
    """The kernel compiled for the GPU (not interpreted), on a mixed step and a split-K decode step."""
    from tests.integration.test_triton_attention import MIXED, reference, step_inputs
    from workers.attention.base import LayerKVCache
    from workers.attention.triton_backend import paged_attention

    for chunks, splits, window in ((MIXED, None, 0), ([(1, 4000), (1, 700)], 8, 0), (MIXED, None, 33),
                                   ([(1, 4000), (1, 700)], 8, 1000)):  # the last two: a sliding window
        query, cache, meta = step_inputs(chunks, 32, 8, 128, seed=11)
        query, cache = query.to(dtype), LayerKVCache(cache.key.to(dtype), cache.value.to(dtype))
        got = paged_attention(query, cache, meta, 128 ** -0.5, num_splits=splits, window=window).float()
        want = reference(query.float(), LayerKVCache(cache.key.float(), cache.value.float()), meta, 128 ** -0.5,
                         window)
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


def test_long_prompts_on_sdpa_and_the_kernel_generate_what_the_reference_does():
    """Prompts of 1,500 and 2,100 tokens go to SDPA (whole prompts), then the decode steps and a prompt that
    continues a cached one go through the compiled kernel: same greedy tokens as the torch reference (fp32)."""
    prompts = random_prompts([1500, 2100, 300], vocab_size=256, seed=4)
    prompts.append(prompts[1][:1600] + prompts[2][:40])  # a cached prefix of 1,600 tokens, then a new chunk
    outputs = {}
    for backend in ("torch", "triton"):
        config = EngineConfig(model="tiny", device="cuda", attention_backend=backend, cache=CacheConfig(num_blocks=512),
                              scheduler=SchedulerConfig(max_num_batched_tokens=4096))
        engine = LLMEngine.from_config(config, progress=False)
        done = engine.generate(prompts[:3], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
        done += engine.generate(prompts[3:], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
        outputs[backend] = [c.token_ids for c in done]
    assert outputs["triton"] == outputs["torch"]
