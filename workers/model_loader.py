"""Build a model from a Hugging Face-format directory, streaming weights in one tensor at a time.

Parameters are allocated empty on the target device; each checkpoint tensor is read (memory-mapped by
safetensors), copied into place and dropped, so no second full copy of the weights ever exists.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from workers.attention import AttentionBackend
from kvstore.hashing import model_fingerprint
from workers.engine_config import EngineConfig, EngineConfigError
from workers.layers import WeightLoadError
from workers.model import LlamaForCausalLM
from workers.model_config import ModelConfig, load_model_config
from workers.parallel import ParallelContext

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
DTYPE_NAMES = tuple(_DTYPES)


def resolve_dtype(name: str, config: ModelConfig) -> torch.dtype:
    """``auto`` takes the checkpoint's dtype; otherwise one of DTYPE_NAMES."""
    key = config.dtype if name == "auto" else name
    if key not in _DTYPES:
        raise EngineConfigError(f"engine.dtype: {key!r} is not supported (supported: auto, {', '.join(DTYPE_NAMES)})")
    return _DTYPES[key]


def load_model(
    model_dir: Path,
    dtype: torch.dtype,
    device: str,
    backend: AttentionBackend,
    progress: bool = True,
    parallel: ParallelContext | None = None,
) -> LlamaForCausalLM:
    """This rank's slice of the model (all of it without ``parallel``)."""
    config = load_model_config(model_dir)
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors weight files")
    model = LlamaForCausalLM(config, backend, dtype, device, parallel)
    loaded: set[str] = set()
    total_bytes = sum(f.stat().st_size for f in files)
    with tqdm(
        total=total_bytes, desc="loading weights", unit="B", unit_scale=True, file=sys.stderr, disable=not progress
    ) as bar:
        for path in files:
            loaded |= _load_file(model, path, bar)
    missing = model.expected_weight_keys() - loaded
    if missing:
        raise WeightLoadError(f"{model_dir}: checkpoint lacks {len(missing)} weights, e.g. {sorted(missing)[:3]}")
    return model.eval()


def _load_file(model: LlamaForCausalLM, path: Path, bar: tqdm) -> set[str]:
    loaded = set()
    with safe_open(str(path), framework="pt", device="cpu") as checkpoint:
        for name in checkpoint.keys():
            tensor = checkpoint.get_tensor(name)
            key = model.load_weight(name, tensor)
            if key is not None:
                loaded.add(key)
            bar.update(tensor.numel() * tensor.element_size())
    return loaded


def weights_identity(model_dir: Path) -> str:
    """A cheap digest of the weight files: names, sizes, safetensors headers and 16 sampled 4 KiB windows.

    Two checkpoints that differ anywhere in their headers or sampled bytes get different identities; reading
    every byte of a large checkpoint at each start would cost seconds per GiB."""
    hasher = hashlib.sha256()
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        size = path.stat().st_size
        hasher.update(f"{path.name}\0{size}\0".encode())
        with open(path, "rb") as weights:
            header_len = int.from_bytes(weights.read(8), "little")
            hasher.update(weights.read(min(header_len, size)))
            for index in range(16):
                weights.seek(size * index // 16)
                hasher.update(weights.read(4096))
    return hasher.hexdigest()


def fingerprint_model(model_dir: Path, model_config: ModelConfig, dtype: torch.dtype, block_size: int) -> str:
    """The namespace of a loaded model in every tier: its config, dtype, block size and weights identity."""
    return model_fingerprint(asdict(model_config), str(dtype), block_size, weights_identity(model_dir))


def model_fingerprint_of(config: EngineConfig) -> str:
    """The same namespace from the config alone, without loading the weights (``kvtier cache flush``)."""
    from workers.presets import resolve_model_dir

    model_dir = resolve_model_dir(config.model)
    model_config = load_model_config(model_dir)
    return fingerprint_model(model_dir, model_config, resolve_dtype(config.dtype, model_config), config.cache.block_size)
