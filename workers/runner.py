"""Runs one scheduled step through the model: host-side batch preparation, forward, logits."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workers.attention import AttentionMetadata
from workers.model import LlamaForCausalLM
from workers.scheduler import ScheduledChunk


@dataclass(frozen=True)
class ModelInputs:
    token_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    sample_indices: torch.Tensor  # [S]: the last token of each chunk that samples


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, kv_cache: torch.Tensor, block_size: int, device: torch.device):
        self.model = model
        self.kv_cache = kv_cache  # [num_blocks, num_layers, 2, block_size, Hkv, D]
        self.block_size = block_size
        self.device = device

    def execute(self, chunks: list[ScheduledChunk]) -> torch.Tensor | None:
        """Compute the chunks' KV into the cache; logits [S, V] fp32 for the chunks that sample, in order."""
        inputs = self.prepare(chunks)
        hidden = self.model(inputs.token_ids, inputs.positions, self.kv_cache, inputs.meta)  # [T, hidden]
        if inputs.sample_indices.numel() == 0:
            return None
        return self.model.compute_logits(hidden[inputs.sample_indices])

    def prepare(self, chunks: list[ScheduledChunk]) -> ModelInputs:
        token_ids: list[int] = []
        positions: list[int] = []
        slot_blocks: list[int] = []
        query_start_loc, context_lens, block_tables, sample_indices = [0], [], [], []
        for chunk in chunks:
            seq, end = chunk.seq, chunk.start + chunk.num_tokens
            span = range(chunk.start, end)
            token_ids += seq.token_ids[chunk.start : end]
            positions += span
            slot_blocks += (seq.block_ids[pos // self.block_size] for pos in span)
            query_start_loc.append(len(token_ids))
            context_lens.append(end)
            block_tables.append(seq.block_ids[: -(-end // self.block_size)])
            if chunk.samples:
                sample_indices.append(len(token_ids) - 1)
        to_device = self._to_device
        position_tensor = to_device(positions)
        meta = AttentionMetadata(
            query_start_loc=query_start_loc,
            context_lens=context_lens,
            block_tables=[to_device(table) for table in block_tables],
            slot_blocks=to_device(slot_blocks),
            slot_offsets=position_tensor % self.block_size,
        )
        return ModelInputs(to_device(token_ids), position_tensor, meta, to_device(sample_indices))

    def _to_device(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long).to(self.device, non_blocking=True)
