"""The attention backend interface and the per-step metadata every backend reads.

One step's batch is a list of sequence chunks, flattened into T tokens. Chunk i owns tokens
``query_start_loc[i]:query_start_loc[i + 1]``; they are the last ``query_len`` positions of a context of
``context_lens[i]`` tokens whose KV lives in the blocks ``block_table[i, :ceil(context_lens[i] / block_size)]``
(``block_size`` tokens each).
A chunk may be a whole prompt, part of one (chunked prefill, cached prefix before it) or one decode token.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple, Protocol

import torch

from workers.uploads import upload


class LayerKVCache(NamedTuple):
    """One layer's strided views into the block-major cache."""

    key: torch.Tensor  # [num_blocks, block_size, kv_heads, head_dim]
    value: torch.Tensor  # [num_blocks, block_size, kv_heads, head_dim]


class DeviceTables(NamedTuple):
    """The per-chunk lists as device tensors, for kernels that index them."""

    block_table: torch.Tensor  # [B, max blocks of a chunk] int32, padded
    query_start: torch.Tensor  # [B + 1] int32 (int64 in a decode graph)
    context_lens: torch.Tensor  # [B] int32 (int64 in a decode graph)


@dataclass(frozen=True)
class AttentionMetadata:
    query_start_loc: list[int]  # [B + 1], host
    context_lens: list[int]  # [B], host
    block_table: torch.Tensor  # [B, max blocks of a chunk] int32, device; a row's entries past its context: any
    slot_blocks: torch.Tensor  # [T] long, device: the block each new token's KV is written to
    slot_offsets: torch.Tensor  # [T] long, device: the offset in that block
    static_tables: DeviceTables | None = None  # a captured decode graph's persistent tables (see decode_graphs)

    @property
    def num_chunks(self) -> int:
        return len(self.context_lens)

    @cached_property
    def max_query_len(self) -> int:
        """The longest chunk's query tokens (1: a decode-only step); computed once per step, read per layer."""
        return max(end - start for start, end in zip(self.query_start_loc, self.query_start_loc[1:]))

    @cached_property
    def device_tables(self) -> DeviceTables:
        """Built on first use and kept for the step: every layer reads the same tables."""
        if self.static_tables is not None:
            return self.static_tables
        device = self.slot_blocks.device
        lists = upload(self.query_start_loc + self.context_lens, device, torch.int32)
        query_start, context_lens = lists.split([self.num_chunks + 1, self.num_chunks])
        return DeviceTables(self.block_table, query_start, context_lens)


class AttentionBackend(Protocol):
    """Writes the step's new K/V into the paged cache, then attends every query over its context: every key
    before it, or with ``window`` > 0 the last ``window`` positions up to its own (a sliding window, as
    transformers masks it: key position > query position - window)."""

    def forward(
        self,
        query: torch.Tensor,  # [T, Hq, D], RoPE applied
        key: torch.Tensor,  # [T, Hkv, D], RoPE applied
        value: torch.Tensor,  # [T, Hkv, D]
        cache: LayerKVCache,
        meta: AttentionMetadata,
        scale: float,
        window: int = 0,
    ) -> torch.Tensor:  # [T, Hq, D]
        ...


def write_kv(cache: LayerKVCache, key: torch.Tensor, value: torch.Tensor, meta: AttentionMetadata) -> None:
    """Scatter the new tokens' K and V ([T, Hkv, D]) into their (block, offset) slots."""
    cache.key[meta.slot_blocks, meta.slot_offsets] = key
    cache.value[meta.slot_blocks, meta.slot_offsets] = value
