"""Redis key layout. Pure Python.

``kvtier:1:{<model 16 hex>.<salt tag>.<root 16 hex>}:<block hash 64 hex>:h<start>-<end>``

- one key per unit (a block's KV for heads ``[start, end)``), so a worker of any tensor-parallel degree finds
  the heads it needs, and one manifest per block (``...:<block hash>:m``) listing the units' head ranges,
  written after them: a block whose manifest is missing, or names a unit that is missing, is a miss;
- the ``{...}`` hash tag holds the model, the salt and the prefix's first block, so every block of one
  prefix lives in one Redis Cluster slot and a batched read never crosses slots;
- the model and salt come first, so one SCAN pattern finds a model's or a tenant's keys (flush).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

KEY_PREFIX = "kvtier:1:"


@dataclass(frozen=True)
class PrefixRef:
    """What names a sequence's blocks besides their hashes: its tenant and its first block."""

    salt: str | None
    root_hash: bytes


@dataclass(frozen=True)
class BlockLoad:
    """Copy the block ``block_hash`` from ``tier`` ("cpu" or "redis") into GPU block ``block_id``; it is
    ``salt``'s (a salt's flush finds it by that)."""

    block_hash: bytes
    block_id: int
    tier: str
    salt: str | None


def salt_tag(salt: str | None) -> str:
    if salt is None:
        return "-"
    return hashlib.sha256(b"kvtier-salt:" + salt.encode()).hexdigest()[:16]


def _block_base(fingerprint: str, prefix: PrefixRef, block_hash: bytes) -> str:
    tag = f"{fingerprint[:16]}.{salt_tag(prefix.salt)}.{prefix.root_hash.hex()[:16]}"
    return f"{KEY_PREFIX}{{{tag}}}:{block_hash.hex()}"


def block_key(fingerprint: str, prefix: PrefixRef, block_hash: bytes, heads: tuple[int, int]) -> str:
    """One unit: the block's KV for heads ``[heads[0], heads[1])``."""
    return f"{_block_base(fingerprint, prefix, block_hash)}:h{heads[0]}-{heads[1]}"


def manifest_key(fingerprint: str, prefix: PrefixRef, block_hash: bytes) -> str:
    """The block's manifest: the head ranges of its units, written after all of them."""
    return f"{_block_base(fingerprint, prefix, block_hash)}:m"


def flush_pattern(fingerprint: str | None = None, salt: str | None = None, any_salt: bool = True) -> str:
    """A SCAN MATCH pattern: every kvtier key, a model's, or one salt's within a model."""
    if fingerprint is None:
        return f"{KEY_PREFIX}*"
    if any_salt:
        return f"{KEY_PREFIX}{{{fingerprint[:16]}.*"
    return f"{KEY_PREFIX}{{{fingerprint[:16]}.{salt_tag(salt)}.*"
