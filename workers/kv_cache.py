"""Sizing and allocating the block-major paged KV cache.

Layout ``[num_blocks, num_layers, 2, block_size, kv_heads, head_dim]``: one block of one rank (K and V of every
layer) is one contiguous span, so it moves between tiers in a single copy. Attention reads per-layer views.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workers.engine_config import CacheConfig, EngineConfigError, parse_memory
from workers.model_config import ModelConfig

_CPU_AUTO_BYTES = 2 * 2**30  # CPU 'auto': at most 2 GiB ...
_CPU_AUTO_FRACTION = 0.25  # ... and at most a quarter of available RAM
_CUDA_AUTO_FRACTION = 0.85  # CUDA 'auto': of the memory free after the weights are loaded


@dataclass(frozen=True)
class KVCacheShape:
    num_blocks: int
    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def dims(self) -> tuple[int, ...]:
        return (self.num_blocks, self.num_layers, 2, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def bytes_per_block(self) -> int:
        return bytes_per_block(self.num_layers, self.block_size, self.num_kv_heads, self.head_dim, self.dtype)

    def describe(self) -> str:
        total = self.num_blocks * self.bytes_per_block
        return (
            f"KV cache: {self.num_blocks:,} blocks x {self.block_size} tokens = "
            f"{self.num_blocks * self.block_size:,} tokens, {total / 2**30:.2f} GiB "
            f"({self.bytes_per_block / 2**10:.0f} KiB per block, {self.dtype})"
        )


def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    return num_layers * 2 * block_size * num_kv_heads * head_dim * dtype.itemsize


def plan_kv_cache(
    cache: CacheConfig, model: ModelConfig, dtype: torch.dtype, device: torch.device, kv_heads: int | None = None
) -> KVCacheShape:
    """The pool this rank can afford; ``kv_heads`` is this rank's share (all of the model's by default)."""
    kv_heads = kv_heads or model.num_kv_heads
    per_block = bytes_per_block(model.num_layers, cache.block_size, kv_heads, model.head_dim, dtype)
    num_blocks = cache.num_blocks or _budget_bytes(cache.memory, device) // per_block
    if num_blocks < 1:
        raise EngineConfigError(f"engine.cache.memory: {cache.memory!r} holds no block ({per_block:,} bytes each)")
    return KVCacheShape(num_blocks, model.num_layers, cache.block_size, kv_heads, model.head_dim, dtype)


def allocate_kv_cache(shape: KVCacheShape, device: torch.device) -> torch.Tensor:
    """Uninitialised: every slot is written before attention reads it."""
    return torch.empty(shape.dims, dtype=shape.dtype, device=device)


def _budget_bytes(memory: str, device: torch.device) -> int:
    budget = parse_memory(memory)
    if budget.num_bytes is not None:
        return budget.num_bytes
    free = _free_device_bytes(device)
    if budget.fraction is not None:
        return int(free * budget.fraction)
    if device.type == "cuda":
        return int(free * _CUDA_AUTO_FRACTION)
    return min(_CPU_AUTO_BYTES, int(free * _CPU_AUTO_FRACTION))


def _free_device_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise EngineConfigError("engine.cache.memory: cannot read MemAvailable from /proc/meminfo; give a size")
