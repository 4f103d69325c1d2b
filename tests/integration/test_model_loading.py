"""Loading checkpoints: errors that name the tensor, dtypes, and the KV pool that a budget buys."""

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from workers.engine import LLMEngine
from workers.engine_config import CacheConfig, EngineConfig
from workers.layers import WeightLoadError
from workers.presets import ensure_preset
from workers.sampling_params import SamplingParams


@pytest.fixture
def tiny_copy(tmp_path):
    target = tmp_path / "tiny"
    shutil.copytree(ensure_preset("tiny"), target)
    return target


def rewrite_weights(model_dir, edit):
    tensors = load_file(model_dir / "model.safetensors")
    edit(tensors)
    save_file(tensors, model_dir / "model.safetensors")


def test_a_missing_tensor_is_named(tiny_copy):
    rewrite_weights(tiny_copy, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(WeightLoadError, match=r"model\.layers\.1\.self_attn\.qkv_proj\.weight\[1\]"):
        LLMEngine.from_config(EngineConfig(model=str(tiny_copy)), progress=False)


def test_a_misshapen_tensor_is_named(tiny_copy):
    def shrink(tensors):
        tensors["model.layers.0.mlp.down_proj.weight"] = tensors["model.layers.0.mlp.down_proj.weight"][:, :10].contiguous()

    rewrite_weights(tiny_copy, shrink)
    with pytest.raises(WeightLoadError, match=r"model\.layers\.0\.mlp\.down_proj\.weight: checkpoint shape"):
        LLMEngine.from_config(EngineConfig(model=str(tiny_copy)), progress=False)


def test_an_unknown_tensor_is_named(tiny_copy):
    rewrite_weights(tiny_copy, lambda t: t.update({"model.layers.0.mystery.weight": torch.zeros(2)}))
    with pytest.raises(WeightLoadError, match="model.layers.0.mystery.weight: no such parameter"):
        LLMEngine.from_config(EngineConfig(model=str(tiny_copy)), progress=False)


def test_an_unknown_model_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="neither a built-in preset"):
        LLMEngine.from_config(EngineConfig(model="/no/such/model"), progress=False)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_runs_on_cpu(dtype):
    engine = LLMEngine.from_config(EngineConfig(model="tiny", dtype=dtype, cache=CacheConfig(num_blocks=64)),
                                   progress=False)
    assert engine.runner.kv_cache.dtype == getattr(torch, dtype)
    (done,) = engine.generate(["hello"], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    assert len(done.token_ids) == 6


def test_the_pool_is_sized_from_a_byte_budget():
    engine = LLMEngine.from_config(EngineConfig(model="tiny", cache=CacheConfig(memory="1MiB")), progress=False)
    # tiny: 4 layers x 2 (K, V) x 16 tokens x 2 KV heads x 32 dims x 4 bytes = 32 KiB per block
    assert engine.cache_shape.bytes_per_block == 32 * 1024
    assert engine.block_pool.num_blocks == 32
    assert tuple(engine.runner.kv_cache.shape) == (32, 4, 2, 16, 2, 32)
    assert "32 blocks x 16 tokens = 512 tokens" in engine.cache_shape.describe()
