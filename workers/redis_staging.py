"""Where a Redis read's units land: straight in the host blocks staged for upload, verified as they arrive.

A unit that holds every KV head of its block is read from the socket into that block's bytes (its header into
a small buffer beside it), so between Redis and the GPU the payload is copied by the kernel once and by the
upload once. A unit with only some heads (written by a worker of another tensor-parallel degree) lands in its
own buffer and is copied into its heads by ``assemble``. Each unit's checksum is computed on the reader's
thread as it arrives (xxhash releases the GIL), so parallel readers verify in parallel.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from kvstore import codec


@dataclass(frozen=True)
class UnitRead:
    """One unit to read: the block (index into the batch) it belongs to, its KV heads and what it must be."""

    block: int
    heads: tuple[int, int]
    expected: codec.BlockUnit


class StagedUnits:
    """A ``kvstore.resp.ValueSink`` for one batch: units in key order, blocks ``[L, 2, bs, Hkv, D]`` on the host."""

    def __init__(self, units: list[UnitRead], blocks: list[torch.Tensor]) -> None:
        self.units = units
        self.blocks = blocks
        self._parts: dict[int, torch.Tensor] = {}  # unit index -> [L, 2, bs, heads, D], for partial units
        self._lock = threading.Lock()
        self.outcome: list[str | codec.CorruptValue] = ["missing"] * len(units)  # "ok", "missing" or the error

    def buffers(self, index: int, length: int) -> list[memoryview] | None:
        unit = self.units[index]
        if length != codec.HEADER_SIZE + unit.expected.payload_size:
            return None  # a fresh buffer: the length check in ``codec.decode`` names the damage
        header = memoryview(bytearray(codec.HEADER_SIZE))
        return [header, host_bytes(self._payload_tensor(index))]

    def received(self, index: int, value: list[memoryview] | None) -> None:
        if value is None:
            outcome: str | codec.CorruptValue = "missing"
        else:
            try:
                if len(value) == 2:
                    codec.verify(value[0], value[1], self.units[index].expected)
                else:
                    codec.decode(value[0], self.units[index].expected)  # raises: its length is wrong
                outcome = "ok"
            except codec.CorruptValue as error:
                outcome = error
        with self._lock:
            self.outcome[index] = outcome

    def assemble(self, index: int) -> None:
        """Copy a partial unit ``index`` (verified) into its block's heads; whole units are there already."""
        part = self._parts.pop(index, None)
        if part is not None:
            unit = self.units[index]
            self.blocks[unit.block][:, :, :, unit.heads[0] : unit.heads[1]].copy_(part)

    def _payload_tensor(self, index: int) -> torch.Tensor:
        unit = self.units[index]
        block = self.blocks[unit.block]
        if unit.heads == (0, block.shape[3]):
            return block
        with self._lock:
            if index not in self._parts:
                self._parts[index] = torch.empty(unit.expected.shape, dtype=block.dtype)
            return self._parts[index]


def host_bytes(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous host tensor, in place (writable: a Redis read lands in them)."""
    return memoryview(tensor.view(-1).view(torch.uint8).numpy())
