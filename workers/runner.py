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
from workers.block_table import DeviceBlockTable
from workers.decode_graphs import DecodeGraphs
from workers.model import LlamaForCausalLM
from workers.scheduler import ScheduledChunk
from workers.step_packet import HostBatch
from workers.table_rows import TableRowAllocator
from workers.uploads import upload


@dataclass(frozen=True)
class ModelInputs:
    token_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    sample_indices: torch.Tensor  # [S]: the last token of each chunk that samples


@dataclass(frozen=True)
class StepLogits:
    logits: torch.Tensor | None  # [S, V] fp32: the chunks that sample, in order (None: none samples)
    scored_hidden: torch.Tensor | None = None  # [R, hidden]: the final hidden states of the rows asked to score


T = TypeVar("T")


class StepBroadcaster(Protocol):
    def run_step(self, batch: HostBatch, run: Callable[[], T]) -> T:
        """Send ``batch`` to the other ranks, then ``run`` it here; a lost rank becomes one clear error."""
        ...


def build_host_batch(chunks: list[ScheduledChunk], block_size: int, table_rows: TableRowAllocator) -> HostBatch:
    token_ids, positions, slot_blocks, query_start_loc, context_lens, sample_indices = [], [], [], [0], [], []
    for chunk in chunks:
        seq, end = chunk.seq, chunk.start + chunk.num_tokens
        if chunk.num_tokens == 1:  # a decode token: the common case, kept cheap
            token_ids.append(seq.token_ids[chunk.start])
            positions.append(chunk.start)
            slot_blocks.append(seq.block_ids[chunk.start // block_size])
        else:
            span = range(chunk.start, end)
            token_ids.extend(seq.token_ids[chunk.start : end])
            positions.extend(span)
            slot_blocks.extend(seq.block_ids[pos // block_size] for pos in span)
        query_start_loc.append(len(token_ids))
        context_lens.append(end)
        if chunk.samples:
            sample_indices.append(len(token_ids) - 1)
    rows = table_rows.assign([(c.seq.request_id, c.seq.block_ids, -(-(c.start + c.num_tokens) // block_size))
                              for c in chunks])
    return HostBatch(token_ids, positions, slot_blocks, query_start_loc, context_lens, rows.rows, rows.updates,
                     sample_indices)


class ModelRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_cache: torch.Tensor,
        block_size: int,
        device: torch.device,
        max_num_seqs: int,
        max_model_len: int,
        broadcaster: StepBroadcaster | None = None,
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache  # [num_blocks, num_layers, 2, block_size, Hkv_local, D]
        self.block_size = block_size
        self.device = device
        self.broadcaster = broadcaster
        self.table_rows = TableRowAllocator(max_num_seqs)  # used on rank 0, which builds the batches
        self.block_table = DeviceBlockTable(max_num_seqs, -(-max_model_len // block_size), device)
        self.decode_graphs: DecodeGraphs | None = None

    def enable_decode_graphs(self, max_batch: int, max_model_len: int, with_logits: bool, capture: bool) -> None:
        """Run decode steps of up to ``max_batch`` sequences on static inputs, captured as CUDA graphs
        (``capture``; every rank of a group at the same point) or eagerly (tests on the CPU)."""
        graphs = DecodeGraphs(self.model, self.kv_cache, self.block_table, self.block_size, max_model_len, max_batch,
                              with_logits)
        if capture:
            graphs.capture()
        self.decode_graphs = graphs

    def execute(self, chunks: list[ScheduledChunk], scored_rows: list[int] | None = None) -> StepLogits:
        """Compute the chunks' KV into the cache; logits [S, V] fp32 for the chunks that sample, in order, and
        the final hidden states of the batch's ``scored_rows`` (token indices), for ``workers.prompt_logprobs``."""
        batch = build_host_batch(chunks, self.block_size, self.table_rows)
        if self.broadcaster is None:
            return self._forward(batch, True, scored_rows)
        return self.broadcaster.run_step(batch, lambda: self._forward(batch, True, scored_rows))

    def run(self, batch: HostBatch, with_logits: bool) -> torch.Tensor | None:
        return self._forward(batch, with_logits, None).logits

    def _forward(self, batch: HostBatch, with_logits: bool, scored_rows: list[int] | None) -> StepLogits:
        self.block_table.apply(batch.table_updates)
        if not scored_rows and self.decode_graphs is not None and self.decode_graphs.fits(batch):
            logits = self.decode_graphs.run(batch)
            return StepLogits(logits if with_logits else None)
        inputs = self.to_inputs(batch)
        hidden = self.model(inputs.token_ids, inputs.positions, self.kv_cache, inputs.meta)  # [T, hidden]
        scored = hidden[upload(scored_rows, self.device)] if scored_rows else None  # [R, hidden]
        if not with_logits or inputs.sample_indices.numel() == 0:
            return StepLogits(None, scored)
        return StepLogits(self.model.compute_logits(hidden[inputs.sample_indices]), scored)

    def to_inputs(self, batch: HostBatch) -> ModelInputs:
        """One host-to-device copy of the step's lists, then the block table rows gathered on the device."""
        num_tokens, num_chunks = len(batch.token_ids), len(batch.context_lens)
        values = upload(batch.token_ids + batch.positions + batch.slot_blocks + batch.table_rows
                        + batch.sample_indices, self.device)
        token_ids, positions, slot_blocks, table_rows, sample_indices = values.split(
            [num_tokens, num_tokens, num_tokens, num_chunks, len(batch.sample_indices)])
        width = -(-max(batch.context_lens) // self.block_size)
        meta = AttentionMetadata(
            query_start_loc=batch.query_start_loc,
            context_lens=batch.context_lens,
            block_table=self.block_table.gather(table_rows, width),
            slot_blocks=slot_blocks,
            slot_offsets=positions % self.block_size,
        )
        return ModelInputs(token_ids, positions, meta, sample_indices)
