"""Routing policies: which healthy worker gets a request. Pure Python.

``cache_aware`` (the default) picks the worker with the least expected time to first token:
    tokens to recompute / prefill rate
  + tokens found in each tier / that tier's load rate
  + requests ahead of it x the time one request holds the queue (ahead: as urgent as it or more, since a
    worker preempts less urgent requests for it: ``WorkerPool.healthy_loads``).
A hot prefix on an overloaded worker therefore spreads to another worker, which loads it from Redis.
"""

from __future__ import annotations

import itertools
import statistics
from dataclasses import dataclass, replace

from router.prefix_index import PrefixIndex

POLICIES = ("cache_aware", "least_loaded", "round_robin")


@dataclass(frozen=True)
class WorkerLoad:
    worker_id: str
    load: int  # requests running or waiting there


@dataclass(frozen=True)
class CostRates:
    """Rates in tokens per second (per-tier load rates: bytes/s over bytes per token), and queue cost."""

    prefill_tokens_per_s: float = 20_000.0
    gpu_tokens_per_s: float = 1e9  # a GPU hit costs (almost) nothing
    cpu_tokens_per_s: float = 400_000.0
    redis_tokens_per_s: float = 100_000.0
    seconds_per_queued_request: float = 0.05


@dataclass(frozen=True)
class RouteChoice:
    worker_id: str
    predicted: dict[str, int]  # blocks the chosen worker should find per tier


class RoundRobin:
    def __init__(self) -> None:
        self._counter = itertools.count()

    def choose(self, workers: list[WorkerLoad], block_hashes: list[bytes], block_size: int) -> RouteChoice:
        return RouteChoice(workers[next(self._counter) % len(workers)].worker_id, {})


class LeastLoaded:
    def choose(self, workers: list[WorkerLoad], block_hashes: list[bytes], block_size: int) -> RouteChoice:
        return RouteChoice(min(workers, key=lambda w: w.load).worker_id, {})


class CacheAware:
    def __init__(self, index: PrefixIndex, rates: CostRates | None = None) -> None:
        self.index = index
        self.rates = rates or CostRates()

    def expected_ttft(self, worker: WorkerLoad, found: dict[str, int], num_blocks: int, block_size: int) -> float:
        rates = self.rates
        recompute_tokens = (num_blocks - sum(found.values())) * block_size
        seconds = recompute_tokens / rates.prefill_tokens_per_s
        seconds += found["gpu"] * block_size / rates.gpu_tokens_per_s
        seconds += found["cpu"] * block_size / rates.cpu_tokens_per_s
        seconds += found["redis"] * block_size / rates.redis_tokens_per_s
        return seconds + worker.load * rates.seconds_per_queued_request

    def choose(self, workers: list[WorkerLoad], block_hashes: list[bytes], block_size: int) -> RouteChoice:
        scored = []
        matched = self.index.match_all([worker.worker_id for worker in workers], block_hashes)
        for order, worker in enumerate(workers):
            found = matched[worker.worker_id]
            cost = self.expected_ttft(worker, found, len(block_hashes), block_size)
            scored.append((cost, worker.load, order, worker.worker_id, found))
        _, _, _, worker_id, found = min(scored)
        return RouteChoice(worker_id, found)


def measured_rates(configured: CostRates, workers: list[dict[str, float]]) -> CostRates:
    """The configured rates, with each one the workers have measured replaced by their median.

    Each worker reports (when measured) ``prefill_tokens_per_s``, ``cpu_load_bytes_per_s``,
    ``redis_load_bytes_per_s`` and ``kv_bytes_per_token``; tier rates become tokens/s through the latter."""

    def median(key: str, per_token: bool) -> float | None:
        values = [w[key] / w["kv_bytes_per_token"] if per_token else w[key]
                  for w in workers if w.get(key, 0) > 0 and (not per_token or w.get("kv_bytes_per_token", 0) > 0)]
        return statistics.median(values) if values else None

    updates = {
        "prefill_tokens_per_s": median("prefill_tokens_per_s", per_token=False),
        "cpu_tokens_per_s": median("cpu_load_bytes_per_s", per_token=True),
        "redis_tokens_per_s": median("redis_load_bytes_per_s", per_token=True),
    }
    return replace(configured, **{key: value for key, value in updates.items() if value is not None})


def make_policy(name: str, index: PrefixIndex, rates: CostRates | None = None):
    if name == "cache_aware":
        return CacheAware(index, rates)
    if name == "least_loaded":
        return LeastLoaded()
    if name == "round_robin":
        return RoundRobin()
    raise ValueError(f"router.policy: {name!r} is unknown (known: {', '.join(POLICIES)})")
