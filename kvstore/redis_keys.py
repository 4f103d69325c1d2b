"""Redis key layout. Pure Python.

``kvtier:1:{<model 16 hex>.<scope tag>.<salt tag>.<root 16 hex>}:<block hash 64 hex>:h<start>-<end>``

- one key per unit (a block's KV for heads ``[start, end)``), so a worker of any tensor-parallel degree finds
  the heads it needs, and one manifest per block (``...:<block hash>:m``) listing the units' head ranges,
  written after them: a block whose manifest is missing, or names a unit that is missing, is a miss;
- the ``{...}`` hash tag holds the model, the salt and the prefix's first block, so every block of one
  prefix lives in one Redis Cluster slot and a batched read never crosses slots;
- the model, the salt's scope and the salt come first, so one SCAN pattern finds a model's keys, a scope's
  (every salt of one tenant: the router derives a tenant's salts as ``<tenant scope>/<salt>``) or one salt's.
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


SCOPE_SEPARATOR = "/"


def salt_scope(salt: str | None) -> str | None:
    """The scope a cache salt lies in: its text before the first ``/``, or None (no salt, or none in it)."""
    if salt is None or SCOPE_SEPARATOR not in salt:
        return None
    return salt.split(SCOPE_SEPARATOR, 1)[0]


@dataclass(frozen=True)
class SaltSelection:
    """The cache salts a flush covers: every salt (``everything``), else every salt in ``scope`` when it is
    set, else exactly ``salt`` (None: the blocks of no salt)."""

    everything: bool = True
    salt: str | None = None
    scope: str | None = None

    @classmethod
    def one_salt(cls, salt: str | None) -> SaltSelection:
        return cls(everything=False, salt=salt)

    @classmethod
    def in_scope(cls, scope: str) -> SaltSelection:
        if not scope or SCOPE_SEPARATOR in scope:
            raise ValueError(f"a salt scope is a non-empty string without {SCOPE_SEPARATOR!r}, got {scope!r}")
        return cls(everything=False, scope=scope)

    def covers(self, salt: str | None) -> bool:
        if self.everything:
            return True
        return salt_scope(salt) == self.scope if self.scope is not None else salt == self.salt


def salt_tag(salt: str | None) -> str:
    if salt is None:
        return "-"
    return hashlib.sha256(b"kvtier-salt:" + salt.encode()).hexdigest()[:16]


def _salt_tags(salt: str | None) -> str:
    return f"{salt_tag(salt_scope(salt))}.{salt_tag(salt)}"


def _block_base(fingerprint: str, prefix: PrefixRef, block_hash: bytes) -> str:
    tag = f"{fingerprint[:16]}.{_salt_tags(prefix.salt)}.{prefix.root_hash.hex()[:16]}"
    return f"{KEY_PREFIX}{{{tag}}}:{block_hash.hex()}"


def block_key(fingerprint: str, prefix: PrefixRef, block_hash: bytes, heads: tuple[int, int]) -> str:
    """One unit: the block's KV for heads ``[heads[0], heads[1])``."""
    return f"{_block_base(fingerprint, prefix, block_hash)}:h{heads[0]}-{heads[1]}"


def manifest_key(fingerprint: str, prefix: PrefixRef, block_hash: bytes) -> str:
    """The block's manifest: the head ranges of its units, written after all of them."""
    return f"{_block_base(fingerprint, prefix, block_hash)}:m"


def flush_pattern(fingerprint: str | None = None, salts: SaltSelection = SaltSelection()) -> str:
    """A SCAN MATCH pattern: every kvtier key, or a model's keys of the selected salts."""
    if fingerprint is None:
        return f"{KEY_PREFIX}*"
    if salts.everything:
        return f"{KEY_PREFIX}{{{fingerprint[:16]}.*"
    if salts.scope is not None:
        return f"{KEY_PREFIX}{{{fingerprint[:16]}.{salt_tag(salts.scope)}.*"
    return f"{KEY_PREFIX}{{{fingerprint[:16]}.{_salt_tags(salts.salt)}.*"
