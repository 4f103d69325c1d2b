"""One step's model inputs as int64 tensors, so rank 0 can broadcast them to the other ranks (never pickle).

STEP header: [STEP, T, B, U, S]; body: token_ids[T], positions[T], slot_blocks[T], query_start_loc[B+1],
context_lens[B], table_rows[B], the block-table updates as U flat entries (row, column, count, blocks...),
sample_indices[S].
TIER header: [TIER, gathers, spills, CPU loads, full loads]; body: ``TierOps.flat()``.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

import torch

from workers.table_rows import TableUpdate

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
    table_rows: list[int]  # [B]: the persistent block-table row each chunk reads (``workers.table_rows``)
    table_updates: list[TableUpdate]  # written into the persistent table before the step reads it
    sample_indices: list[int]


def pack(batch: HostBatch) -> tuple[torch.Tensor, torch.Tensor]:
    updates = []
    for update in batch.table_updates:
        updates += [update.row, update.column, len(update.blocks), *update.blocks]
    header = [STEP, len(batch.token_ids), len(batch.context_lens), len(updates), len(batch.sample_indices)]
    body = (
        batch.token_ids + batch.positions + batch.slot_blocks + batch.query_start_loc + batch.context_lens
        + batch.table_rows + updates + batch.sample_indices
    )
    return torch.tensor(header, dtype=torch.long), torch.tensor(body, dtype=torch.long)


def stop_header() -> torch.Tensor:
    return torch.tensor([STOP] + [0] * (HEADER_SIZE - 1), dtype=torch.long)


def body_size(header: torch.Tensor) -> int:
    _, num_tokens, num_chunks, update_entries, num_samples = header.tolist()
    return 3 * num_tokens + (num_chunks + 1) + 2 * num_chunks + update_entries + num_samples


def unpack(header: torch.Tensor, body: torch.Tensor) -> HostBatch:
    _, num_tokens, num_chunks, update_entries, num_samples = header.tolist()
    sizes = [num_tokens, num_tokens, num_tokens, num_chunks + 1, num_chunks, num_chunks, update_entries, num_samples]
    values = body.tolist()
    bounds = [0, *accumulate(sizes)]
    fields = [values[start:end] for start, end in zip(bounds, bounds[1:])]
    tokens, positions, slots, query_start_loc, context_lens, table_rows, flat_updates, samples = fields
    return HostBatch(tokens, positions, slots, query_start_loc, context_lens, table_rows,
                     _unflatten_updates(flat_updates), samples)


def _unflatten_updates(flat: list[int]) -> list[TableUpdate]:
    updates, index = [], 0
    while index < len(flat):
        row, column, count = flat[index : index + 3]
        updates.append(TableUpdate(row, column, flat[index + 3 : index + 3 + count]))
        index += 3 + count
    return updates
