"""The engine's section of the kvtier config: frozen dataclasses, checked on construction.

A failed check raises ``ValueError("<field>: <why>")``; ``cluster.config`` prefixes the key path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from kvstore.config import parse_size

class EngineConfigError(ValueError):
    """A setting that is well-formed but cannot work with this model or machine; names the key."""


@dataclass(frozen=True)
class MemoryBudget:
    """Either a fraction of the device's free memory or a number of bytes ("auto" picks per device)."""

    fraction: float | None = None
    num_bytes: int | None = None


def parse_memory(text: str) -> MemoryBudget:
    """``auto``, a fraction in (0, 1] such as ``0.8``, or a size such as ``4GiB``, ``512MiB``, ``1000000``."""
    if text == "auto":
        return MemoryBudget()
    if re.fullmatch(r"\s*[0-9]*\.[0-9]+\s*", str(text)):
        fraction = float(text)
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction {text!r} must be in (0, 1]")
        return MemoryBudget(fraction=fraction)
    try:
        num_bytes = parse_size(text)
    except ValueError:
        raise ValueError(f"{text!r} is not 'auto', a fraction like 0.8, or a size like 4GiB") from None
    if num_bytes < 1:
        raise ValueError(f"size {text!r} must be at least 1 byte")
    return MemoryBudget(num_bytes=num_bytes)


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16  # tokens per KV block
    memory: str = "auto"  # KV pool budget: 'auto', a fraction of free device memory (0.8), or a size (4GiB)
    num_blocks: int | None = None  # exact pool size; overrides memory (tests, benchmarks)

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size: must be a power of two >= 1, got {self.block_size}")
        try:
            parse_memory(self.memory)
        except ValueError as error:
            raise ValueError(f"memory: {error}") from None
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks: must be >= 1, got {self.num_blocks}")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256  # sequences running at once
    max_num_batched_tokens: int = 2048  # tokens per step; longer prompts are prefilled in chunks

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs: must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens: must be >= 1, got {self.max_num_batched_tokens}")


@dataclass(frozen=True)
class EngineConfig:
    model: str = "tiny"  # a built-in preset name or a Hugging Face-format model directory
    dtype: str = "auto"  # auto (the checkpoint's), float32, bfloat16, float16
    device: str = "auto"  # auto (cuda if present, else cpu), cpu, cuda, cuda:N
    max_model_len: int | None = None  # prompt + generated tokens; default: the model's max positions
    attention_backend: str = "torch"  # torch (reference, any device) or triton (paged kernels; CUDA)
    seed: int = 0  # seeds requests that bring no seed of their own, in arrival order
    tensor_parallel_size: int = 1  # ranks that split every layer's heads and KV cache
    collective_timeout_s: float = 60.0  # a rank silent this long takes its tensor-parallel group down
    rank_start_timeout_s: float = 600.0  # how long rank 0 waits for the other ranks' processes to start and join
    cuda_graphs: bool = True  # decode steps replay CUDA graphs (CUDA with the triton backend; else ignored)
    cuda_graph_max_batch: int = 128  # the largest decode batch with a graph; larger ones run eagerly
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16"):
            raise ValueError(f"dtype: {self.dtype!r} is not auto, float32, bfloat16 or float16")
        if not re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", self.device):
            raise ValueError(f"device: {self.device!r} is not auto, cpu, cuda or cuda:N")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len: must be >= 2, got {self.max_model_len}")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size: must be >= 1, got {self.tensor_parallel_size}")
        if self.collective_timeout_s <= 0:
            raise ValueError(f"collective_timeout_s: must be > 0, got {self.collective_timeout_s}")
        if self.rank_start_timeout_s <= 0:
            raise ValueError(f"rank_start_timeout_s: must be > 0, got {self.rank_start_timeout_s}")
        if self.cuda_graph_max_batch < 1:
            raise ValueError(f"cuda_graph_max_batch: must be >= 1, got {self.cuda_graph_max_batch}")
        if self.attention_backend not in ("torch", "triton"):
            raise ValueError(f"attention_backend: {self.attention_backend!r} is unknown (known: torch, triton)")


def engine_config_from_dict(data: dict) -> EngineConfig:
    """Rebuild an ``EngineConfig`` from ``dataclasses.asdict`` output (how tensor-parallel ranks receive it)."""
    values = dict(data)
    values["cache"] = CacheConfig(**values["cache"])
    values["scheduler"] = SchedulerConfig(**values["scheduler"])
    return EngineConfig(**values)
