"""Which row of the persistent block table each scheduled sequence reads, and which entries changed. Pure Python.

The runner keeps every running sequence's block ids in one persistent device table (``[rows, max blocks]``),
so a step sends only what changed: a decode step adds one block per sequence every ``block_size`` tokens
instead of re-sending every table. A sequence keeps its row while it is scheduled step after step. A sequence
absent from a step (finished, preempted, or left out by the token budget) loses its row, and gets its whole
table written again when it next runs.

Invariant relied on (``workers.scheduler``): while a sequence holds its blocks, ``seq.block_ids`` only grows,
in place; releasing or re-matching its blocks assigns a new list. So the same list object with ``n`` entries
sent means those ``n`` entries are still right.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple


class TableUpdate(NamedTuple):
    """Set ``table[row, column:column + len(blocks)] = blocks``."""

    row: int
    column: int
    blocks: list[int]


@dataclass
class _RowState:
    row: int
    blocks: list[int]  # the sequence's block list object, when last sent
    sent: int  # entries of it written to the row


@dataclass
class TableRows:
    """Row assignment for one step: per chunk, its row; and the updates to apply before the step reads them."""

    rows: list[int] = field(default_factory=list)
    updates: list[TableUpdate] = field(default_factory=list)


class TableRowAllocator:
    def __init__(self, num_rows: int) -> None:
        self.num_rows = num_rows
        self._free = list(range(num_rows - 1, -1, -1))  # pop() hands out row 0 first
        self._assigned: dict[str, _RowState] = {}

    def assign(self, chunks: list[tuple[str, list[int], int]]) -> TableRows:
        """``chunks``: (request id, its block ids, table entries this step reads), one per scheduled chunk."""
        scheduled = {request_id for request_id, _, _ in chunks}
        for request_id in [rid for rid in self._assigned if rid not in scheduled]:
            self._free.append(self._assigned.pop(request_id).row)
        step = TableRows()
        for request_id, blocks, needed in chunks:
            state = self._assigned.get(request_id)
            if state is None or state.blocks is not blocks or state.sent > len(blocks):
                state = self._fresh_row(request_id, blocks, state)
            if needed > state.sent:
                step.updates.append(TableUpdate(state.row, state.sent, blocks[state.sent : needed]))
                state.sent = needed
            step.rows.append(state.row)
        return step

    def _fresh_row(self, request_id: str, blocks: list[int], previous: _RowState | None) -> _RowState:
        if previous is not None:
            row = previous.row  # the sequence's blocks were replaced: rewrite its row from the start
        elif self._free:
            row = self._free.pop()
        else:
            raise RuntimeError(f"more than {self.num_rows} sequences in one step: the block table has no free row")
        state = _RowState(row, blocks, 0)
        self._assigned[request_id] = state
        return state
