"""Computing a prefix from its start while Redis reads it from its end, so both end sooner than either alone.

A request's blocks beyond its GPU and CPU-tier hits may be in Redis. Reading them all before computing the
tail costs the read's time; recomputing them costs the prefill's. Where the two are of the same order (a
32k-token prefix of an 8B model: seconds either way), the request instead computes its blocks from the first
while the prefetch thread reads them from the last backward (``RedisFetcher.fetch_from_end``); where they meet,
the read's blocks are loaded and only the tail after them is computed. Where the meeting point lies is the
cost model's prediction (``FetchCostModel.tokens_to_compute_first``), asked again at every step from what is
left to read, so a read faster or slower than predicted moves it. The read never goes below what the steps
computed (``EndRead.floor``), and a block missing in Redis only stops the read where it is.

A request that arrives while another reads a run starting at the same block from the end (a burst of
questions about one document) follows it: it neither reads nor computes that run, but waits until the other's
computation and read have met, when the run is on the GPU (``follow``). Its blocks after the run, if any, it
reads from the start meanwhile (``workers.redis_prefetches``). A leader that goes before they meet leaves its
followers to read the run themselves (``orphans``), from its first block the leader has not computed.

Step loop side, rank 0, for ``KVTiers``; blocks are counted from the start of their sequence here, from the
start of the run in ``EndRead``.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from kvstore.cost_model import FetchCostModel
from kvstore.hashing import blocks_in_common
from kvstore.redis_keys import PrefixRef
from workers.redis_fetch import EndRead, FetchOutcome, RedisFetcher

_NEVER = 1 << 62  # a floor above every block: the read stops after the round it is in
_ROUND_WAIT_S = 0.05  # the longest wait for a read's next round before looking again
# A read waited for that makes no progress for this many times what its rest was predicted to take (and at
# least _STALL_MIN_S) is far slower than measured, a stalled Redis say: its blocks are computed instead of
# waiting out the socket timeout. (One noisy prefill measurement can make the cost model say "wait".)
_STALL_FACTOR = 4.0
_STALL_MIN_S = 0.1


@dataclass
class _Reading:
    read: EndRead
    future: Future[FetchOutcome]
    first_block: int  # the run's first block in its sequence
    hashes: list[bytes]  # the run's block hashes
    salt: str | None  # their cache salt
    reported: bool = False  # whether the blocks Redis holds (and lacks) went to the news
    stopped: bool = False  # told to read no further: computing the rest is faster
    seen_rounds: int = -1  # the read's rounds when a step last looked, and since when (``_STALL_FACTOR``)
    progressed_at: float = 0.0


@dataclass(frozen=True)
class Follower:
    """A request waiting for another's read from the end of a run its own blocks start with."""

    leader: str
    hashes: list[bytes]  # its blocks, the first at ``first_block``: the run in common, then its own
    prefix: PrefixRef
    first_block: int
    in_common: int  # how many of ``hashes`` the leader's run holds; the follower reads the rest meanwhile


@dataclass
class EndReadNews:
    """What the reads did since the caller last took the news (``EndReads.take_news``)."""

    finished: list[Future[FetchOutcome]] = field(default_factory=list)  # reads done with: the caller counts them
    skipped: int = 0  # reads stopped because computing the rest is faster (the tier's skipped fetches)
    # blocks found in Redis (their manifests), with their cache salt, for the caller not to rewrite the ones
    # the request computes
    in_redis: list[tuple[bytes, str | None]] = field(default_factory=list)
    absent: list[bytes] = field(default_factory=list)  # blocks Redis answered it does not hold (``FetchOutcome``)


@dataclass
class EndReads:
    fetcher: RedisFetcher
    executor: ThreadPoolExecutor
    cost_model: FetchCostModel
    block_bytes: int
    block_size: int
    _reading: dict[str, _Reading] = field(default_factory=dict)
    _news: EndReadNews = field(default_factory=EndReadNews)
    _followers: dict[str, Follower] = field(default_factory=dict)

    def take_news(self) -> EndReadNews:
        news, self._news = self._news, EndReadNews()
        return news

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._reading

    def start(self, request_id: str, hashes: list[bytes], prefix: PrefixRef, first_block: int) -> bool:
        """Read ``hashes`` (block ``first_block`` first) from the end, unless that cannot be better than reading
        them from the start: no prefill rate measured yet, or (Redis's rate measured) reading is faster than
        computing a block, or computing them all is faster than reading any. Then False: the caller reads from
        the start (which asks the cost model the same, and counts a fetch it skips). With no Redis rate yet,
        the read's first round measures it."""
        if self.cost_model.recompute_seconds(first_block * self.block_size, self.block_size) is None:
            return False
        if self.cost_model.has_rate("redis") and \
                not 0 < self._compute_first(first_block, len(hashes)) < len(hashes) * self.block_size:
            return False
        read = EndRead()
        self._reading[request_id] = _Reading(read, self.executor.submit(self._fetch, hashes, prefix, read),
                                             first_block, hashes, prefix.salt)
        return True

    def follow(self, request_id: str, hashes: list[bytes], prefix: PrefixRef, first_block: int) -> int:
        """Make the request a follower of one reading from the end a run that starts with ``hashes[0]`` (the
        one with most blocks in common); how many it has in common (0: none reads such a run, no change)."""
        best, best_common = None, 0
        for leader, reading in self._reading.items():
            common = blocks_in_common(hashes, reading.hashes)
            if common > best_common:
                best, best_common = leader, common
        if best is not None:
            self._followers[request_id] = Follower(best, hashes, prefix, first_block, best_common)
        return best_common

    def leader_of(self, request_id: str) -> str | None:
        """Whom the request follows, while that one still reads from the end."""
        follower = self._followers.get(request_id)
        return follower.leader if follower is not None and follower.leader in self._reading else None

    def unfollow(self, request_id: str) -> None:
        self._followers.pop(request_id, None)

    def orphans(self, leader: str) -> list[tuple[str, Follower]]:
        """The followers of a leader that goes while it still reads (their run is not on the GPU): they
        follow it no longer."""
        if leader not in self._reading:
            return []
        orphaned = [(request_id, f) for request_id, f in self._followers.items() if f.leader == leader]
        for request_id, _ in orphaned:
            del self._followers[request_id]
        return orphaned

    def _fetch(self, hashes: list[bytes], prefix: PrefixRef, read: EndRead) -> FetchOutcome:
        self.fetcher.fetch_from_end(hashes, prefix, read)
        return read.outcome

    def advance(self, request_id: str, first_block: int, max_tokens: int,
                wait_for_it: bool) -> tuple[dict[bytes, torch.Tensor] | None, int]:
        """A step of the request, whose blocks from ``first_block`` on are not computed: (staged, tokens).
        - The read reached down to ``first_block``: its blocks from there on, in order, and ``max_tokens`` to
          compute after them. The request is done with its read (its future goes to the news' ``finished``).
        - The read cannot help any more (its run ends before ``first_block``, or it ended with nothing staged):
          an empty dict, likewise.
        - Otherwise None, and how many of ``max_tokens`` to compute this step before the two meet (the read is
          told not to go below them); 0 when the read is better waited for. With ``wait_for_it`` it waits for
          the read's next round instead, and answers again. Where computing all the blocks up to what the read
          staged is faster than reading them, or the read waited for made no progress for far longer than
          predicted (``_STALL_FACTOR``), the read stops (counted in the news' ``skipped``) and they are
          computed."""
        reading = self._reading[request_id]
        offset = first_block - reading.first_block
        while True:
            low, end, done, rounds = reading.read.state()
            if end is not None and not reading.reported:
                reading.reported = True
                self._news.in_redis += [(block_hash, reading.salt) for block_hash in reading.hashes[:end]]
                self._news.absent += reading.read.outcome.absent  # (set before ``end``)
            if low is not None and low <= offset < end:
                return self._take(request_id, reading, offset, end), max_tokens
            left = (low if low is not None else len(reading.hashes)) - offset  # blocks up to the staged suffix
            if left <= 0 or (done and low == end):  # computed past all the read may give, or it gave nothing
                self._news.finished.append(self.forget(request_id))
                return {}, max_tokens
            tokens = left * self.block_size
            if not (done or reading.stopped):
                tokens = self._compute_first(first_block, left)
                if tokens == 0 and self._stalled(reading, rounds, left):
                    tokens = left * self.block_size
                if tokens >= left * self.block_size:  # computing the rest beats reading it: what is read is used
                    reading.stopped = True
                    reading.read.raise_floor(_NEVER)
                    self._news.skipped += 1
            if tokens > 0 or not wait_for_it:
                reading.read.raise_floor(offset + min(tokens, max_tokens) // self.block_size)
                return None, min(tokens, max_tokens)
            reading.read.raise_floor(offset)
            reading.read.wait_for_round(rounds, _ROUND_WAIT_S)

    def future(self, request_id: str) -> Future[FetchOutcome]:
        return self._reading[request_id].future

    def should_wait(self, request_id: str, first_block: int | None = None) -> bool:
        """Whether a request not yet computing should wait for its read: its rate is not measured yet, or reading
        the rest is faster than computing a block."""
        reading = self._reading[request_id]
        first_block = reading.first_block if first_block is None else first_block
        offset = first_block - reading.first_block
        low, end, done, rounds = reading.read.state()
        if done or (end is not None and offset >= end) or (low is not None and low <= offset):
            return False  # the read has nothing more to give, or meets the request already
        left = (low if low is not None else len(reading.hashes)) - offset
        return self._compute_first(first_block, left) == 0 and not self._stalled(reading, rounds, left)

    def _take(self, request_id: str, reading: _Reading, offset: int, end: int) -> dict[bytes, torch.Tensor]:
        self._news.finished.append(self.forget(request_id))
        with reading.read.lock:
            staged = reading.read.outcome.staged
            return {block_hash: staged[block_hash] for block_hash in reading.hashes[offset:end]}

    def forget(self, request_id: str) -> Future[FetchOutcome] | None:
        """Stop the request's read (after the round it is in); its future, for its counts."""
        reading = self._reading.pop(request_id, None)
        if reading is None:
            return None
        reading.read.raise_floor(_NEVER)
        return reading.future

    def stop_all(self) -> None:
        for request_id in list(self._reading):
            self._news.finished.append(self.forget(request_id))

    def _stalled(self, reading: _Reading, rounds: int, num_blocks: int) -> bool:
        """Whether the read, at ``rounds`` now with ``num_blocks`` blocks left, has made no progress for
        ``_STALL_FACTOR`` times what they were predicted to take (never while Redis's rate is not measured:
        waiting for the read is then all there is to go by)."""
        now = time.monotonic()
        if rounds != reading.seen_rounds:
            reading.seen_rounds, reading.progressed_at = rounds, now
        rate = self.cost_model.rate("redis")
        patience_s = max(_STALL_MIN_S, _STALL_FACTOR * num_blocks * self.block_bytes / rate) if rate else math.inf
        return now - reading.progressed_at > patience_s

    def _compute_first(self, first_block: int, num_blocks: int) -> int:
        """The cost model's meeting point for ``num_blocks`` blocks from ``first_block``, in tokens."""
        return self.cost_model.tokens_to_compute_first("redis", first_block * self.block_size, num_blocks,
                                                       self.block_bytes, self.block_size)
