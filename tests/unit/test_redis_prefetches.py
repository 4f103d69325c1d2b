"""Shared prefetches: which reads are started, for which blocks, and who counts them (a scripted read that
stages a string per block and counts one error per read)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from kvstore.redis_keys import PrefixRef
from kvstore.stats import TierStats
from workers.redis_fetch import FetchOutcome
from workers.redis_prefetches import Prefetches

PREFIX = PrefixRef(salt=None, root_hash=b"d0")


@pytest.fixture
def prefetches():
    reads: list[tuple[list[bytes], int]] = []

    def fetch(hashes, prefix, first_block):
        reads.append((list(hashes), first_block))
        return FetchOutcome({h: f"block {h.decode()}" for h in hashes}, TierStats(errors=1))

    with ThreadPoolExecutor(2) as executor:
        yield Prefetches(executor, fetch), reads


def hashes(*names: str) -> list[bytes]:
    return [name.encode() for name in names]


def test_a_request_shares_the_read_of_the_blocks_it_has_in_common_and_reads_the_rest(prefetches):
    prefetches, reads = prefetches
    assert not prefetches.start("a", hashes("d0", "d1", "d2", "qa"), PREFIX, 0)
    assert prefetches.start("b", hashes("d0", "d1", "d2", "qb", "qb2"), PREFIX, 0)
    a, b = prefetches.take("a"), prefetches.take("b")
    a_outcome, b_outcome = a.outcome(), b.outcome()
    assert sorted(reads) == [(hashes("d0", "d1", "d2", "qa"), 0), (hashes("qb", "qb2"), 3)]
    assert list(b_outcome.staged) == hashes("d0", "d1", "d2", "qa", "qb", "qb2")
    assert (a_outcome.stats.errors, b_outcome.stats.errors) == (1, 1)  # b counts only its own read
    assert a.future is b.future and (a.owner, b.owner) == (True, False)


def test_a_run_wholly_inside_a_read_in_flight_starts_no_read(prefetches):
    prefetches, reads = prefetches
    prefetches.start("a", hashes("d0", "d1", "d2"), PREFIX, 4)
    assert prefetches.start("b", hashes("d0", "d1"), PREFIX, 4)
    assert prefetches.get("b").tail is None and prefetches.get("b").hashes == hashes("d0", "d1")
    assert not prefetches.start("c", hashes("d1", "d2"), PREFIX, 5)  # starts elsewhere: a read of its own
    prefetches.get("c").future.result()
    assert sorted(reads) == [(hashes("d0", "d1", "d2"), 4), (hashes("d1", "d2"), 5)]


def test_a_sharer_s_own_read_is_not_shared_further(prefetches):
    """c has d0-d2 in common with b, but b shares only d0 (a's read) and reads d1-d2 itself: c shares d0 and
    reads d1-d2 again."""
    prefetches, reads = prefetches
    prefetches.start("a", hashes("d0", "x"), PREFIX, 0)
    prefetches.start("b", hashes("d0", "d1", "d2", "y"), PREFIX, 0)
    prefetches.start("c", hashes("d0", "d1", "d2", "z"), PREFIX, 0)
    c = prefetches.get("c")
    assert c.future is prefetches.get("a").future and c.hashes == hashes("d0")
    c.tail.result()
    assert (hashes("d1", "d2", "z"), 1) in reads


def test_a_sharer_inherits_the_read_of_an_owner_that_goes_first(prefetches):
    prefetches, _ = prefetches
    prefetches.start("a", hashes("d0", "d1"), PREFIX, 0)
    prefetches.start("b", hashes("d0", "d1"), PREFIX, 0)
    shared = prefetches.get("a").future
    assert prefetches.forget("a") == []  # b counts it now
    b = prefetches.take("b")
    assert b.owner and b.owned() == [shared] and b.outcome().stats.errors == 1
    assert len(prefetches) == 0


def test_the_last_request_of_a_read_leaves_its_counts_to_the_caller(prefetches):
    prefetches, _ = prefetches
    prefetches.start("a", hashes("d0"), PREFIX, 0)
    prefetches.start("b", hashes("d0", "q"), PREFIX, 0)
    shared, tail = prefetches.get("a").future, prefetches.get("b").tail
    assert prefetches.forget("b") == [tail]  # its own read; the shared one stays a's
    assert prefetches.forget("a") == [shared]
    assert prefetches.forget("a") == [] and len(prefetches) == 0
