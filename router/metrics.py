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

from protos.kvtier.v1 import generation_pb2 as pb

TIERS = ("gpu", "cpu", "redis")
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
    "dropped_writes": ("kvtier_tier_dropped_writes", "Blocks not written: the write-behind queue was full"),
    "corrupt_values": ("kvtier_tier_corrupt_values", "Stored values that failed their integrity check"),
    "transfer_seconds": ("kvtier_tier_transfer_seconds", "Seconds spent fetching and loading out of this tier"),
}
_ENGINE_GAUGES = {  # worker engine counter -> (metric name, help)
    "running": ("kvtier_worker_requests_running", "Sequences running in the worker's engine"),
    "waiting": ("kvtier_worker_requests_waiting", "Sequences waiting in the worker's engine"),
    "kv_blocks_in_use": ("kvtier_worker_gpu_kv_blocks_in_use", "GPU KV blocks held by running sequences"),
    "kv_blocks_cached": ("kvtier_worker_gpu_kv_blocks_cached", "GPU KV blocks held by the prefix cache only"),
}
_ENGINE_COUNTERS = {
    "preemptions": ("kvtier_worker_preemptions", "Sequences preempted (recomputed later)"),
    "computed_tokens": ("kvtier_worker_computed_tokens", "Prompt and generated tokens the model computed"),
    "generated_tokens": ("kvtier_worker_generated_tokens", "Tokens generated"),
}


class WorkerStatsCollector:
    """Exports the latest ``GetStats`` answer of every worker; ``update`` is called by the router's poller."""

    def __init__(self) -> None:
        self.latest: dict[str, pb.WorkerStats] = {}

    def update(self, stats: pb.Stats) -> None:
        for worker_id, worker_stats in stats.workers.items():
            self.latest[worker_id] = worker_stats

    def collect(self):
        families = [CounterMetricFamily(name, text, labels=["worker", "tier"]) for name, text in _TIER_COUNTERS.values()]
        gauges = [GaugeMetricFamily(name, text, labels=["worker"]) for name, text in _ENGINE_GAUGES.values()]
        counters = [CounterMetricFamily(name, text, labels=["worker"]) for name, text in _ENGINE_COUNTERS.values()]
        for worker_id, stats in sorted(self.latest.items()):
            for tier in TIERS:
                values = stats.tiers[tier].counters if tier in stats.tiers else {}
                for family, key in zip(families, _TIER_COUNTERS):
                    family.add_metric([worker_id, tier], values.get(key, 0.0))
            for family, key in zip(gauges, _ENGINE_GAUGES):
                family.add_metric([worker_id], stats.engine.get(key, 0.0))
            for family, key in zip(counters, _ENGINE_COUNTERS):
                family.add_metric([worker_id], stats.engine.get(key, 0.0))
        yield from families + gauges + counters


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
        self.migrations = Counter("kvtier_stream_migrations", "Streams moved off a failed worker", registry=registry)
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
