"""The salt of each locally cached block, for a flush of one salt (``kvstore.salt_index``)."""

from __future__ import annotations

from kvstore.salt_index import SaltIndex


def test_a_salts_hashes_are_found_and_unheld_ones_are_pruned_past_the_bound():
    index = SaltIndex(prune_above=3)
    held = {b"a1", b"b1"}
    index.add([b"a1", b"a2"], "a", held.__contains__)
    index.add([b"b1"], "b", held.__contains__)
    index.add([b"n1"], None, held.__contains__)
    assert index.hashes_of("a") == [b"a1", b"a2"] and index.hashes_of(None) == [b"n1"] and len(index) == 4
    index.add([b"b2"], "b", held.__contains__)  # 4 entries > 3: those not held go first
    assert index.hashes_of("a") == [b"a1"] and index.hashes_of("b") == [b"b1", b"b2"] and index.hashes_of(None) == []
    index.prune(lambda block_hash: False)
    assert len(index) == 0
