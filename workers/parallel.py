"""Tensor parallelism: which slice of heads and features each rank holds, and the one collective the model uses.

With ``world_size`` ranks, rank r holds query heads ``[r*Hq/tp, (r+1)*Hq/tp)``, the matching KV heads
(``Hkv/tp`` of them, or, when tp exceeds Hkv, one KV head shared by ``tp/Hkv`` ranks), and ``1/tp`` of the MLP's
intermediate features. Column-parallel layers (QKV, gate/up) keep those output rows; row-parallel layers (O,
down) keep those input columns and sum partial outputs with one all-reduce.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from workers.model_config import ModelConfig


class TensorParallelError(RuntimeError):
    """The tensor-parallel group cannot run: a bad degree for this model, or a rank that died or timed out."""


@dataclass(frozen=True)
class Span:
    """``size`` consecutive rows (or columns) starting at ``start``, in the checkpoint's numbering."""

    start: int
    size: int

    @property
    def stop(self) -> int:
        return self.start + self.size


@dataclass(frozen=True)
class ParallelContext:
    rank: int = 0
    world_size: int = 1

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(tensor)
        return tensor

    def even_span(self, total: int) -> Span:
        """This rank's equal share of ``total`` (which tp divides)."""
        size = total // self.world_size
        return Span(self.rank * size, size)

    def q_heads(self, model: ModelConfig) -> Span:
        return self.even_span(model.num_heads)

    def kv_heads(self, model: ModelConfig) -> Span:
        if model.num_kv_heads >= self.world_size:
            return self.even_span(model.num_kv_heads)
        replicas = self.world_size // model.num_kv_heads
        return Span(self.rank // replicas, 1)


def check_parallel_degree(model: ModelConfig, world_size: int) -> None:
    """Raise ``TensorParallelError`` naming the config key when ``world_size`` cannot split ``model``."""
    key = "engine.tensor_parallel_size"
    if world_size < 1:
        raise TensorParallelError(f"{key}: must be >= 1, got {world_size}")
    if model.num_heads % world_size:
        raise TensorParallelError(f"{key}: {world_size} does not divide the {model.num_heads} attention heads")
    if model.num_kv_heads % world_size and world_size % model.num_kv_heads:
        raise TensorParallelError(
            f"{key}: {world_size} neither divides nor is a multiple of the {model.num_kv_heads} KV heads"
        )
    if model.intermediate_size % world_size:
        raise TensorParallelError(f"{key}: {world_size} does not divide intermediate_size {model.intermediate_size}")
