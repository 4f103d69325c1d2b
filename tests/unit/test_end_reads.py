"""The decisions of computing while Redis reads from the end (``workers.redis_end_reads.EndReads.advance``), on
a read whose progress the test sets by hand: where the computation stops each step, when the two meet, when
the read stops because computing is faster, and when it cannot help any more. Exact token counts."""

from __future__ import annotations

from concurrent.futures import Future

from kvstore.cost_model import FetchCostModel
from workers.redis_end_reads import EndReads, _Reading
from workers.redis_fetch import EndRead, FetchOutcome

BLOCK, BLOCK_BYTES = 16, 1_000_000
HASHES = [bytes([i]) * 32 for i in range(100)]
SALT = "tenant-a"


def end_reads(read_ms_per_block: float) -> EndReads:
    """A block recomputes in 1 ms (16k tokens/s); one reads in ``read_ms_per_block``."""
    model = FetchCostModel()
    model.observe_prefill(tokens=16_000, seconds=1.0)
    model.observe_fetch("redis", BLOCK_BYTES, read_ms_per_block / 1e3)
    return EndReads(fetcher=None, executor=None, cost_model=model, block_bytes=BLOCK_BYTES, block_size=BLOCK)


def reading(reads: EndReads, low: int | None, end: int | None, done: bool = False, first_block: int = 4) -> EndRead:
    """Request "r" reads ``HASHES`` (its blocks ``first_block`` on); staged so far: ``[low, end)`` of them."""
    read = EndRead(end=end, low=low, done=done)
    read.outcome.staged.update({h: f"block {i}" for i, h in enumerate(HASHES) if low is not None and low <= i < end})
    future: Future[FetchOutcome] = Future()
    if done:
        future.set_result(read.outcome)
    reads._reading["r"] = _Reading(read, future, first_block, HASHES, SALT)
    return read


def test_each_step_computes_up_to_where_it_would_meet_the_read():
    reads = end_reads(read_ms_per_block=1.0)
    read = reading(reads, low=None, end=None)  # nothing read yet: 100 blocks left to read
    assert reads.advance("r", 4, 8192, wait_for_it=False) == (None, 50 * BLOCK)  # 50 ms each way
    assert read.floor == 50  # the read will not go below what this step computes
    read.low, read.end = 80, 100  # it read 20 blocks meanwhile; the step computed 50
    assert reads.advance("r", 4 + 50, 8192, wait_for_it=False) == (None, 15 * BLOCK)  # 15 of the 30 left
    assert reads.advance("r", 4 + 50, 10 * BLOCK, wait_for_it=False) == (None, 10 * BLOCK)  # the step's budget
    assert reads.take_news().in_redis == [(h, SALT) for h in HASHES]  # every block Redis holds: none needs
    # writing again (and each with its salt, for that salt's flush)


def test_where_the_read_reaches_the_computation_its_blocks_are_taken_and_the_read_is_over():
    reads = end_reads(read_ms_per_block=1.0)
    reading(reads, low=60, end=100)
    staged, tokens = reads.advance("r", 4 + 70, 8192, wait_for_it=False)  # computed 70 blocks: past low
    assert list(staged) == HASHES[70:100] and tokens == 8192
    assert "r" not in reads and len(reads.take_news().finished) == 1


def test_a_read_much_faster_than_computing_is_waited_for():
    reads = end_reads(read_ms_per_block=0.001)
    read = reading(reads, low=90, end=100)
    assert reads.advance("r", 4, 8192, wait_for_it=False) == (None, 0)
    assert reads.should_wait("r")
    read.low = 0
    assert not reads.should_wait("r")  # it has met the request


def test_where_computing_beats_reading_the_read_stops_and_what_it_staged_is_still_loaded():
    reads = end_reads(read_ms_per_block=1000.0)
    read = reading(reads, low=95, end=100)
    assert reads.advance("r", 4, 8192, wait_for_it=False) == (None, 95 * BLOCK)  # up to the staged suffix
    assert reads.take_news().skipped == 1 and read.floor > 100  # told to stop
    read.done = True
    staged, _ = reads.advance("r", 4 + 95, 8192, wait_for_it=False)
    assert list(staged) == HASHES[95:] and reads.take_news().skipped == 0  # counted once


def test_a_read_that_can_give_nothing_more_is_dropped_and_the_request_computes_on():
    reads = end_reads(read_ms_per_block=1.0)
    reading(reads, low=40, end=40, done=True).outcome.absent = HASHES[40:]  # block 40's manifest was missing:
    assert reads.advance("r", 4, 8192, wait_for_it=False) == ({}, 8192) and "r" not in reads  # nothing staged
    news = reads.take_news()
    assert (news.in_redis, news.absent) == ([(h, SALT) for h in HASHES[:40]], HASHES[40:])  # it writes 40 on
    reading(reads, low=None, end=None)
    assert reads.advance("r", 4 + 100, 8192, wait_for_it=False) == ({}, 8192)  # computed past the whole run


def test_a_read_that_ended_above_the_computation_is_computed_up_to():
    reads = end_reads(read_ms_per_block=0.001)  # (waiting would win, but the read is over)
    reading(reads, low=70, end=100, done=True)  # stopped at a hole at block 69
    assert reads.advance("r", 4 + 10, 8192, wait_for_it=True) == (None, 60 * BLOCK)


def test_a_request_whose_blocks_start_a_run_read_from_the_end_follows_that_read():
    reads = end_reads(read_ms_per_block=1.0)
    reading(reads, low=None, end=None)  # "r" reads HASHES from the end
    assert reads.follow("f", HASHES[:10] + [b"own"], None, 4) == 10  # ten blocks in common
    assert reads.follow("g", [b"other"] + HASHES[1:], None, 4) == 0 and reads.leader_of("g") is None
    assert reads.leader_of("f") == "r"
    reads.advance("r", 4 + 100, 8192, wait_for_it=False)  # computed past the run: "r" is done with its read
    assert reads.leader_of("f") is None  # what it followed is on the GPU


def test_the_followers_of_a_leader_that_goes_mid_read_are_its_orphans():
    reads = end_reads(read_ms_per_block=1.0)
    reading(reads, low=None, end=None)
    reads.follow("f", HASHES[:3], None, 4)
    reads.follow("h", HASHES[:5], None, 4)
    reads.unfollow("h")
    assert [(request, f.hashes, f.in_common) for request, f in reads.orphans("r")] == [("f", HASHES[:3], 3)]
    assert reads.orphans("r") == [] and reads.leader_of("f") is None
