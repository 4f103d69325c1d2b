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
