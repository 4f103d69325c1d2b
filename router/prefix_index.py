"""The router's view of which worker holds which blocks, per tier, fed by the workers' KV events. Pure Python.

GPU and CPU entries belong to one worker; Redis is shared, so a Redis entry counts for every worker. Each
set is a bounded LRU (the index is a guess that may be stale: a wrong guess costs time, never correctness).
``match`` follows the engine's own lookup order: the leading run of GPU hits, then CPU hits, then Redis hits.

Beside each worker's sets, every hash held in a worker's GPU or CPU tier maps to a bitmask of the workers
holding it there, so ``match_all`` walks a request's blocks once for every worker: a 128k-token prompt (8,192
blocks) against 32 workers is one pass of 8,192 steps, not 32 of them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from kvstore.events import KVEvent

LOCAL_TIERS = ("gpu", "cpu")


class _BoundedSet:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[bytes, None] = OrderedDict()

    def __contains__(self, item: bytes) -> bool:
        return item in self._items

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self):
        return iter(self._items)

    def add(self, items: Iterable[bytes]) -> list[bytes]:
        """Add (or refresh) ``items``; returns those the bound evicted, oldest first."""
        for item in items:
            self._items[item] = None
            self._items.move_to_end(item)
        evicted = []
        while len(self._items) > self.capacity:
            evicted.append(self._items.popitem(last=False)[0])
        return evicted

    def discard(self, items: Iterable[bytes]) -> list[bytes]:
        """Remove ``items``; returns those that were here."""
        removed = [item for item in items if item in self._items]
        for item in removed:
            del self._items[item]
        return removed


class PrefixIndex:
    def __init__(self, max_blocks_per_set: int = 1 << 20) -> None:
        self.max_blocks = max_blocks_per_set
        self._local: dict[str, dict[str, _BoundedSet]] = {}
        self._bits: dict[str, int] = {}  # worker -> its bit in the holder masks (kept for the worker id's life)
        self._holders: dict[str, dict[bytes, int]] = {tier: {} for tier in LOCAL_TIERS}  # hash -> workers' mask
        self.redis = _BoundedSet(max_blocks_per_set)

    def workers(self) -> list[str]:
        return list(self._local)

    def replace(self, worker_id: str, snapshot: dict[str, list[bytes]]) -> None:
        """Forget what ``worker_id`` held and take ``snapshot`` (tier -> hashes) instead."""
        self._forget_local(worker_id)
        self._local.pop(worker_id, None)
        self._set(worker_id, "gpu")  # known, if empty
        for tier, hashes in snapshot.items():
            self._add(worker_id, tier, hashes)

    def apply(self, worker_id: str, events: Iterable[KVEvent]) -> None:
        for event in events:
            if event.stored:
                self._add(worker_id, event.tier, event.block_hashes)
            elif event.tier == "redis":
                self.redis.discard(event.block_hashes)
            else:
                self._unmark(worker_id, event.tier, self._set(worker_id, event.tier).discard(event.block_hashes))

    def remove_worker(self, worker_id: str) -> None:
        self._forget_local(worker_id)
        self._local.pop(worker_id, None)

    def match(self, worker_id: str, block_hashes: list[bytes]) -> dict[str, int]:
        """Blocks of the request's leading run that ``worker_id`` would find in each tier."""
        return self.match_all([worker_id], block_hashes)[worker_id]

    def match_all(self, worker_ids: list[str], block_hashes: list[bytes]) -> dict[str, dict[str, int]]:
        """``match`` for each of ``worker_ids``, in one pass over the blocks: at each block, the workers still
        in their GPU run that lack it there go on to their CPU run, those that lack it there to Redis, and
        those in Redis stop where Redis lacks it. A worker the index does not know starts in Redis."""
        bits = {worker_id: self._bits.get(worker_id, 0) for worker_id in worker_ids}
        spare = 1 << len(self._bits)  # bits for workers without one (they hold nothing of their own)
        for worker_id in bits:
            if not bits[worker_id]:
                bits[worker_id], spare = spare, spare << 1
        ends = self._phase_ends(sum(set(bits.values())), block_hashes)
        counts = {}
        for worker_id, bit in bits.items():
            gpu_end, cpu_end, redis_end = ends[bit]
            counts[worker_id] = {"gpu": gpu_end, "cpu": cpu_end - gpu_end, "redis": redis_end - cpu_end}
        return counts

    def _phase_ends(self, workers: int, block_hashes: list[bytes]) -> dict[int, list[int]]:
        """For each worker bit in ``workers``: where its GPU run, CPU run and Redis run end."""
        gpu_holders, cpu_holders = self._holders["gpu"], self._holders["cpu"]
        in_gpu, in_cpu, in_redis = workers, 0, 0  # the workers in each run, as bitmasks
        ends: dict[int, list[int]] = {}
        for position, block_hash in enumerate(block_hashes):
            if in_gpu:
                left = in_gpu & ~gpu_holders.get(block_hash, 0)
                in_gpu, in_cpu = in_gpu ^ left, in_cpu | left
                _record(ends, left, position)
            if in_cpu:
                left = in_cpu & ~cpu_holders.get(block_hash, 0)
                in_cpu, in_redis = in_cpu ^ left, in_redis | left
                _record(ends, left, position)
            if in_redis and block_hash not in self.redis:
                _record(ends, in_redis, position)
                in_redis = 0
            if not (in_gpu or in_cpu or in_redis):
                return ends
        end = len(block_hashes)
        for still in (in_gpu, in_cpu, in_redis):  # their runs reach the last block
            _record(ends, still, end)
        for phases in ends.values():  # a worker whose GPU run reached the end has CPU and Redis runs of 0
            phases += [end] * (3 - len(phases))
        return ends

    def _add(self, worker_id: str, tier: str, hashes: Iterable[bytes]) -> None:
        if tier == "redis":
            self.redis.add(hashes)
            return
        hashes = list(hashes)
        evicted = self._set(worker_id, tier).add(hashes)
        holders, bit = self._holders[tier], self._bits[worker_id]
        for block_hash in hashes:
            holders[block_hash] = holders.get(block_hash, 0) | bit
        self._unmark(worker_id, tier, evicted)

    def _unmark(self, worker_id: str, tier: str, hashes: Iterable[bytes]) -> None:
        holders, kept = self._holders[tier], ~self._bits[worker_id]
        for block_hash in hashes:
            mask = holders.get(block_hash, 0) & kept
            if mask:
                holders[block_hash] = mask
            else:
                holders.pop(block_hash, None)

    def _forget_local(self, worker_id: str) -> None:
        for tier, held in self._local.get(worker_id, {}).items():
            self._unmark(worker_id, tier, held)

    def _set(self, worker_id: str, tier: str) -> _BoundedSet:
        """The worker's set for ``tier`` (its sets and its bit made on first use)."""
        if worker_id not in self._local:
            self._local[worker_id] = {t: _BoundedSet(self.max_blocks) for t in LOCAL_TIERS}
            self._bits.setdefault(worker_id, 1 << len(self._bits))
        return self._local[worker_id][tier]


def _record(ends: dict[int, list[int]], workers: int, position: int) -> None:
    """Each worker bit of ``workers`` ends its current run at ``position``."""
    while workers:
        bit = workers & -workers
        ends.setdefault(bit, []).append(position)
        workers ^= bit
