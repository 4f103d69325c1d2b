import hashlib

from workers.model_config import load_model_config
from workers.presets import PRESETS, ensure_preset


def digest(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def test_tiny_is_generated_deterministically(tmp_path):
    first = ensure_preset("tiny", root=tmp_path / "a")
    second = ensure_preset("tiny", root=tmp_path / "b")
    assert digest(first) == digest(second)
    assert sorted(digest(first)) == ["config.json", "model.safetensors", "tokenizer.json"]


def test_tiny_is_a_small_gqa_llama_and_is_reused_once_generated(tmp_path):
    path = ensure_preset("tiny", root=tmp_path)
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    assert ensure_preset("tiny", root=tmp_path) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime
    config = load_model_config(path)
    assert config.num_kv_heads < config.num_heads and config.rope.rope_type == "llama3"
    assert config.vocab_size == PRESETS["tiny"].vocab_size


def test_weights_do_not_depend_on_how_many_threads_draw_them():
    import torch

    from workers.presets import random_weights

    one, many = random_weights(PRESETS["tiny"], threads=1), random_weights(PRESETS["tiny"], threads=4)
    assert list(one) == list(many)
    assert all(torch.equal(one[name], many[name]) for name in one)
    q0, q1 = one["model.layers.0.self_attn.q_proj.weight"], one["model.layers.1.self_attn.q_proj.weight"]
    assert not torch.equal(q0, q1)  # each tensor has a seed of its own
    assert abs(q0.std().item() - PRESETS["tiny"].init_std) < 0.005
