"""The persistent block table on the device: one row of block ids per running sequence, written in place.

Rows are assigned on rank 0 by ``workers.table_rows``; every rank applies the same updates to its own table,
so a step moves only the entries that changed, and the kernels read a ``[B, pages]`` gather of it.
"""

from __future__ import annotations

import torch

from workers.table_rows import TableUpdate
from workers.uploads import upload


class DeviceBlockTable:
    def __init__(self, num_rows: int, width: int, device: torch.device) -> None:
        self.table = torch.zeros(num_rows, width, dtype=torch.int32, device=device)  # [rows, width]
        self.device = device

    def apply(self, updates: list[TableUpdate]) -> None:
        """Write the updates' entries (one small copy and one scatter, however many there are)."""
        if not updates:
            return
        rows, columns, blocks = [], [], []
        for update in updates:
            rows += [update.row] * len(update.blocks)
            columns += range(update.column, update.column + len(update.blocks))
            blocks += update.blocks
        entries = upload(rows + columns + blocks, self.device).view(3, -1)  # [3, N]
        self.table[entries[0], entries[1]] = entries[2].to(torch.int32)

    def gather(self, rows: torch.Tensor, width: int) -> torch.Tensor:
        """[B, width] int32: the first ``width`` entries of each of ``rows``."""
        return self.table[:, :width].index_select(0, rows)
