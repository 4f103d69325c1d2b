"""Building blocks of the Llama family, with weights allocated empty and filled by the loader.

``Linear`` may merge several projections (q/k/v, gate/up) into one matrix; ``load`` fills one part's rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class WeightLoadError(ValueError):
    """A checkpoint tensor does not fit the parameter it names."""


def empty_parameter(*shape: int, dtype: torch.dtype, device: torch.device | str) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


def copy_checked(target: torch.Tensor, source: torch.Tensor, name: str) -> None:
    if tuple(target.shape) != tuple(source.shape):
        raise WeightLoadError(f"{name}: checkpoint shape {tuple(source.shape)}, model expects {tuple(target.shape)}")
    target.copy_(source)


class Linear(nn.Module):
    """y = x Wᵀ + b where W stacks the parts named by ``part_sizes`` (output rows of each projection)."""

    def __init__(
        self, in_features: int, part_sizes: Sequence[int], bias: bool, dtype: torch.dtype, device: torch.device | str
    ) -> None:
        super().__init__()
        self.part_sizes = tuple(part_sizes)
        out_features = sum(self.part_sizes)
        self.weight = empty_parameter(out_features, in_features, dtype=dtype, device=device)
        self.bias = empty_parameter(out_features, dtype=dtype, device=device) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def load(self, param_name: str, part: int, tensor: torch.Tensor, name: str) -> None:
        param = getattr(self, param_name)
        if param is None:
            raise WeightLoadError(f"{name}: the model has no {param_name} here")
        start = sum(self.part_sizes[:part])
        copy_checked(param.data[start : start + self.part_sizes[part]], tensor, name)


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in fp32, in the same op order as transformers."""

    def __init__(self, size: int, eps: float, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        self.weight = empty_parameter(size, dtype=dtype, device=device)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input_dtype = x.dtype
        x = x.to(torch.float32)
        variance = x.pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        return self.weight * x.to(input_dtype)


class Embedding(nn.Module):
    def __init__(self, num_embeddings: int, dim: int, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        self.weight = empty_parameter(num_embeddings, dim, dtype=dtype, device=device)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(token_ids, self.weight)
