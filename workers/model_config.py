"""The model's shape, read from a Hugging Face ``config.json``.

Covers the Llama family: Llama 2/3 (with llama3 or linear RoPE scaling), Mistral and Qwen2 (bias on q/k/v).
Pure Python: parsing a config needs no torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvstore.cost_model import PrefillWork

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
SUPPORTED_ACTIVATIONS = ("silu",)


class ModelConfigError(ValueError):
    """config.json describes a model kvtier cannot run; the message names the key."""


@dataclass(frozen=True)
class RopeConfig:
    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    dtype: str
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    attention_windows: tuple[int, ...]  # per layer: the keys a query sees, itself included; 0 is all before it

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def prefill_work(self) -> PrefillWork:
        """The FLOPs of a prompt token and of one query-key pair in this shape (``kvstore.cost_model``)."""
        attention = self.hidden_size * (self.q_size + 2 * self.kv_size) + self.q_size * self.hidden_size
        mlp = 3 * self.hidden_size * self.intermediate_size
        return PrefillWork(per_token=2.0 * self.num_layers * (attention + mlp),
                           per_attended=4.0 * self.num_layers * self.q_size)


def load_model_config(model_dir: Path) -> ModelConfig:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ModelConfigError(f"{path}: no config.json (expected a Hugging Face-format model directory)")
    raw = json.loads(path.read_text())
    generation_path = Path(model_dir) / "generation_config.json"
    generation = json.loads(generation_path.read_text()) if generation_path.is_file() else {}
    return parse_model_config(raw, generation)


def parse_model_config(raw: dict[str, Any], generation: dict[str, Any] | None = None) -> ModelConfig:
    model_type = _require(raw, "model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelConfigError(f"model_type: {model_type!r} is not supported (supported: {SUPPORTED_MODEL_TYPES})")
    activation = raw.get("hidden_act", "silu")
    if activation not in SUPPORTED_ACTIVATIONS:
        raise ModelConfigError(f"hidden_act: {activation!r} is not supported (supported: {SUPPORTED_ACTIVATIONS})")
    num_heads = _require(raw, "num_attention_heads")
    hidden_size = _require(raw, "hidden_size")
    num_kv_heads = raw.get("num_key_value_heads") or num_heads
    if num_heads % num_kv_heads:
        raise ModelConfigError(f"num_key_value_heads: {num_kv_heads} does not divide num_attention_heads {num_heads}")
    attention_bias = bool(raw.get("attention_bias", False))
    return ModelConfig(
        model_type=model_type,
        vocab_size=_require(raw, "vocab_size"),
        hidden_size=hidden_size,
        intermediate_size=_require(raw, "intermediate_size"),
        num_layers=_require(raw, "num_hidden_layers"),
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=raw.get("head_dim") or hidden_size // num_heads,
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
        rope=_parse_rope(raw),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2" or attention_bias,
        o_bias=attention_bias,
        mlp_bias=bool(raw.get("mlp_bias", False)),
        dtype=str(raw.get("dtype") or raw.get("torch_dtype") or "float32"),
        eos_token_ids=_eos_ids(raw, generation or {}),
        bos_token_id=raw.get("bos_token_id"),
        attention_windows=_attention_windows(raw, _require(raw, "num_hidden_layers")),
    )


def _require(raw: dict[str, Any], key: str) -> Any:
    if raw.get(key) is None:
        raise ModelConfigError(f"{key}: missing from config.json")
    return raw[key]


def _parse_rope(raw: dict[str, Any]) -> RopeConfig:
    """Reads both the transformers>=5 form (``rope_parameters``) and the older ``rope_theta`` + ``rope_scaling``."""
    params = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelConfigError(f"rope_parameters.rope_type: {rope_type!r} is not supported ({SUPPORTED_ROPE_TYPES})")
    if rope_type in ("linear", "llama3") and "factor" not in params:
        raise ModelConfigError(f"rope_parameters.factor: required for rope_type {rope_type!r}")
    return RopeConfig(
        theta=theta,
        rope_type=rope_type,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=params.get("original_max_position_embeddings"),
    )


def _eos_ids(raw: dict[str, Any], generation: dict[str, Any]) -> tuple[int, ...]:
    eos = generation.get("eos_token_id", raw.get("eos_token_id"))
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


_DEFAULT_WINDOW = 4096  # transformers' Mistral and Qwen2 configs: a window their config.json does not name


def _attention_windows(raw: dict[str, Any], num_layers: int) -> tuple[int, ...]:
    """Each layer's sliding window as transformers reads the config: Mistral's is on every layer; Qwen2's only
    with ``use_sliding_window``, on the layers ``layer_types`` marks (or from ``max_window_layers`` on)."""
    window = raw.get("sliding_window", _DEFAULT_WINDOW)
    model_type = raw.get("model_type")
    if model_type not in ("mistral", "qwen2") or not window:
        return (0,) * num_layers
    if model_type == "mistral":
        return (int(window),) * num_layers
    if not raw.get("use_sliding_window", False):
        return (0,) * num_layers
    first = int(raw.get("max_window_layers", 0))
    layer_types = raw.get("layer_types") or [
        "sliding_attention" if layer >= first else "full_attention" for layer in range(num_layers)]
    if len(layer_types) != num_layers or set(layer_types) - {"sliding_attention", "full_attention"}:
        raise ModelConfigError(f"layer_types: expected {num_layers} of 'sliding_attention' or 'full_attention', "
                               f"got {layer_types!r}")
    return tuple(int(window) if kind == "sliding_attention" else 0 for kind in layer_types)
