"""The router's Prometheus metrics, in a registry of its own (no process-global state), named ``kvtier_*``.

Two sources:
- the router's own view of each request (latencies, the cached tokens its final message reports per tier, routing
  decisions, the tokens the policy predicted to be cached), so the hit counters equal, by construction and by
  test, the sums of ``cached_tokens`` the clients were told;
- every worker's engine and tier counters (``GetStats``, polled by the router), exported with a ``worker`` label
  at scrape time, so one scrape of the router shows the whole cluster.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from kvstore.stats import TIERS
from protos.kvtier.v1 import generation_pb2 as pb

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)
_TIER_COUNTERS = {  # worker tier counter -> (metric name, help)
    "hit_blocks": ("kvtier_tier_hit_blocks", "KV blocks requests found in this tier"),
    "miss_blocks": ("kvtier_tier_miss_blocks", "KV blocks looked up in this tier and not found"),
    "bytes_in": ("kvtier_tier_stored_bytes", "Bytes stored into this tier"),
    "bytes_out": ("kvtier_tier_loaded_bytes", "Bytes loaded out of this tier"),
    "stored_blocks": ("kvtier_tier_stored_blocks", "KV blocks stored into this tier"),
    "evicted_blocks": ("kvtier_tier_evicted_blocks", "KV blocks evicted from this tier"),
    "errors": ("kvtier_tier_errors", "Failed tier calls, corrupt values and failed writes"),
    "skipped_fetches": ("kvtier_tier_skipped_fetches", "Hits not fetched: recomputing was predicted faster"),
    "shared_reads": ("kvtier_tier_shared_reads", "Requests that shared another's read of the same blocks"),
    "dropped_writes": ("kvtier_tier_dropped_writes", "Blocks not written: the write-behind queue was full"),
    "corrupt_values": ("kvtier_tier_corrupt_values", "Stored values that failed their integrity check"),
    "refreshed_blocks": ("kvtier_tier_refreshed_blocks",
                         "Blocks hot in a GPU pool whose keys were found, and touched, in Redis"),
    "lost_blocks": ("kvtier_tier_lost_blocks", "Blocks hot in a GPU pool that Redis had lost (written again)"),
    "transfer_seconds": ("kvtier_tier_transfer_seconds", "Seconds spent fetching and loading out of this tier"),
}
_ENGINE_GAUGES = {  # worker engine counter -> (metric name, help)
    "running": ("kvtier_worker_requests_running", "Sequences running in the worker's engine"),
    "waiting": ("kvtier_worker_requests_waiting", "Sequences waiting in the worker's engine"),
}
_TIER_GAUGES = {  # worker tier gauge -> (metric name, help); absent where a tier does not hold blocks locally
    "used_blocks": ("kvtier_tier_used_blocks", "KV blocks in use: GPU blocks held by sequences, CPU slots filled"),
    "cached_blocks": ("kvtier_tier_cached_blocks", "GPU blocks holding a cached full block (in use or free)"),
    "capacity_blocks": ("kvtier_tier_capacity_blocks", "KV blocks the tier can hold"),
}
_REDIS_GAUGES = {  # the worker's probe of Redis (absent where no Redis is configured)
    "up": ("kvtier_redis_up", "1 when the worker's PING and INFO of Redis succeeded"),
    "breaker_open": ("kvtier_redis_breaker_open", "1 while the worker's Redis circuit breaker refuses calls"),
    "ping_seconds": ("kvtier_redis_ping_seconds", "The worker's last PING round trip to Redis"),
    "used_memory_bytes": ("kvtier_redis_used_memory_bytes", "Redis used_memory (summed over cluster primaries)"),
    "max_memory_bytes": ("kvtier_redis_max_memory_bytes", "Redis maxmemory (0: no limit)"),
}
_ENGINE_COUNTERS = {
    "preemptions": ("kvtier_worker_preemptions", "Sequences preempted (recomputed later)"),
    "priority_preemptions": ("kvtier_worker_priority_preemptions",
                             "Of the preemptions, those that made room for a more urgent request"),
    "computed_tokens": ("kvtier_worker_computed_tokens", "Prompt and generated tokens the model computed"),
    "generated_tokens": ("kvtier_worker_generated_tokens", "Tokens generated"),
    "step_seconds": ("kvtier_worker_step_seconds", "Wall time of engine steps that ran the model"),
    "token_wait_seconds": ("kvtier_worker_token_wait_seconds",
                           "Of the step time, waiting on the device for sampled tokens (the rest: host work)"),
}


class WorkerStatsCollector:
    """Exports the latest ``GetStats`` answer of every worker; ``update`` is called by the router's poller."""

    def __init__(self) -> None:
        self.latest: dict[str, pb.WorkerStats] = {}

    def update(self, stats: pb.Stats) -> None:
        for worker_id, worker_stats in stats.workers.items():
            self.latest[worker_id] = worker_stats

    def collect(self):
        tier_counters = _families(CounterMetricFamily, _TIER_COUNTERS, ["worker", "tier"])
        tier_gauges = _families(GaugeMetricFamily, _TIER_GAUGES, ["worker", "tier"])
        redis_gauges = _families(GaugeMetricFamily, _REDIS_GAUGES, ["worker"])
        engine_gauges = _families(GaugeMetricFamily, _ENGINE_GAUGES, ["worker"])
        engine_counters = _families(CounterMetricFamily, _ENGINE_COUNTERS, ["worker"])
        for worker_id, stats in sorted(self.latest.items()):
            for tier in TIERS:
                values = stats.tiers[tier].counters if tier in stats.tiers else {}
                _add(tier_counters, [worker_id, tier], values, default=0.0)
                _add(tier_gauges, [worker_id, tier], values)
            if "redis" in stats.tiers:
                _add(redis_gauges, [worker_id], stats.tiers["redis"].counters)
            _add(engine_gauges, [worker_id], stats.engine, default=0.0)
            _add(engine_counters, [worker_id], stats.engine, default=0.0)
        for families in (tier_counters, tier_gauges, redis_gauges, engine_gauges, engine_counters):
            yield from families.values()


def _families(kind, metrics: dict[str, tuple[str, str]], labels: list[str]) -> dict:
    """One metric family per source key, in the order of ``metrics``."""
    return {key: kind(name, text, labels=labels) for key, (name, text) in metrics.items()}


def _add(families: dict, labels: list[str], values, default: float | None = None) -> None:
    """A sample per family from ``values`` (a map of source key to value); absent keys give ``default`` or none."""
    for key, family in families.items():
        value = values[key] if key in values else default
        if value is not None:
            family.add_metric(labels, value)


class RouterMetrics:
    def __init__(self, policy: str) -> None:
        self.policy = policy
        self.registry = registry = CollectorRegistry()
        self.running = Gauge("kvtier_requests_running", "Requests the router is streaming", registry=registry)
        self.requests = Counter("kvtier_requests", "Requests ended, by outcome (finished, rejected, failed)",
                                ["outcome"], registry=registry)
        self.ttft = Histogram("kvtier_ttft_seconds", "Time to first token, seen by the router", registry=registry,
                              buckets=_LATENCY_BUCKETS)
        self.tpot = Histogram("kvtier_tpot_seconds", "Time per output token after the first", registry=registry,
                              buckets=_TPOT_BUCKETS)
        self.e2e = Histogram("kvtier_e2e_seconds", "Request time, arrival to final message", registry=registry,
                             buckets=_LATENCY_BUCKETS)
        self.query_tokens = Counter("kvtier_prefix_cache_query_tokens", "Prompt tokens of finished requests",
                                    registry=registry)
        self.hit_tokens = Counter("kvtier_prefix_cache_hit_tokens", "Prompt tokens found cached, per tier: the sums "
                                  "of the cached_tokens the clients were told", ["tier"], registry=registry)
        self.predicted_tokens = Counter("kvtier_router_predicted_cached_tokens", "Cached tokens the routing policy "
                                        "predicted the chosen worker holds, per tier", ["tier"], registry=registry)
        self.routed = Counter("kvtier_routing_decisions", "Requests sent to each worker", ["worker", "policy"],
                              registry=registry)
        self.migrations = Counter("kvtier_stream_migrations", "Streams moved to another worker, by why: the worker "
                                  "failed, or stalled", ["reason"], registry=registry)
        self.workers = WorkerStatsCollector()
        registry.register(self.workers)

    def routed_to(self, worker_id: str, predicted_blocks: dict[str, int], block_size: int) -> None:
        self.routed.labels(worker_id, self.policy).inc()
        for tier, blocks in predicted_blocks.items():
            self.predicted_tokens.labels(tier).inc(blocks * block_size)

    def finished(self, final: pb.Final) -> None:
        """Count a request from the final message exactly as its client receives it."""
        usage, timings = final.usage, final.timings
        self.requests.labels("finished").inc()
        self.query_tokens.inc(usage.prompt_tokens)
        for tier in TIERS:
            self.hit_tokens.labels(tier).inc(getattr(usage.cached_tokens, tier))
        self.ttft.observe(timings.ttft_s)
        self.e2e.observe(timings.total_s)
        if usage.completion_tokens > 1:
            self.tpot.observe((timings.total_s - timings.ttft_s) / (usage.completion_tokens - 1))
