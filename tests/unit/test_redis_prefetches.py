"""Shared prefetches: which reads are started, for which blocks, and who counts them (a scripted read that
stages a string per block and counts one error per read)."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import pytest

from kvstore.redis_keys import PrefixRef
from kvstore.stats import TierStats
from workers.redis_fetch import FetchOutcome
from workers.redis_prefetches import Prefetch, Prefetches, Segment

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
    assert list(b_outcome.staged) == hashes("d0", "d1", "d2", "qb", "qb2")  # its own blocks only
    assert (a_outcome.stats.errors, b_outcome.stats.errors) == (1, 1)  # b counts only its own read
    assert a.futures()[0] is b.futures()[0]
    assert [(s.hashes, s.owner) for s in b.segments] == [(hashes("d0", "d1", "d2"), False), (hashes("qb", "qb2"), True)]


def test_a_run_wholly_inside_a_read_in_flight_starts_no_read(prefetches):
    prefetches, reads = prefetches
    prefetches.start("a", hashes("d0", "d1", "d2"), PREFIX, 4)
    assert prefetches.start("b", hashes("d0", "d1"), PREFIX, 4)
    assert [(s.hashes, s.owner) for s in prefetches.get("b").segments] == [(hashes("d0", "d1"), False)]
    assert not prefetches.start("c", hashes("d1", "d2"), PREFIX, 5)  # starts elsewhere: a read of its own
    prefetches.get("c").futures()[0].result()
    assert sorted(reads) == [(hashes("d0", "d1", "d2"), 4), (hashes("d1", "d2"), 5)]


def test_a_sharer_s_own_read_is_shared_further(prefetches):
    """A system prompt (s) read for a, a document (d1, d2) read for b, who shares s: c, asking about the same
    document, shares both reads and reads only its question."""
    prefetches, reads = prefetches
    prefetches.start("a", hashes("s", "x"), PREFIX, 0)
    prefetches.start("b", hashes("s", "d1", "d2", "y"), PREFIX, 0)
    assert prefetches.start("c", hashes("s", "d1", "d2", "z"), PREFIX, 0)
    a, b, c = (prefetches.get(name) for name in "abc")
    assert [s.future for s in c.segments[:2]] == [a.futures()[0], b.futures()[1]]
    assert [(s.hashes, s.owner) for s in c.segments] == [(hashes("s"), False), (hashes("d1", "d2"), False),
                                                         (hashes("z"), True)]
    assert list(c.outcome().staged) == hashes("s", "d1", "d2", "z")
    assert sorted(reads) == [(hashes("d1", "d2", "y"), 1), (hashes("s", "x"), 0), (hashes("z"), 3)]


def test_a_hole_in_a_shared_read_ends_the_sharer_s_run_there(prefetches):
    prefetches, _ = prefetches
    holed = FetchOutcome({b"s": "block s"}, TierStats())  # d1 missing: the read stopped after s
    prefetches.start("a", hashes("s", "d1", "d2"), PREFIX, 0)
    prefetches.get("a").segments[0].future = done(holed)
    prefetches.start("b", hashes("s", "d1", "q"), PREFIX, 0)
    assert list(prefetches.get("b").outcome().staged) == hashes("s", "q")  # the lookup stages s alone


def test_a_sharer_inherits_the_read_of_an_owner_that_goes_first(prefetches):
    prefetches, _ = prefetches
    prefetches.start("a", hashes("d0", "d1"), PREFIX, 0)
    prefetches.start("b", hashes("d0", "d1"), PREFIX, 0)
    shared = prefetches.get("a").futures()[0]
    assert prefetches.forget("a") == []  # b counts it now
    b = prefetches.take("b")
    assert b.owned() == [shared] and b.outcome().stats.errors == 1
    assert len(prefetches) == 0


def test_each_read_passes_to_an_heir_of_its_own(prefetches):
    """c shares a's read and b's: when a and b go, c counts both; with c gone too, the caller does."""
    prefetches, _ = prefetches
    prefetches.start("a", hashes("s"), PREFIX, 0)
    prefetches.start("b", hashes("s", "d"), PREFIX, 0)
    prefetches.start("c", hashes("s", "d", "q"), PREFIX, 0)
    reads = prefetches.get("c").futures()
    assert prefetches.forget("a") == [] and prefetches.forget("b") == []
    assert prefetches.get("c").owned() == reads
    assert prefetches.forget("c") == reads and len(prefetches) == 0


def test_the_last_request_of_a_read_leaves_its_counts_to_the_caller(prefetches):
    prefetches, _ = prefetches
    prefetches.start("a", hashes("d0"), PREFIX, 0)
    prefetches.start("b", hashes("d0", "q"), PREFIX, 0)
    shared, tail = prefetches.get("a").futures()[0], prefetches.get("b").futures()[1]
    assert prefetches.forget("b") == [tail]  # its own read; the shared one stays a's
    assert prefetches.forget("a") == [shared]
    assert prefetches.forget("a") == [] and len(prefetches) == 0


def test_blocks_read_before_a_prefetch_keep_its_reads_after_them(prefetches):
    """An orphaned follower f reads its run (d1, d2: d0 is on the GPU) before the question it was reading
    already; no read in flight starts with d1, so it reads them itself, and its read of the question stays."""
    prefetches, reads = prefetches
    prefetches.start("f", hashes("q"), PREFIX, 3)
    prefetches.start("b", hashes("d2", "x"), PREFIX, 2)
    question = prefetches.get("f").futures()[0]
    prefetches.start_before("f", hashes("d1", "d2"), PREFIX, 1)
    f = prefetches.get("f")
    assert [(s.hashes, s.owner) for s in f.segments] == [(hashes("d1", "d2"), True), (hashes("q"), True)]
    assert f.futures()[1] is question
    assert list(f.outcome().staged) == hashes("d1", "d2", "q")
    prefetches.start_before("g", hashes("d2"), PREFIX, 2)  # with no prefetch of its own: a plain start
    assert [(s.hashes, s.owner) for s in prefetches.get("g").segments] == [(hashes("d2"), False)]
    assert sorted(reads) == [(hashes("d1", "d2"), 1), (hashes("d2", "x"), 2), (hashes("q"), 3)]


def test_a_sharer_learns_what_a_shared_read_found_missing_among_its_own_blocks():
    prefetches = Prefetches(executor=None, fetch=None)
    read = FetchOutcome({b"d0": "block d0"}, absent=hashes("d1", "qa"))  # d1 missing: d1 and what follows
    prefetches._of_request["a"] = Prefetch([Segment(done(read), hashes("d0", "d1", "qa"), owner=True)])
    prefetches._of_request["b"] = Prefetch([Segment(done(read), hashes("d0", "d1"), owner=False),
                                            Segment(done(FetchOutcome({b"qb": "block qb"})), hashes("qb"), True)])
    assert prefetches.take("a").outcome().absent == hashes("d1", "qa")
    assert prefetches.take("b").outcome().absent == hashes("d1")  # not a's question

def done(outcome: FetchOutcome) -> Future[FetchOutcome]:
    future: Future[FetchOutcome] = Future()
    future.set_result(outcome)
    return future
