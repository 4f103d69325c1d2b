"""Chained block hashes: a block's identity is its tokens and everything before them. Pure Python.

``hash(block i) = SHA-256(type-tagged fields)``: the parent block's hash for every block but the first; the
first block instead carries the cache salt (the tenant) and any extra keys. Every field is written as a
one-byte tag, an 8-byte length and the payload, so no two different field lists hash the same bytes (a salt
equal to some extra key's value does not collide). Never Python's ``hash()``, never pickle.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping, Sequence

HASH_VERSION = b"kvtier-block-hash/1"


def _field(hasher: hashlib._Hash, tag: bytes, payload: bytes) -> None:
    hasher.update(tag)
    hasher.update(len(payload).to_bytes(8, "little"))
    hasher.update(payload)


def _token_bytes(token_ids: Sequence[int]) -> bytes:
    return struct.pack(f"<{len(token_ids)}I", *token_ids)  # token ids are < 2**32


def hash_block(
    parent: bytes | None,
    token_ids: Sequence[int],
    salt: str | None = None,
    extra_keys: Mapping[str, str] | None = None,
) -> bytes:
    """The 32-byte hash of one full block. ``salt`` and ``extra_keys`` count only for the first block."""
    hasher = hashlib.sha256()
    _field(hasher, b"V", HASH_VERSION)
    if parent is None:
        _field(hasher, b"S" if salt is not None else b"N", (salt or "").encode())
        for key, value in sorted((extra_keys or {}).items()):
            _field(hasher, b"K", key.encode())
            _field(hasher, b"X", value.encode())
    else:
        _field(hasher, b"P", parent)
    _field(hasher, b"T", _token_bytes(token_ids))
    return hasher.digest()


class BlockHasher:
    """The hashes of a growing sequence's full blocks, extended as tokens arrive."""

    def __init__(self, block_size: int, salt: str | None = None, extra_keys: Mapping[str, str] | None = None):
        self.block_size = block_size
        self.salt = salt
        self.extra_keys = dict(extra_keys or {})
        self.hashes: list[bytes] = []

    def update(self, token_ids: Sequence[int], num_tokens: int | None = None) -> list[bytes]:
        """Hash every full block among the first ``num_tokens`` (default: all) of ``token_ids`` not hashed yet;
        returns all hashes so far. Only new blocks are read, so calling it every step costs nothing between."""
        size = self.block_size
        limit = len(token_ids) if num_tokens is None else min(num_tokens, len(token_ids))
        for index in range(len(self.hashes), limit // size):
            parent = self.hashes[-1] if self.hashes else None
            self.hashes.append(hash_block(parent, token_ids[index * size : (index + 1) * size], self.salt,
                                          self.extra_keys))
        return self.hashes


def block_hashes(
    token_ids: Sequence[int], block_size: int, salt: str | None = None, extra_keys: Mapping[str, str] | None = None
) -> list[bytes]:
    return BlockHasher(block_size, salt, extra_keys).update(token_ids)


def blocks_in_common(first: Sequence[bytes], second: Sequence[bytes]) -> int:
    """How many leading block hashes two runs share. Hashes are chained, so runs equal so far hold the same
    tokens at the same positions: the count of blocks one read of either serves both."""
    common = 0
    for mine, theirs in zip(first, second):
        if mine != theirs:
            break
        common += 1
    return common


def model_fingerprint(model_config: Mapping[str, object], dtype: str, block_size: int, weights_identity: str) -> str:
    """Names the namespace of every stored block: the same model, dtype and block size, or nothing is shared."""
    hasher = hashlib.sha256()
    _field(hasher, b"V", b"kvtier-fingerprint/1")
    for key, value in sorted(model_config.items()):
        _field(hasher, b"K", str(key).encode())
        _field(hasher, b"X", repr(value).encode())
    _field(hasher, b"D", dtype.encode())
    _field(hasher, b"B", str(block_size).encode())
    _field(hasher, b"W", weights_identity.encode())
    return hasher.hexdigest()
