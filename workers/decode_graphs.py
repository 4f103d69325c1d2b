"""Decode steps replayed from CUDA graphs, one graph per bucketed batch size.

A decode step (every chunk one token, and every chunk samples) of B sequences runs the graph of the smallest
bucket >= B. The graph reads persistent input buffers and writes persistent logits; before a replay the
inputs are rewritten in place with one host-to-device copy from a pinned buffer (six numbers per row), and
the graph itself gathers each row's block table from the runner's persistent table (``workers.block_table``).
Python launches nothing per layer, and the host's work does not grow with the context.

Padding: rows past B repeat row B-1. The same token at the same position writes the same K/V into the same
slot and reads the same context, so padded rows touch no other sequence's blocks and need no scratch block.

Split-K: a graph's kernels are captured for the worst case, every row ``max_model_len`` tokens long (the
metadata's host ``context_lens``); shorter rows leave some splits empty, which the combine step weighs 0.

Invariants:
- capture runs before any request: its warm-up forwards write row 0's K/V (token 0, position 0) into slot 0
  of block 0, which no sequence holds yet;
- the pinned host buffer is rewritten only after the previous step's copy finished (an event says so);
- the logits ``run`` returns are valid until the next ``run``.

With ``capture=False`` (the CPU, tests) the same padded static forward runs eagerly, so the padding and the
static metadata are tested on machines without a GPU; only the capture itself needs CUDA.
"""

from __future__ import annotations

import logging
import time
from typing import NamedTuple

import numpy as np
import torch

from workers.attention import AttentionMetadata
from workers.attention.base import DeviceTables
from workers.block_table import DeviceBlockTable
from workers.engine_config import EngineConfig
from workers.model import LlamaForCausalLM
from workers.step_packet import HostBatch

log = logging.getLogger(__name__)
_BUCKET_STEP = 8
_ROW_FIELDS = 6  # token id, position, slot block, slot offset, context length, block-table row


def decode_buckets(max_batch: int) -> list[int]:
    """The batch sizes graphs are captured for: 1, 2, 4, then every multiple of 8, and ``max_batch`` itself."""
    small = [size for size in (1, 2, 4) if size < max_batch]
    return small + list(range(_BUCKET_STEP, max_batch, _BUCKET_STEP)) + [max_batch]


def decode_graph_batch(config: EngineConfig, device: torch.device) -> int:
    """The largest batch decode graphs cover; 0 where they are off (not CUDA, not the Triton backend)."""
    if not config.cuda_graphs or device.type != "cuda" or config.attention_backend != "triton":
        return 0
    return min(config.cuda_graph_max_batch, config.scheduler.max_num_seqs)


class _RowViews(NamedTuple):
    """Views into one flat int64 buffer (host or device): ``_ROW_FIELDS`` rows of ``max_batch``."""

    token_ids: torch.Tensor  # [max_batch]
    positions: torch.Tensor  # [max_batch]
    slot_blocks: torch.Tensor  # [max_batch]
    slot_offsets: torch.Tensor  # [max_batch]
    context_lens: torch.Tensor  # [max_batch]
    table_rows: torch.Tensor  # [max_batch]: each row's row of the persistent block table


def _row_views(flat: torch.Tensor, max_batch: int) -> _RowViews:
    return _RowViews(*(flat[i * max_batch : (i + 1) * max_batch] for i in range(_ROW_FIELDS)))


class DecodeGraphs:
    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_cache: torch.Tensor,  # [num_blocks, L, 2, block_size, Hkv, D]
        block_table: DeviceBlockTable,
        block_size: int,
        max_model_len: int,
        max_batch: int,
        with_logits: bool,
    ) -> None:
        self.model, self.kv_cache, self.block_size = model, kv_cache, block_size
        self.block_table = block_table
        self.max_batch, self.with_logits = max_batch, with_logits
        self.buckets = decode_buckets(max_batch)
        device = kv_cache.device
        size = _ROW_FIELDS * max_batch
        self._host = torch.zeros(size, dtype=torch.long, pin_memory=device.type == "cuda")
        self._host_rows = _row_views(self._host, max_batch)
        self._inputs = torch.zeros(size, dtype=torch.long, device=device)
        self._rows = _row_views(self._inputs, max_batch)
        self._rows.context_lens.fill_(1)  # warm-up rows attend over one slot, not over nothing
        self._table = torch.zeros_like(block_table.table[:max_batch])  # [max_batch, width] int32: rows gathered
        self._query_start = torch.arange(max_batch + 1, dtype=torch.long, device=device)  # one token per row
        self._metas = {bucket: self._static_meta(bucket, max_model_len) for bucket in self.buckets}
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor | None]] = {}
        self._copied = torch.cuda.Event() if device.type == "cuda" else None
        self.steps_by_bucket = dict.fromkeys(self.buckets, 0)  # decode steps run, by the bucket they ran in

    def _static_meta(self, bucket: int, max_model_len: int) -> AttentionMetadata:
        rows = self._rows
        tables = DeviceTables(self._table[:bucket], self._query_start[: bucket + 1], rows.context_lens[:bucket])
        return AttentionMetadata(
            query_start_loc=list(range(bucket + 1)),
            context_lens=[max_model_len] * bucket,  # the worst case: what split-K is sized for
            block_table=self._table[:bucket],  # kernels read ``static_tables``; the torch reference, with its
            # host context_lens of the worst case, cannot run a graph
            slot_blocks=rows.slot_blocks[:bucket],
            slot_offsets=rows.slot_offsets[:bucket],
            static_tables=tables,
        )

    def fits(self, batch: HostBatch) -> bool:
        """A decode step small enough for a graph: one token per chunk, every chunk sampling."""
        rows = len(batch.context_lens)
        return 0 < rows <= self.max_batch and len(batch.token_ids) == rows and len(batch.sample_indices) == rows

    def capture(self) -> None:
        """Warm up, then capture every bucket, the largest first so smaller graphs reuse its memory pool."""
        began = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        for bucket in reversed(self.buckets):
            self._forward(bucket)  # compiles the kernels and settles the allocator before capture
            torch.cuda.synchronize(self.kv_cache.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = self._forward(bucket)
            self._graphs[bucket] = (graph, logits)
        log.info("decode CUDA graphs: %d batch sizes (1..%d) captured in %.1f s", len(self.buckets),
                 self.max_batch, time.perf_counter() - began)

    def run(self, batch: HostBatch) -> torch.Tensor | None:
        """Logits [B, V] fp32 of a decode batch that ``fits`` (None without logits); valid until the next run."""
        num_rows = len(batch.context_lens)
        bucket = next(size for size in self.buckets if size >= num_rows)
        self._load_inputs(batch, bucket)
        self.steps_by_bucket[bucket] += 1
        if bucket in self._graphs:
            graph, logits = self._graphs[bucket]
            graph.replay()
        else:
            logits = self._forward(bucket)
        return None if logits is None else logits[:num_rows]

    def _forward(self, bucket: int) -> torch.Tensor | None:
        rows = self._rows
        torch.index_select(self.block_table.table, 0, rows.table_rows[:bucket], out=self._table[:bucket])
        hidden = self.model(rows.token_ids[:bucket], rows.positions[:bucket], self.kv_cache, self._metas[bucket])
        return self.model.compute_logits(hidden) if self.with_logits else None  # [bucket, V]

    def _load_inputs(self, batch: HostBatch, bucket: int) -> None:
        """Pad ``batch`` to ``bucket`` rows in the pinned buffer and copy it over."""
        if self._copied is not None:
            self._copied.synchronize()  # the last step's copy has read the host buffer
        num_rows = len(batch.context_lens)
        source = np.minimum(np.arange(bucket), num_rows - 1)  # padded rows repeat the last row
        positions = np.asarray(batch.positions)
        columns = (batch.token_ids, positions, batch.slot_blocks, positions % self.block_size, batch.context_lens,
                   batch.table_rows)
        for view, values in zip(self._host_rows, columns):
            view.numpy()[:bucket] = np.asarray(values)[source]
        self._inputs.copy_(self._host, non_blocking=True)
        if self._copied is not None:
            self._copied.record()
