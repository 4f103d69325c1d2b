"""The router's view of which worker holds which blocks, per tier, fed by the workers' KV events. Pure Python.

GPU and CPU entries belong to one worker; Redis is shared, so a Redis entry counts for every worker. Each
set is a bounded LRU (the index is a guess that may be stale: a wrong guess costs time, never correctness).
``match`` follows the engine's own lookup order: the leading run of GPU hits, then CPU hits, then Redis hits.
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

    def add(self, items: Iterable[bytes]) -> None:
        for item in items:
            self._items[item] = None
            self._items.move_to_end(item)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def discard(self, items: Iterable[bytes]) -> None:
        for item in items:
            self._items.pop(item, None)


class PrefixIndex:
    def __init__(self, max_blocks_per_set: int = 1 << 20) -> None:
        self.max_blocks = max_blocks_per_set
        self._local: dict[str, dict[str, _BoundedSet]] = {}
        self.redis = _BoundedSet(max_blocks_per_set)

    def workers(self) -> list[str]:
        return list(self._local)

    def replace(self, worker_id: str, snapshot: dict[str, list[bytes]]) -> None:
        """Forget what ``worker_id`` held and take ``snapshot`` (tier -> hashes) instead."""
        self._local[worker_id] = {tier: _BoundedSet(self.max_blocks) for tier in LOCAL_TIERS}
        for tier, hashes in snapshot.items():
            self._set(worker_id, tier).add(hashes)

    def apply(self, worker_id: str, events: Iterable[KVEvent]) -> None:
        for event in events:
            target = self._set(worker_id, event.tier)
            if event.stored:
                target.add(event.block_hashes)
            else:
                target.discard(event.block_hashes)

    def remove_worker(self, worker_id: str) -> None:
        self._local.pop(worker_id, None)

    def match(self, worker_id: str, block_hashes: list[bytes]) -> dict[str, int]:
        """Blocks of the request's leading run that ``worker_id`` would find in each tier."""
        local = self._local.get(worker_id) or {}
        counts = {"gpu": 0, "cpu": 0, "redis": 0}
        position = 0
        for tier, held in (("gpu", local.get("gpu")), ("cpu", local.get("cpu")), ("redis", self.redis)):
            while held is not None and position < len(block_hashes) and block_hashes[position] in held:
                counts[tier] += 1
                position += 1
        return counts

    def _set(self, worker_id: str, tier: str) -> _BoundedSet:
        if tier == "redis":
            return self.redis
        if worker_id not in self._local:
            self._local[worker_id] = {t: _BoundedSet(self.max_blocks) for t in LOCAL_TIERS}
        return self._local[worker_id][tier]
