"""Runs one scheduled step through the model: host-side batch preparation, forward, logits.

Under tensor parallelism, rank 0's runner broadcasts each step's ``HostBatch`` before running it, and the
other ranks run the same batch over their slice (``run`` without logits). Decode steps that fit a captured
CUDA graph replay it (``workers.decode_graphs``); every rank decides so from the same batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

import torch

from workers.attention import AttentionMetadata
from workers.decode_graphs import DecodeGraphs
from workers.model import LlamaForCausalLM
from workers.scheduler import ScheduledChunk
from workers.step_packet import HostBatch


@dataclass(frozen=True)
class ModelInputs:
    token_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    sample_indices: torch.Tensor  # [S]: the last token of each chunk that samples


T = TypeVar("T")


class StepBroadcaster(Protocol):
    def run_step(self, batch: HostBatch, run: Callable[[], T]) -> T:
        """Send ``batch`` to the other ranks, then ``run`` it here; a lost rank becomes one clear error."""
        ...


def build_host_batch(chunks: list[ScheduledChunk], block_size: int) -> HostBatch:
    batch = HostBatch([], [], [], [0], [], [], [])
    for chunk in chunks:
        seq, end = chunk.seq, chunk.start + chunk.num_tokens
        span = range(chunk.start, end)
        batch.token_ids.extend(seq.token_ids[chunk.start : end])
        batch.positions.extend(span)
        batch.slot_blocks.extend(seq.block_ids[pos // block_size] for pos in span)
        batch.query_start_loc.append(len(batch.token_ids))
        batch.context_lens.append(end)
        batch.block_tables.append(seq.block_ids[: -(-end // block_size)])
        if chunk.samples:
            batch.sample_indices.append(len(batch.token_ids) - 1)
    return batch


class ModelRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_cache: torch.Tensor,
        block_size: int,
        device: torch.device,
        broadcaster: StepBroadcaster | None = None,
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache  # [num_blocks, num_layers, 2, block_size, Hkv_local, D]
        self.block_size = block_size
        self.device = device
        self.broadcaster = broadcaster
        self.decode_graphs: DecodeGraphs | None = None

    def enable_decode_graphs(self, max_batch: int, max_model_len: int, with_logits: bool, capture: bool) -> None:
        """Run decode steps of up to ``max_batch`` sequences on static inputs, captured as CUDA graphs
        (``capture``; every rank of a group at the same point) or eagerly (tests on the CPU)."""
        graphs = DecodeGraphs(self.model, self.kv_cache, self.block_size, max_model_len, max_batch, with_logits)
        if capture:
            graphs.capture()
        self.decode_graphs = graphs

    def execute(self, chunks: list[ScheduledChunk]) -> torch.Tensor | None:
        """Compute the chunks' KV into the cache; logits [S, V] fp32 for the chunks that sample, in order."""
        batch = build_host_batch(chunks, self.block_size)
        if self.broadcaster is None:
            return self.run(batch, with_logits=True)
        return self.broadcaster.run_step(batch, lambda: self.run(batch, with_logits=True))

    def run(self, batch: HostBatch, with_logits: bool) -> torch.Tensor | None:
        if self.decode_graphs is not None and self.decode_graphs.fits(batch):
            logits = self.decode_graphs.run(batch)
            return logits if with_logits else None
        inputs = self.to_inputs(batch)
        hidden = self.model(inputs.token_ids, inputs.positions, self.kv_cache, inputs.meta)  # [T, hidden]
        if not with_logits or inputs.sample_indices.numel() == 0:
            return None
        return self.model.compute_logits(hidden[inputs.sample_indices])

    def to_inputs(self, batch: HostBatch) -> ModelInputs:
        to_device = self._to_device
        positions = to_device(batch.positions)
        meta = AttentionMetadata(
            query_start_loc=batch.query_start_loc,
            context_lens=batch.context_lens,
            block_tables=[to_device(table) for table in batch.block_tables],
            slot_blocks=to_device(batch.slot_blocks),
            slot_offsets=positions % self.block_size,
        )
        return ModelInputs(to_device(batch.token_ids), positions, meta, to_device(batch.sample_indices))

    def _to_device(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long).to(self.device, non_blocking=True)
