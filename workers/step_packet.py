"""One step's model inputs as int64 tensors, so rank 0 can broadcast them to the other ranks (never pickle).

STEP header: [STEP, T, B, table entries, S]; body: token_ids[T], positions[T], slot_blocks[T],
query_start_loc[B+1], context_lens[B], table lengths[B], block tables (flattened), sample_indices[S].
TIER header: [TIER, gathers, spills, CPU loads, full loads]; body: ``TierOps.flat()``.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

import torch

STOP, STEP, TIER = 0, 1, 2
HEADER_SIZE = 5


@dataclass(frozen=True)
class HostBatch:
    """A step's inputs on the host, as the runner builds them from scheduled chunks."""

    token_ids: list[int]
    positions: list[int]
    slot_blocks: list[int]
    query_start_loc: list[int]
    context_lens: list[int]
    block_tables: list[list[int]]
    sample_indices: list[int]


def pack(batch: HostBatch) -> tuple[torch.Tensor, torch.Tensor]:
    tables = [block for table in batch.block_tables for block in table]
    header = [STEP, len(batch.token_ids), len(batch.context_lens), len(tables), len(batch.sample_indices)]
    body = (
        batch.token_ids + batch.positions + batch.slot_blocks + batch.query_start_loc + batch.context_lens
        + [len(table) for table in batch.block_tables] + tables + batch.sample_indices
    )
    return torch.tensor(header, dtype=torch.long), torch.tensor(body, dtype=torch.long)


def stop_header() -> torch.Tensor:
    return torch.tensor([STOP] + [0] * (HEADER_SIZE - 1), dtype=torch.long)


def body_size(header: torch.Tensor) -> int:
    _, num_tokens, num_chunks, table_entries, num_samples = header.tolist()
    return 3 * num_tokens + (num_chunks + 1) + 2 * num_chunks + table_entries + num_samples


def unpack(header: torch.Tensor, body: torch.Tensor) -> HostBatch:
    _, num_tokens, num_chunks, table_entries, num_samples = header.tolist()
    sizes = [num_tokens, num_tokens, num_tokens, num_chunks + 1, num_chunks, num_chunks, table_entries, num_samples]
    values = body.tolist()
    bounds = [0, *accumulate(sizes)]
    fields = [values[start:end] for start, end in zip(bounds, bounds[1:])]
    tokens, positions, slots, query_start_loc, context_lens, table_lens, tables, samples = fields
    table_bounds = [0, *accumulate(table_lens)]
    block_tables = [tables[start:end] for start, end in zip(table_bounds, table_bounds[1:])]
    return HostBatch(tokens, positions, slots, query_start_loc, context_lens, block_tables, samples)
