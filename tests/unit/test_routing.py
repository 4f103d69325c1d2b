from kvstore.events import KVEvent, KVEventLog
from router.policies import CacheAware, CostRates, LeastLoaded, RoundRobin, WorkerLoad
from router.prefix_index import PrefixIndex

H = [bytes([i]) * 32 for i in range(8)]


def test_match_follows_the_engine_order_gpu_then_cpu_then_shared_redis():
    index = PrefixIndex()
    index.replace("w1", {"gpu": H[:2], "cpu": [H[2], H[5]]})
    index.apply("w2", [KVEvent("redis", True, tuple(H[:4]))])
    assert index.match("w1", H[:6]) == {"gpu": 2, "cpu": 1, "redis": 1}  # H[3] from Redis; H[4] nowhere
    assert index.match("w2", H[:6]) == {"gpu": 0, "cpu": 0, "redis": 4}
    assert index.match("unknown", H[:2]) == {"gpu": 0, "cpu": 0, "redis": 2}


def test_events_add_and_remove_and_snapshots_replace():
    index = PrefixIndex()
    index.apply("w1", [KVEvent("gpu", True, (H[0], H[1])), KVEvent("gpu", False, (H[1],))])
    assert index.match("w1", H[:2])["gpu"] == 1
    index.replace("w1", {"gpu": [H[3]]})
    assert index.match("w1", H[:1])["gpu"] == 0


def test_the_index_is_bounded_and_forgets_the_oldest():
    index = PrefixIndex(max_blocks_per_set=2)
    index.apply("w1", [KVEvent("gpu", True, (H[0], H[1], H[2]))])
    assert index.match("w1", [H[0]])["gpu"] == 0 and index.match("w1", [H[2]])["gpu"] == 1


def test_cache_aware_prefers_the_worker_holding_the_prefix_until_its_queue_costs_more():
    index = PrefixIndex()
    index.replace("holder", {"gpu": H[:8]})
    index.replace("other", {})
    rates = CostRates(prefill_tokens_per_s=1000.0, seconds_per_queued_request=0.05)
    policy = CacheAware(index, rates)
    idle = [WorkerLoad("holder", 0), WorkerLoad("other", 0)]
    assert policy.choose(idle, H[:8], 16).worker_id == "holder"  # 128 tokens: 0.128 s to recompute elsewhere
    busy = [WorkerLoad("holder", 10), WorkerLoad("other", 0)]  # 0.5 s of queue
    assert policy.choose(busy, H[:8], 16).worker_id == "other"
    index.apply("holder", [KVEvent("redis", True, tuple(H[:8]))])  # now anyone can load it from Redis
    choice = policy.choose(busy, H[:8], 16)
    assert choice.worker_id == "other" and choice.predicted == {"gpu": 0, "cpu": 0, "redis": 8}


def test_simple_policies():
    workers = [WorkerLoad("a", 3), WorkerLoad("b", 1), WorkerLoad("c", 2)]
    assert LeastLoaded().choose(workers, [], 16).worker_id == "b"
    rr = RoundRobin()
    assert [rr.choose(workers, [], 16).worker_id for _ in range(4)] == ["a", "b", "c", "a"]


def test_the_event_log_overflows_into_a_snapshot_request():
    log = KVEventLog(max_events=3)
    log.record("gpu", True, H[:2])
    assert log.drain() == ([KVEvent("gpu", True, (H[0], H[1]))], False)
    log.record("gpu", True, H[:4])
    assert log.drain() == ([], True)


def test_measured_rates_replace_configured_ones_where_workers_measured_them():
    from router.policies import measured_rates

    configured = CostRates(prefill_tokens_per_s=20_000.0, cpu_tokens_per_s=400_000.0, redis_tokens_per_s=100_000.0)
    reports = [
        {"kv_bytes_per_token": 1000.0, "prefill_tokens_per_s": 3000.0, "redis_load_bytes_per_s": 2e8},
        {"kv_bytes_per_token": 1000.0, "prefill_tokens_per_s": 5000.0},
        {"kv_bytes_per_token": 1000.0},
    ]
    rates = measured_rates(configured, reports)
    assert rates.prefill_tokens_per_s == 4000.0  # median of the two measurements
    assert rates.redis_tokens_per_s == 200_000.0  # 2e8 bytes/s over 1000 bytes per token
    assert rates.cpu_tokens_per_s == 400_000.0  # nobody measured it: configured
    assert measured_rates(configured, []) == configured
