"""Turning per-block copies into as few copies as possible. Pure Python.

A tier move is a list of (source index, destination index) pairs: GPU block -> CPU slot, or back. Where
consecutive pairs continue both sides by one, the blocks form one contiguous span on each side, and one copy
of ``length`` blocks replaces ``length`` copies (fewer launches, larger transfers).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple


class CopyRun(NamedTuple):
    source: int  # first source index
    target: int  # first destination index
    length: int  # blocks


def coalesce(pairs: Iterable[tuple[int, int]]) -> list[CopyRun]:
    """Runs covering ``pairs`` in order; a pair extends the last run when both its indices follow it."""
    runs: list[CopyRun] = []
    for source, target in pairs:
        if runs and (runs[-1].source + runs[-1].length, runs[-1].target + runs[-1].length) == (source, target):
            runs[-1] = runs[-1]._replace(length=runs[-1].length + 1)
        else:
            runs.append(CopyRun(source, target, 1))
    return runs
