"""Building blocks of the Llama family, with weights allocated empty and filled by the loader.

Linear layers take their slice of a tensor-parallel split at load time: ``ColumnParallelLinear`` may merge
several projections (q/k/v, gate/up) into one matrix and fills one part's rows per checkpoint tensor.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from workers.parallel import ParallelContext, Span


class WeightLoadError(ValueError):
    """A checkpoint tensor does not fit the parameter it names."""


def empty_parameter(*shape: int, dtype: torch.dtype, device: torch.device | str) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


def copy_checked(target: torch.Tensor, source: torch.Tensor, name: str) -> None:
    if tuple(target.shape) != tuple(source.shape):
        raise WeightLoadError(f"{name}: checkpoint shape {tuple(source.shape)}, model expects {tuple(target.shape)}")
    target.copy_(source)


class ColumnParallelLinear(nn.Module):
    """y = x Wᵀ + b over the output rows this rank keeps. W stacks several projections (parts: q/k/v or
    gate/up), each sliced on its own; with one rank and full spans it is a plain (merged) linear layer."""

    def __init__(
        self, in_features: int, parts: Sequence[Span], bias: bool, dtype: torch.dtype, device: torch.device | str
    ) -> None:
        super().__init__()
        self.parts = tuple(parts)
        self.part_sizes = tuple(part.size for part in self.parts)
        out_features = sum(self.part_sizes)
        self.weight = empty_parameter(out_features, in_features, dtype=dtype, device=device)
        self.bias = empty_parameter(out_features, dtype=dtype, device=device) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def load(self, param_name: str, part: int, tensor: torch.Tensor, name: str) -> None:
        param = getattr(self, param_name)
        if param is None:
            raise WeightLoadError(f"{name}: the model has no {param_name} here")
        span = self.parts[part]
        offset = sum(self.part_sizes[:part])
        if tensor.shape[0] < span.stop:
            raise WeightLoadError(f"{name}: checkpoint has {tensor.shape[0]} rows, this rank needs {span.stop}")
        copy_checked(param.data[offset : offset + span.size], tensor[span.start : span.stop], name)


class RowParallelLinear(nn.Module):
    """y = all_reduce(x W_localᵀ) + b: this rank keeps the input columns ``in_span`` and adds its partial sum
    to the others'. The bias is added once, after the reduction."""

    def __init__(
        self, in_span: Span, out_features: int, bias: bool, dtype: torch.dtype, device: torch.device | str,
        parallel: ParallelContext,
    ) -> None:
        super().__init__()
        self.in_span = in_span
        self.part_sizes = (out_features,)
        self.parallel = parallel
        self.weight = empty_parameter(out_features, in_span.size, dtype=dtype, device=device)
        self.bias = empty_parameter(out_features, dtype=dtype, device=device) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.parallel.world_size == 1:
            return F.linear(x, self.weight, self.bias)
        y = self.parallel.all_reduce(F.linear(x, self.weight))
        return y + self.bias if self.bias is not None else y

    def load(self, param_name: str, part: int, tensor: torch.Tensor, name: str) -> None:
        if param_name == "bias":
            if self.bias is None:
                raise WeightLoadError(f"{name}: the model has no bias here")
            copy_checked(self.bias.data, tensor, name)
            return
        copy_checked(self.weight.data, tensor[:, self.in_span.start : self.in_span.stop], name)


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
