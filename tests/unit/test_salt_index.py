"""The salt of each locally cached block, for a flush of one salt (``kvstore.salt_index``)."""

from __future__ import annotations

from kvstore.redis_keys import SaltSelection
from kvstore.salt_index import SaltIndex


def of(index, salt):
    return index.hashes_of(SaltSelection.one_salt(salt))


def test_a_salts_hashes_are_found_and_unheld_ones_are_pruned_past_the_bound():
    index = SaltIndex(prune_above=3)
    held = {b"a1", b"b1"}
    index.add([b"a1", b"a2"], "a", held.__contains__)
    index.add([b"b1"], "b", held.__contains__)
    index.add([b"n1"], None, held.__contains__)
    assert of(index, "a") == [b"a1", b"a2"] and of(index, None) == [b"n1"] and len(index) == 4
    index.add([b"b2"], "b", held.__contains__)  # 4 entries > 3: those not held go first
    assert of(index, "a") == [b"a1"] and of(index, "b") == [b"b1", b"b2"] and of(index, None) == []
    held |= {b"t1", b"t2"}
    index.add([b"t1"], "t/1", held.__contains__)
    index.add([b"t2"], "t/2", held.__contains__)  # (b2, not held, is pruned first)
    assert index.hashes_of(SaltSelection.in_scope("t")) == [b"t1", b"t2"]
    assert index.hashes_of(SaltSelection()) == [b"a1", b"b1", b"t1", b"t2"]
    index.prune(lambda block_hash: False)
    assert len(index) == 0
