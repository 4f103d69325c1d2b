"""Coalescing block copies into runs: exact runs for tiny inputs."""

from kvstore.copy_runs import CopyRun, coalesce


def test_consecutive_pairs_on_both_sides_become_one_run():
    assert coalesce([(4, 10), (5, 11), (6, 12)]) == [CopyRun(4, 10, 3)]


def test_a_break_on_either_side_starts_a_new_run():
    pairs = [(0, 0), (1, 1), (2, 5), (3, 6), (7, 7), (8, 6)]
    assert coalesce(pairs) == [CopyRun(0, 0, 2), CopyRun(2, 5, 2), CopyRun(7, 7, 1), CopyRun(8, 6, 1)]


def test_descending_or_repeated_indices_are_not_merged():
    assert coalesce([(5, 5), (4, 4), (4, 4)]) == [CopyRun(5, 5, 1), CopyRun(4, 4, 1), CopyRun(4, 4, 1)]


def test_no_pairs_no_runs():
    assert coalesce([]) == []
