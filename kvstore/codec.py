"""The self-describing value of one stored block: a fixed header, then the raw bytes. Pure Python.

Header (little-endian, ``HEADER.size`` bytes): magic ``KVTB``, format version, dtype code, the model
fingerprint (32 bytes), the block hash (32 bytes), the unit's shape (layers, 2, block_size, kv heads in
this unit, head_dim), its KV-head range within the model's heads, the payload length, and an XXH3-64 checksum
over the header fields and the payload. A value that fails any check raises ``CorruptValue``: the caller
treats it as a miss and deletes it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import xxhash

MAGIC = b"KVTB"
FORMAT_VERSION = 1
DTYPE_CODES = {"float32": 1, "float16": 2, "bfloat16": 3}
# magic, version, dtype, pad, fingerprint, block hash, 5 dims, head start, head end, total heads, pad, payload length
_FIELDS = struct.Struct("<4sHBx32s32s5IHHHxxQ")
_CHECKSUM = struct.Struct("<Q")
HEADER_SIZE = _FIELDS.size + _CHECKSUM.size


class CorruptValue(ValueError):
    """The stored bytes are not the block asked for (wrong magic, version, model, shape, length or checksum)."""


@dataclass(frozen=True)
class BlockUnit:
    """What a stored value must be: this model's block ``block_hash``, KV heads ``[head_start, head_end)``."""

    fingerprint: bytes  # 32 bytes
    block_hash: bytes  # 32 bytes
    dtype: str
    shape: tuple[int, int, int, int, int]  # [num_layers, 2, block_size, kv_heads in unit, head_dim]
    head_start: int
    head_end: int
    total_heads: int

    @property
    def payload_size(self) -> int:
        size = {"float32": 4, "float16": 2, "bfloat16": 2}[self.dtype]
        for dim in self.shape:
            size *= dim
        return size


def _header_fields(unit: BlockUnit, payload_len: int) -> bytes:
    return _FIELDS.pack(
        MAGIC, FORMAT_VERSION, DTYPE_CODES[unit.dtype], unit.fingerprint, unit.block_hash, *unit.shape,
        unit.head_start, unit.head_end, unit.total_heads, payload_len,
    )


def encode(unit: BlockUnit, payload: bytes | memoryview) -> bytes:
    """The value as one ``bytes`` (a copy of the payload; ``encode_parts`` makes none)."""
    return b"".join(encode_parts(unit, payload))


def encode_parts(unit: BlockUnit, payload: bytes | memoryview) -> tuple[bytes, memoryview]:
    """The value as its header and the payload itself, to be sent one after the other (``kvstore.resp``)."""
    payload = memoryview(payload).cast("B")
    if payload.nbytes != unit.payload_size:
        raise ValueError(f"payload is {payload.nbytes} bytes, the unit's shape needs {unit.payload_size}")
    fields = _header_fields(unit, payload.nbytes)
    hasher = xxhash.xxh3_64(fields)
    hasher.update(payload)  # read in place, with the GIL released
    return fields + _CHECKSUM.pack(hasher.intdigest()), payload


def decode(value: bytes | memoryview, expected: BlockUnit) -> memoryview:
    """The payload of ``value`` if it is exactly ``expected``; raises ``CorruptValue`` naming what is wrong."""
    if len(value) < HEADER_SIZE:
        raise CorruptValue(f"value of {len(value)} bytes is shorter than the {HEADER_SIZE}-byte header")
    payload = memoryview(value)[HEADER_SIZE:]
    verify(value[:HEADER_SIZE], payload, expected)
    return payload


def verify(header: bytes | memoryview, payload: memoryview, expected: BlockUnit) -> None:
    """Raise ``CorruptValue`` unless ``header`` then ``payload`` (a value read in two parts: the payload straight
    into its staged block) are exactly ``expected``. The checksum reads the payload in place."""
    fields = bytes(header[: _FIELDS.size])
    if fields[:4] != MAGIC:
        raise CorruptValue("bad magic")
    if fields != _header_fields(expected, expected.payload_size):
        raise CorruptValue("header does not match the block asked for (version, model, hash, dtype or shape)")
    if payload.nbytes != expected.payload_size:
        raise CorruptValue(f"payload is {payload.nbytes} bytes, expected {expected.payload_size}")
    (checksum,) = _CHECKSUM.unpack_from(header, _FIELDS.size)
    hasher = xxhash.xxh3_64(fields)
    hasher.update(payload)  # xxhash releases the GIL: readers on several connections verify in parallel
    if hasher.intdigest() != checksum:
        raise CorruptValue("checksum mismatch")


# --- manifests: which head-range units make up one stored block --------------------------------------------

MANIFEST_MAGIC = b"KVTM"
_MANIFEST_FIELDS = struct.Struct("<4sH32s32sH")  # magic, version, fingerprint, block hash, number of ranges
_RANGE = struct.Struct("<HH")


def encode_manifest(fingerprint: bytes, block_hash: bytes, head_ranges: list[tuple[int, int]]) -> bytes:
    """Written after every unit it lists: a reader that finds it may fetch exactly those units."""
    body = _MANIFEST_FIELDS.pack(MANIFEST_MAGIC, FORMAT_VERSION, fingerprint, block_hash, len(head_ranges))
    body += b"".join(_RANGE.pack(start, end) for start, end in head_ranges)
    return body + _CHECKSUM.pack(xxhash.xxh3_64_intdigest(body))


def decode_manifest(value: bytes, fingerprint: bytes, block_hash: bytes, total_heads: int) -> list[tuple[int, int]]:
    """The head ranges of a manifest for this block; they must tile ``[0, total_heads)`` in order."""
    if len(value) < _MANIFEST_FIELDS.size + _CHECKSUM.size:
        raise CorruptValue("manifest shorter than its header")
    body, (checksum,) = value[: -_CHECKSUM.size], _CHECKSUM.unpack(value[-_CHECKSUM.size :])
    if xxhash.xxh3_64_intdigest(body) != checksum:
        raise CorruptValue("manifest checksum mismatch")
    magic, version, stored_fingerprint, stored_hash, count = _MANIFEST_FIELDS.unpack_from(body)
    if (magic, version, stored_fingerprint, stored_hash) != (MANIFEST_MAGIC, FORMAT_VERSION, fingerprint, block_hash):
        raise CorruptValue("manifest is for another format, model or block")
    if len(body) != _MANIFEST_FIELDS.size + count * _RANGE.size:
        raise CorruptValue("manifest length does not match its range count")
    ranges = [_RANGE.unpack_from(body, _MANIFEST_FIELDS.size + i * _RANGE.size) for i in range(count)]
    if [r[0] for r in ranges] != [0] + [r[1] for r in ranges[:-1]] or not ranges or ranges[-1][1] != total_heads:
        raise CorruptValue(f"manifest ranges {ranges} do not tile the {total_heads} KV heads")
    return ranges
