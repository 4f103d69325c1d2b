"""Persistent block-table rows: which row each scheduled sequence reads and exactly which entries are sent."""

from __future__ import annotations

import pytest

from workers.step_packet import HostBatch, body_size, pack, unpack
from workers.table_rows import TableRowAllocator, TableUpdate


def test_a_growing_sequence_keeps_its_row_and_sends_only_its_new_blocks():
    rows = TableRowAllocator(4)
    a, b = [7, 3], [9]
    step = rows.assign([("a", a, 2), ("b", b, 1)])
    assert step.rows == [0, 1]
    assert step.updates == [TableUpdate(0, 0, [7, 3]), TableUpdate(1, 0, [9])]
    assert rows.assign([("a", a, 2), ("b", b, 1)]).updates == []  # decode steps inside the same blocks
    a += [5]  # the scheduler grows the list in place
    step = rows.assign([("a", a, 3), ("b", b, 1)])
    assert step.rows == [0, 1] and step.updates == [TableUpdate(0, 2, [5])]


def test_replaced_blocks_rewrite_the_row_and_absent_sequences_free_theirs():
    rows = TableRowAllocator(2)
    a, b = [1, 2, 3], [4]
    rows.assign([("a", a, 3), ("b", b, 1)])
    step = rows.assign([("b", b, 1)])  # a finished, was preempted or was left out: row 0 is free again
    assert step.rows == [1] and step.updates == []
    step = rows.assign([("b", b, 1), ("c", [8, 6], 2)])
    assert step.rows == [1, 0] and step.updates == [TableUpdate(0, 0, [8, 6])]
    readmitted = [4, 11]  # b's blocks released and matched again: a new list, whatever its contents
    step = rows.assign([("b", readmitted, 2), ("c", [8, 6], 2)])
    assert step.rows == [1, 0]
    assert step.updates == [TableUpdate(1, 0, [4, 11]), TableUpdate(0, 0, [8, 6])]


def test_only_the_entries_a_step_reads_are_sent():
    rows = TableRowAllocator(1)
    blocks = [2, 4, 6]
    assert rows.assign([("a", blocks, 1)]).updates == [TableUpdate(0, 0, [2])]  # a chunk over the first block
    assert rows.assign([("a", blocks, 3)]).updates == [TableUpdate(0, 1, [4, 6])]


def test_more_sequences_than_rows_is_an_error():
    rows = TableRowAllocator(1)
    with pytest.raises(RuntimeError, match="more than 1 sequences"):
        rows.assign([("a", [1], 1), ("b", [2], 1)])


def test_a_step_packet_round_trips():
    batch = HostBatch([5, 6, 7], [0, 1, 16], [3, 3, 9], [0, 2, 3], [2, 17], [1, 0],
                      [TableUpdate(1, 0, [3]), TableUpdate(0, 1, [9])], [1, 2])
    header, body = pack(batch)
    assert body_size(header) == body.numel()
    assert unpack(header, body) == batch
