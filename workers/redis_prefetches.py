"""Requests' reads of their prefixes from Redis, from the start, on the prefetch threads: a block that several
waiting requests want is read once.

A request that arrives while another's read starting at the same block is in flight (or done and not yet
taken) shares that read for the blocks both want (``Prefetch.future``) and reads only the blocks after them on
its own (``Prefetch.tail``: a system prompt or document shared, then each request's own question). Both wait
for their reads; whichever is admitted first loads the shared blocks, and the other then finds them on the
GPU (or, admitted in the same step, shares the blocks loaded for the first: ``Scheduler._match_prefix``).
Only a read a request started for its own first block is shared: a sharer's read of its own blocks is not
(two turns of one conversation in flight at once read the second turn's new blocks twice).

Exactly one request owns each read: the one whose lookup takes the outcome counts the read's stats (errors,
skipped fetches, seconds), once; a sharer takes the staged blocks only. When the owner goes (aborted,
preempted, or done with its prefix on the GPU) before its lookup, a sharer inherits the read; with none, the
caller cancels or counts it. Step loop side, rank 0, for ``KVTiers``.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from kvstore.redis_keys import PrefixRef
from workers.redis_fetch import FetchOutcome

Fetch = Callable[[list[bytes], PrefixRef, int], FetchOutcome]  # RedisFetcher.fetch


@dataclass
class Prefetch:
    future: Future[FetchOutcome]  # the read of the request's leading blocks: its own, or one it shares
    hashes: list[bytes]  # those blocks, a leading part of what ``future`` reads
    owner: bool  # whether this request counts ``future`` (it started it, or inherited it)
    tail: Future[FetchOutcome] | None = None  # its own read of its blocks after ``hashes``

    def futures(self) -> list[Future[FetchOutcome]]:
        return [self.future] if self.tail is None else [self.future, self.tail]

    def outcome(self) -> FetchOutcome:
        """What the reads staged, with the counts of those this request owns (waits for them)."""
        leading = self.future.result()
        outcome = FetchOutcome(dict(leading.staged))
        if self.owner:
            outcome.stats.add(leading.stats)
        if self.tail is not None:
            tail = self.tail.result()
            outcome.staged.update(tail.staged)
            outcome.stats.add(tail.stats)
        return outcome

    def owned(self) -> list[Future[FetchOutcome]]:
        """The reads whose counts are this request's."""
        return ([self.future] if self.owner else []) + ([self.tail] if self.tail is not None else [])


@dataclass
class Prefetches:
    executor: ThreadPoolExecutor
    fetch: Fetch
    _of_request: dict[str, Prefetch] = field(default_factory=dict)

    def start(self, request_id: str, hashes: list[bytes], prefix: PrefixRef, first_block: int) -> bool:
        """Read ``hashes`` (block ``first_block`` of the request's sequence first), sharing the read in flight
        that starts with the same block for as many as it reads (then True)."""
        shared, common = self._longest_shared(hashes)
        if shared is None:
            future = self.executor.submit(self.fetch, hashes, prefix, first_block)
            self._of_request[request_id] = Prefetch(future, hashes, owner=True)
            return False
        tail = None
        if common < len(hashes):
            tail = self.executor.submit(self.fetch, hashes[common:], prefix, first_block + common)
        self._of_request[request_id] = Prefetch(shared.future, hashes[:common], owner=False, tail=tail)
        return True

    def _longest_shared(self, hashes: list[bytes]) -> tuple[Prefetch | None, int]:
        """The prefetch whose read starts with ``hashes[0]`` and has the most of ``hashes`` in common; how many."""
        best, best_common = None, 0
        for other in self._of_request.values():
            common = 0
            for mine, theirs in zip(hashes, other.hashes):  # chained hashes: equal so far, the same blocks
                if mine != theirs:
                    break
                common += 1
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
        owned that no sharer is left to inherit)."""
        prefetch = self._of_request.pop(request_id, None)
        if prefetch is None:
            return []
        owned = prefetch.owned()
        heir = next((other for other in self._of_request.values() if other.future is prefetch.future), None)
        if prefetch.owner and heir is not None:
            heir.owner = True
            owned.remove(prefetch.future)
        return owned
