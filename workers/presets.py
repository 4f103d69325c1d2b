"""Built-in random-weight models, generated deterministically from a seed into a local cache directory.

Nothing is downloaded: ``tiny`` (the default) is a small Llama-3-style model with GQA and a byte-level
tokenizer; the ``*-shape`` presets have the shapes of real models for benchmarks. A preset's directory is a
normal Hugging Face-format model directory (``config.json``, ``model.safetensors``, ``tokenizer.json``), named
by a digest of its spec, and written atomically (temporary directory, then rename).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

log = logging.getLogger(__name__)

GENERATOR_VERSION = 2  # bump when generation changes, so cached directories are not reused
BYTE_VOCAB = 256
BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"
BOS_ID, EOS_ID, PAD_ID = BYTE_VOCAB, BYTE_VOCAB + 1, BYTE_VOCAB + 2


@dataclass(frozen=True)
class PresetSpec:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    max_position_embeddings: int
    tie_word_embeddings: bool
    dtype: str
    seed: int
    init_std: float = 0.02


PRESETS = {
    "tiny": PresetSpec(
        vocab_size=BYTE_VOCAB + 3, hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4,
        num_kv_heads=2, max_position_embeddings=4096, tie_word_embeddings=False, dtype="float32", seed=0,
        init_std=0.05,
    ),
    "small": PresetSpec(  # about 50M parameters: long-prompt benchmarks on a CPU
        vocab_size=BYTE_VOCAB + 3, hidden_size=512, intermediate_size=1408, num_layers=8, num_heads=8,
        num_kv_heads=4, max_position_embeddings=16384, tie_word_embeddings=False, dtype="float32", seed=0,
    ),
    "llama3-1b-shape": PresetSpec(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32, num_kv_heads=8,
        max_position_embeddings=131072, tie_word_embeddings=True, dtype="bfloat16", seed=0,
    ),
    "llama3-8b-shape": PresetSpec(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
        max_position_embeddings=131072, tie_word_embeddings=False, dtype="bfloat16", seed=0,
    ),
}


def cache_root() -> Path:
    return Path(os.environ.get("KVTIER_CACHE_DIR", Path.home() / ".cache" / "kvtier"))


def resolve_model_dir(model: str) -> Path:
    """A preset name (generated on first use) or an existing Hugging Face-format directory."""
    if model in PRESETS:
        return ensure_preset(model)
    path = Path(model).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"model: {model!r} is neither a built-in preset ({', '.join(PRESETS)}) nor a directory")
    return path


def ensure_preset(name: str, root: Path | None = None) -> Path:
    spec = PRESETS[name]
    digest = hashlib.sha256(json.dumps([GENERATOR_VERSION, asdict(spec)], sort_keys=True).encode()).hexdigest()
    target = (root or cache_root()) / "models" / f"{name}-{digest[:12]}"
    if (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("generating the built-in model %r into %s (seed %d)", name, target, spec.seed)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        write_preset(spec, staging)
        os.replace(staging, target)
    except OSError:
        if not (target / "model.safetensors").is_file():  # not a lost race with another process
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def write_preset(spec: PresetSpec, directory: Path) -> None:
    from safetensors.torch import save_file  # torch only when generating: the router resolves paths without it

    (directory / "config.json").write_text(json.dumps(hf_config(spec), indent=2, sort_keys=True))
    save_file(random_weights(spec), str(directory / "model.safetensors"), metadata={"format": "pt"})
    byte_level_tokenizer().save(str(directory / "tokenizer.json"))


def hf_config(spec: PresetSpec) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "head_dim": spec.hidden_size // spec.num_heads,
        "hidden_act": "silu",
        "max_position_embeddings": spec.max_position_embeddings,
        "rms_norm_eps": 1e-5,
        "rope_parameters": {
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
        },
        "tie_word_embeddings": spec.tie_word_embeddings,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
        "dtype": spec.dtype,
    }


def random_weights(spec: PresetSpec, threads: int | None = None) -> dict:
    """Normal(0, init_std) matrices and unit norms. Each tensor is drawn from its own generator, seeded by the
    preset's seed and the tensor's name, so the weights do not depend on the order of drawing or on how many
    threads draw them; the threads share the work (an 8B shape is 8e9 normal draws)."""
    import torch

    dtype = getattr(torch, spec.dtype)
    shapes = weight_shapes(spec)

    def draw(name: str):
        return _draw(shapes[name], spec.init_std, tensor_seed(spec.seed, name)).to(dtype)

    with ThreadPoolExecutor(max_workers=threads or os.cpu_count() or 1) as pool:
        return dict(zip(shapes, pool.map(draw, shapes)))


def weight_shapes(spec: PresetSpec) -> dict[str, tuple[int, ...]]:
    """Every checkpoint tensor's name and shape, in checkpoint order."""
    head_dim = spec.hidden_size // spec.num_heads
    shapes = {"model.embed_tokens.weight": (spec.vocab_size, spec.hidden_size)}
    for i in range(spec.num_layers):
        prefix = f"model.layers.{i}"
        shapes[f"{prefix}.self_attn.q_proj.weight"] = (spec.num_heads * head_dim, spec.hidden_size)
        shapes[f"{prefix}.self_attn.k_proj.weight"] = (spec.num_kv_heads * head_dim, spec.hidden_size)
        shapes[f"{prefix}.self_attn.v_proj.weight"] = (spec.num_kv_heads * head_dim, spec.hidden_size)
        shapes[f"{prefix}.self_attn.o_proj.weight"] = (spec.hidden_size, spec.num_heads * head_dim)
        shapes[f"{prefix}.mlp.gate_proj.weight"] = (spec.intermediate_size, spec.hidden_size)
        shapes[f"{prefix}.mlp.up_proj.weight"] = (spec.intermediate_size, spec.hidden_size)
        shapes[f"{prefix}.mlp.down_proj.weight"] = (spec.hidden_size, spec.intermediate_size)
        shapes[f"{prefix}.input_layernorm.weight"] = (spec.hidden_size,)
        shapes[f"{prefix}.post_attention_layernorm.weight"] = (spec.hidden_size,)
    shapes["model.norm.weight"] = (spec.hidden_size,)
    if not spec.tie_word_embeddings:
        shapes["lm_head.weight"] = (spec.vocab_size, spec.hidden_size)
    return shapes


def tensor_seed(seed: int, name: str) -> int:
    """A 63-bit seed for one tensor: SHA-256 over the preset's seed and the tensor's name."""
    digest = hashlib.sha256(f"{seed}\0{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _draw(shape: tuple[int, ...], std: float, seed: int):
    import torch

    if len(shape) == 1:
        return torch.ones(shape)
    return torch.empty(shape).normal_(0.0, std, generator=torch.Generator().manual_seed(seed))


def byte_level_tokenizer() -> Tokenizer:
    """256 byte tokens (ids 0-255, in byte order) plus BOS, EOS and PAD; BOS is prepended on encode."""
    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {char: byte for byte, char in enumerate(_bytes_to_unicode())}
    assert set(vocab) == set(byte_chars)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([BOS_TOKEN, EOS_TOKEN, PAD_TOKEN])
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", special_tokens=[(BOS_TOKEN, BOS_ID)]
    )
    return tokenizer


def _bytes_to_unicode() -> list[str]:
    """The printable character GPT-2's byte-level scheme uses for each byte value 0..255."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + extra)
            extra += 1
    return [chars[byte] for byte in range(256)]


def main(argv: list[str] | None = None) -> int:
    """``python -m workers.presets NAME...``: generate presets ahead of their first use; prints each directory."""
    import argparse
    import sys
    import time

    parser = argparse.ArgumentParser(prog="python -m workers.presets", description=main.__doc__)
    parser.add_argument("names", nargs="+", choices=sorted(PRESETS), metavar="NAME", help=", ".join(PRESETS))
    args = parser.parse_args(argv)
    for name in args.names:
        began = time.perf_counter()
        path = ensure_preset(name)
        print(f"{name}: {path} ({time.perf_counter() - began:.1f} s)", file=sys.stderr, flush=True)
        print(path, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
