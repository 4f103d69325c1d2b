"""Requests' reads of their prefixes from Redis, from the start, on the prefetch threads: a block that several
waiting requests want is read once.

A request's prefetch is a run of reads (``Segment``s), in block order. A request that arrives while others'
reads are in flight (or done and not yet taken) shares, of the prefetch with the most leading blocks in common
with it, every read up to where the two part, however many requests started them: a system prompt read for
one request, then a document read for another that shared the system prompt, then its own question. It reads
only the blocks after them itself. Every request waits for its reads; whichever is admitted first loads the
shared blocks, and the others then find them on the GPU (or, admitted in the same step, share the blocks
loaded for the first: ``Scheduler._match_prefix``).

Exactly one request owns each read: it counts the read's stats (errors, skipped fetches, seconds), once, when
its lookup takes the outcome; a sharer takes the staged blocks only. When the owner goes (aborted, preempted,
or done with its prefix on the GPU) before its lookup, a request still sharing the read inherits it; with
none, the caller cancels or counts it. Step loop side, rank 0, for ``KVTiers``.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from kvstore.hashing import blocks_in_common
from kvstore.redis_keys import PrefixRef
from workers.redis_fetch import FetchOutcome

Fetch = Callable[[list[bytes], PrefixRef, int], FetchOutcome]  # RedisFetcher.fetch


@dataclass
class Segment:
    """One read, and which of the request's blocks it stages: a leading part of what it reads."""

    future: Future[FetchOutcome]
    hashes: list[bytes]
    owner: bool  # whether this request counts the read (it started it, or inherited it)


@dataclass
class Prefetch:
    segments: list[Segment]  # in block order: together they read the request's blocks

    @property
    def hashes(self) -> list[bytes]:
        return [block_hash for segment in self.segments for block_hash in segment.hashes]

    def futures(self) -> list[Future[FetchOutcome]]:
        return [segment.future for segment in self.segments]

    def outcome(self) -> FetchOutcome:
        """What the reads staged of this request's blocks (where one read stopped short, a block is missing:
        the lookup's leading run ends there), with the counts of the reads it owns (waits for them)."""
        outcome = FetchOutcome({})
        for segment in self.segments:
            read = segment.future.result()
            outcome.staged.update((h, read.staged[h]) for h in segment.hashes if h in read.staged)
            ours = set(segment.hashes)
            outcome.absent += [h for h in read.absent if h in ours]
            if segment.owner:
                outcome.stats.add(read.stats)
        return outcome

    def owned(self) -> list[Future[FetchOutcome]]:
        """The reads whose counts are this request's."""
        return [segment.future for segment in self.segments if segment.owner]


@dataclass
class Prefetches:
    executor: ThreadPoolExecutor
    fetch: Fetch
    _of_request: dict[str, Prefetch] = field(default_factory=dict)

    def start(self, request_id: str, hashes: list[bytes], prefix: PrefixRef, first_block: int) -> bool:
        """Read ``hashes`` (block ``first_block`` of the request's sequence first), sharing the reads in flight
        of the prefetch with the most of them in common (then True), and reading the rest itself."""
        segments = self._shared_reads(hashes)
        common = sum(len(segment.hashes) for segment in segments)
        if common < len(hashes):
            own = self.executor.submit(self.fetch, hashes[common:], prefix, first_block + common)
            segments.append(Segment(own, hashes[common:], owner=True))
        self._of_request[request_id] = Prefetch(segments)
        return common > 0

    def start_before(self, request_id: str, hashes: list[bytes], prefix: PrefixRef, first_block: int) -> None:
        """Read ``hashes`` (block ``first_block`` first) as ``start`` does, for a request whose prefetch, if it
        has one, reads the blocks right after them: those reads stay, after the new ones."""
        later = self._of_request.pop(request_id, None)
        self.start(request_id, hashes, prefix, first_block)
        if later is not None:
            self._of_request[request_id].segments += later.segments

    def _shared_reads(self, hashes: list[bytes]) -> list[Segment]:
        """The reads, cut to the run in common, of the prefetch with the longest leading run in common with
        ``hashes`` (none: no prefetch starts with the same block)."""
        best, common = self._most_in_common(hashes)
        shared: list[Segment] = []
        taken = 0
        for segment in best.segments if best is not None else []:
            if taken == common:
                break
            count = min(len(segment.hashes), common - taken)
            shared.append(Segment(segment.future, hashes[taken : taken + count], owner=False))
            taken += count
        return shared

    def _most_in_common(self, hashes: list[bytes]) -> tuple[Prefetch | None, int]:
        best, best_common = None, 0
        for other in self._of_request.values():
            common = blocks_in_common(hashes, other.hashes)
            if common > best_common:
                best, best_common = other, common
        return best, best_common

    def __len__(self) -> int:
        return len(self._of_request)

    def get(self, request_id: str) -> Prefetch | None:
        return self._of_request.get(request_id)

    def take(self, request_id: str | None) -> Prefetch | None:
        """The request's prefetch, for its lookup; it is the request's no longer."""
        return self._of_request.pop(request_id, None) if request_id is not None else None

    def forget(self, request_id: str) -> list[Future[FetchOutcome]]:
        """The request is done with its prefetch unused: the reads whose counts are the caller's now (those it
        owned that no request still sharing them inherits)."""
        prefetch = self._of_request.pop(request_id, None)
        if prefetch is None:
            return []
        orphans = []
        for future in prefetch.owned():
            heir = next((segment for other in self._of_request.values() for segment in other.segments
                         if segment.future is future), None)
            if heir is None:
                orphans.append(future)
            else:
                heir.owner = True
        return orphans
