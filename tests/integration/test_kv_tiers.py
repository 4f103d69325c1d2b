"""The tiered KV store with a real redis-server: same tokens in every cache mode, reuse across engines,
tenant isolation, and faults (Redis killed, paused, full, or holding corrupt values)."""

from __future__ import annotations

import random
import time

import pytest

from kvstore import codec
from kvstore.config import CpuTierConfig, KVStoreConfig, RedisConfig
from kvstore.hashing import block_hashes
from kvstore.redis_keys import SaltSelection, flush_pattern
from workers.engine import LLMEngine
from workers.engine_config import CacheConfig, EngineConfig
from workers.sampling_params import SamplingParams

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
BLOCK = 16


def tokens(seed: int, count: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 250) for _ in range(count)]


def make_engine(kvstore: KVStoreConfig, num_blocks: int = 512) -> LLMEngine:
    return LLMEngine.from_config(EngineConfig(model="tiny", cache=CacheConfig(num_blocks=num_blocks)), kvstore,
                                 progress=False)


def redis_only(url: str, **redis_options) -> KVStoreConfig:
    return KVStoreConfig(cpu=CpuTierConfig(enabled=False), redis=RedisConfig(url=url, **redis_options))


def run_waves(engine: LLMEngine, waves: list[list[list[int]]]) -> list[list[int]]:
    """Each wave runs to completion before the next; Redis writes land between waves."""
    outputs = []
    for wave in waves:
        outputs += [c.token_ids for c in engine.generate(wave, GREEDY)]
        if engine.tiers is not None and engine.tiers.writer is not None:
            assert engine.tiers.writer.flush()
    return outputs


# Three 160-token prefixes (10 blocks each), visited A B C A B C with new questions: with a 24-block GPU pool
# and an 8-block CPU tier, A is evicted from the GPU, spilled to the CPU, pushed out of the CPU, and found in Redis.
PREFIXES = [tokens(seed, 160) for seed in (1, 2, 3)]
WAVES = [[PREFIXES[i % 3] + tokens(100 + i, 9)] for i in range(6)]


@pytest.fixture(scope="module")
def uncached_outputs() -> list[list[int]]:
    return run_waves(make_engine(KVStoreConfig(prefix_caching=False), num_blocks=24), WAVES)


def test_gpu_prefix_cache_gives_the_same_tokens(uncached_outputs):
    engine = make_engine(KVStoreConfig(cpu=CpuTierConfig(enabled=False)), num_blocks=64)
    assert run_waves(engine, WAVES) == uncached_outputs
    assert engine.kv_store_stats()["gpu"]["hit_blocks"] == 3 * 10  # the second visit of each prefix
    assert engine.stats.computed_tokens < sum(len(w[0]) for w in WAVES) + 6 * 6


def test_gpu_and_cpu_tiers_give_the_same_tokens(uncached_outputs):
    engine = make_engine(KVStoreConfig(cpu=CpuTierConfig(capacity="2MiB")), num_blocks=24)
    assert run_waves(engine, WAVES) == uncached_outputs
    stats = engine.kv_store_stats()
    assert stats["gpu"]["evicted_blocks"] > 0 and stats["cpu"]["stored_blocks"] > 0
    assert stats["cpu"]["hit_blocks"] > 0 and stats["cpu"]["bytes_out"] == stats["cpu"]["hit_blocks"] * 32 * 1024


def test_blocks_travel_gpu_to_cpu_to_redis_and_back(uncached_outputs, redis_server):
    cpu_bytes = 8 * 32 * 1024  # 8 tiny blocks
    kvstore = KVStoreConfig(cpu=CpuTierConfig(capacity=str(cpu_bytes)), redis=RedisConfig(url=redis_server.url))
    engine = make_engine(kvstore, num_blocks=24)
    assert run_waves(engine, WAVES) == uncached_outputs
    stats = engine.kv_store_stats()
    assert stats["gpu"]["evicted_blocks"] > 0
    assert stats["cpu"]["stored_blocks"] > 0 and stats["cpu"]["evicted_blocks"] > 0
    assert stats["redis"]["stored_blocks"] > 0 and stats["redis"]["hit_blocks"] > 0
    assert stats["redis"]["errors"] == 0
    engine.close()


def test_another_engine_reuses_a_long_prefix_from_redis(redis_server):
    prefix = tokens(7, 2000)
    first = make_engine(redis_only(redis_server.url))
    first.generate([prefix + tokens(8, 12)], GREEDY)
    first.close()
    second = make_engine(redis_only(redis_server.url))
    question = tokens(9, 20)
    (done,) = second.generate([prefix + question], GREEDY)
    assert done.usage.cached_tokens.redis == 2000 and done.usage.cached_tokens.gpu == 0
    assert second.stats.computed_tokens == len(question) + GREEDY.max_tokens - 1  # only the tail was prefilled
    uncached = make_engine(KVStoreConfig(prefix_caching=False)).generate([prefix + question], GREEDY)
    assert done.token_ids == uncached[0].token_ids


def test_cache_salts_isolate_tenants_in_every_tier(redis_server):
    prompt = tokens(11, 100) + tokens(12, 5)
    engine = make_engine(KVStoreConfig(cpu=CpuTierConfig(capacity="1MiB"), redis=RedisConfig(url=redis_server.url)))
    engine.generate([prompt], GREEDY, cache_salt="tenant-a")
    engine.tiers.writer.flush()
    (other,) = engine.generate([prompt], GREEDY, cache_salt="tenant-b")
    assert other.usage.cached_tokens.total == 0  # GPU blocks of tenant-a are not shared
    (same,) = engine.generate([prompt], GREEDY, cache_salt="tenant-a")
    assert same.usage.cached_tokens.gpu == 96
    fresh = make_engine(KVStoreConfig(redis=RedisConfig(url=redis_server.url)))
    assert fresh.generate([prompt], GREEDY, cache_salt="tenant-c")[0].usage.cached_tokens.total == 0
    assert fresh.generate([prompt], GREEDY)[0].usage.cached_tokens.total == 0  # no salt is not a salt
    assert fresh.generate([prompt], GREEDY, cache_salt="tenant-a")[0].usage.cached_tokens.redis == 96
    assert other.token_ids == same.token_ids


def test_a_flush_of_one_salt_drops_its_blocks_from_every_tier_and_no_one_elses(redis_server):
    """Tenants a and b each cache a document on the GPU; a's is also spilled to the CPU tier (a third document
    evicts it from the 16-block pool). Flushing salt a drops a's blocks from the GPU pool, the CPU tier and
    Redis; b's stay in all three."""
    document = tokens(13, 96)
    kvstore = KVStoreConfig(cpu=CpuTierConfig(capacity="1MiB"), redis=RedisConfig(url=redis_server.url))
    engine = make_engine(kvstore, num_blocks=16)
    engine.generate([document + tokens(14, 5)], GREEDY, cache_salt="a")
    engine.generate([tokens(15, 96) + tokens(16, 5)], GREEDY, cache_salt="c")  # a's blocks go to the CPU tier
    engine.generate([document + tokens(17, 5)], GREEDY, cache_salt="b")
    engine.tiers.writer.flush()
    keys_before = redis_server.client().dbsize()
    dropped = engine.flush_cache(SaltSelection.one_salt("a"))
    assert dropped["cpu"] > 0 and 0 < dropped["redis"] < keys_before  # a's units and manifests only
    assert redis_server.client().dbsize() == keys_before - dropped["redis"]
    (a,) = engine.generate([document + tokens(18, 5)], GREEDY, cache_salt="a")
    (b,) = engine.generate([document + tokens(19, 5)], GREEDY, cache_salt="b")
    assert a.usage.cached_tokens.total == 0 and b.usage.cached_tokens.gpu == 96
    (c,) = make_engine(kvstore).generate([tokens(15, 96) + tokens(20, 5)], GREEDY, cache_salt="c")
    assert c.usage.cached_tokens.redis == 96  # another salt's blocks in Redis, untouched


def test_a_flush_of_a_scope_drops_every_salt_in_it_from_every_tier_and_nothing_else(redis_server):
    """Salts t/1 and t/2 lie in scope t (as a tenant's salts do); 'other/1', 't' and no salt do not. One flush
    of scope t drops both of its salts' blocks from the GPU pool, the CPU tier and Redis; the rest stay."""
    document = tokens(31, 96)
    kvstore = KVStoreConfig(cpu=CpuTierConfig(capacity="1MiB"), redis=RedisConfig(url=redis_server.url))
    engine = make_engine(kvstore, num_blocks=32)
    salts = ["t/1", "t/2", "other/1", "t", None]
    for index, salt in enumerate(salts):
        engine.generate([document + tokens(40 + index, 5)], GREEDY, cache_salt=salt)
    engine.tiers.writer.flush()
    client = redis_server.client()

    def keys_of(salt):
        return len(list(client.scan_iter(match=flush_pattern(engine.tiers.fingerprint, SaltSelection.one_salt(salt)))))

    assert [keys_of(salt) for salt in salts] == [12] * 5  # 6 blocks: a unit and a manifest each
    dropped = engine.flush_cache(SaltSelection.in_scope("t"))
    assert dropped["gpu"] + dropped["cpu"] == 12 and dropped["redis"] == 24  # t/1's and t/2's
    assert [keys_of(salt) for salt in salts] == [0, 0, 12, 12, 12]
    again = {salt: engine.generate([document + tokens(50, 5)], GREEDY, cache_salt=salt)[0].usage.cached_tokens
             for salt in salts}
    assert [again[salt].total for salt in salts] == [0, 0, 96, 96, 96]


def test_a_salts_flush_of_the_local_tiers_drops_the_blocks_it_loaded_from_redis(redis_server):
    document = tokens(21, 96)
    kvstore = redis_only(redis_server.url)
    writer = make_engine(kvstore)
    writer.generate([document + tokens(22, 5)], GREEDY, cache_salt="a")
    writer.close()
    reader = make_engine(kvstore)
    assert reader.generate([document + tokens(23, 5)], GREEDY, cache_salt="a")[0].usage.cached_tokens.redis == 96
    assert reader.flush_cache(SaltSelection.one_salt("a"), redis=False)["gpu"] >= 6  # the 6 it loaded, at least
    (again,) = reader.generate([document + tokens(24, 5)], GREEDY, cache_salt="a")
    assert (again.usage.cached_tokens.gpu, again.usage.cached_tokens.redis) == (0, 96)  # Redis kept them


def test_a_salts_flush_forgets_only_that_salt_has_written_blocks(redis_server):
    """The worker remembers which blocks it wrote to Redis, so as not to write them twice. A flush of salt a
    forgets a's (computed again, they are written again), not b's: b's document, hot in the GPU pool, is not
    written a second time (it was, while the flush forgot every salt's)."""
    document = tokens(25, 96)
    engine = make_engine(redis_only(redis_server.url))
    engine.generate([document + tokens(26, 5)], GREEDY, cache_salt="a")
    engine.generate([document + tokens(27, 5)], GREEDY, cache_salt="b")
    engine.tiers.writer.flush()
    written = engine.kv_store_stats()["redis"]["stored_blocks"]
    assert written == 12  # each salt's 6 blocks
    engine.flush_cache(SaltSelection.one_salt("a"))
    (b,) = engine.generate([document + tokens(28, 5)], GREEDY, cache_salt="b")
    (a,) = engine.generate([document + tokens(29, 5)], GREEDY, cache_salt="a")
    engine.tiers.writer.flush()
    assert (b.usage.cached_tokens.gpu, a.usage.cached_tokens.total) == (96, 0)
    assert engine.kv_store_stats()["redis"]["stored_blocks"] - written == 6  # a's, again; not b's
    fresh = make_engine(redis_only(redis_server.url))
    assert all(fresh.generate([document + tokens(30, 5)], GREEDY, cache_salt=salt)[0].usage.cached_tokens.redis
               == 96 for salt in ("a", "b"))


def test_redis_killed_mid_workload_loses_no_request_and_reconnects(redis_server):
    kvstore = redis_only(redis_server.url, breaker_reset_s=0.2)
    prompts = [tokens(20 + i, 64) for i in range(6)]
    expected = make_engine(KVStoreConfig(prefix_caching=False)).generate(prompts, GREEDY)
    engine = make_engine(kvstore)
    assert engine.generate(prompts[:2], GREEDY)[0].token_ids == expected[0].token_ids
    redis_server.kill()
    during = engine.generate(prompts[2:4], GREEDY)
    assert [c.token_ids for c in during] == [c.token_ids for c in expected[2:4]]
    engine.tiers.writer.flush()
    assert engine.kv_store_stats()["redis"]["errors"] > 0
    redis_server.start()  # same port
    time.sleep(0.3)  # past breaker_reset_s: the next call is a trial
    after = engine.generate(prompts[4:], GREEDY)
    assert [c.token_ids for c in after] == [c.token_ids for c in expected[4:]]
    engine.tiers.writer.flush()
    assert redis_server.client().dbsize() > 0  # writes flow again
    fresh = make_engine(kvstore)
    assert fresh.generate([prompts[5]], GREEDY)[0].usage.cached_tokens.redis == 48



def test_a_prefix_redis_lost_is_written_again_when_it_is_recomputed(redis_server):
    """Redis loses what a worker wrote (a restart without persistence, maxmemory's LRU, a TTL): when the
    worker computes the prefix again, its lookup having found Redis without it, it writes it again, so other
    workers get it; a worker remembering it as written would never write it again."""
    prefix = tokens(24, 160)
    kvstore = redis_only(redis_server.url)
    engine = make_engine(kvstore, num_blocks=12)
    engine.generate([prefix + tokens(25, 9)], GREEDY)
    engine.tiers.writer.flush()
    redis_server.client().flushall()  # what a restarted Redis holds
    engine.generate([tokens(26, 185)], GREEDY)  # 12 blocks: the prefix leaves the GPU pool
    stored = engine.kv_store_stats()["redis"]["stored_blocks"]
    engine.generate([prefix + tokens(27, 9)], GREEDY)  # computed again from the start
    engine.tiers.writer.flush()
    assert engine.kv_store_stats()["redis"]["stored_blocks"] - stored == 10  # the prefix's 10 blocks, again
    (done,) = make_engine(kvstore).generate([prefix + tokens(28, 9)], GREEDY)
    assert done.usage.cached_tokens.redis == 160


def test_a_redis_cluster_down_at_start_and_mid_workload_fails_no_request(tmp_path):
    """Every node of a 3-node Redis Cluster down: an engine starts and serves (the cluster client is made
    once a node answers), every request completes with the uncached tokens, the probe says down; once the
    nodes are back the engine writes again and another engine reads what it wrote; down again mid-workload,
    nothing fails."""
    from tests.redis_server import RedisClusterNodes

    cluster = RedisClusterNodes(tmp_path / "cluster").start()
    try:
        kvstore = redis_only(cluster.url, cluster=True, breaker_reset_s=0.2)
        prompts = [tokens(29 + i, 64) for i in range(5)]
        expected = [c.token_ids for c in make_engine(KVStoreConfig(prefix_caching=False)).generate(prompts, GREEDY)]
        for node in cluster.nodes:
            node.kill()
        engine = make_engine(kvstore)
        assert [c.token_ids for c in engine.generate(prompts[:2], GREEDY)] == expected[:2]
        assert engine.kv_store_stats()["redis"]["errors"] > 0
        health = engine.tiers.redis.health()
        assert not health.up and "RedisCluster" in health.error  # (redis-py 8.2: RedisClusterUnreachableError)
        for node in cluster.nodes:
            node.start()
        cluster.wait_until_ok()
        time.sleep(0.3)  # past breaker_reset_s: the next call is a trial
        assert engine.generate([prompts[2]], GREEDY)[0].token_ids == expected[2]
        assert engine.tiers.writer.flush() and engine.tiers.redis.health().up
        assert engine.generate([prompts[3]], GREEDY)[0].token_ids == expected[3]
        assert engine.tiers.writer.flush() and sum(cluster.key_counts()) > 0
        (reused,) = make_engine(kvstore).generate([prompts[3]], GREEDY)
        assert reused.token_ids == expected[3] and reused.usage.cached_tokens.redis == 48
        for node in cluster.nodes:
            node.kill()
        assert engine.generate([prompts[4]], GREEDY)[0].token_ids == expected[4]
    finally:
        cluster.stop()


def test_a_redis_cluster_whose_url_node_does_not_answer_is_reached_through_its_other_nodes(tmp_path):
    from tests.redis_server import RedisClusterNodes, free_port

    cluster = RedisClusterNodes(tmp_path / "cluster").start()
    try:
        nodes = tuple(f"127.0.0.1:{node.port}" for node in cluster.nodes)
        kvstore = redis_only(f"redis://127.0.0.1:{free_port()}/0", cluster=True, cluster_nodes=nodes)
        prompt = tokens(34, 100)
        writer = make_engine(kvstore)
        expected = writer.generate([prompt], GREEDY)[0].token_ids
        assert writer.tiers.writer.flush() and sum(cluster.key_counts()) > 0
        assert writer.kv_store_stats()["redis"]["errors"] == 0
        (done,) = make_engine(kvstore).generate([prompt], GREEDY)
        assert done.usage.cached_tokens.redis == 96 and done.token_ids == expected
    finally:
        cluster.stop()

@pytest.mark.parametrize("damage", ["flip a payload byte", "truncate", "wrong model", "garbage"])
def test_corrupt_values_are_detected_deleted_and_recomputed(redis_server, damage):
    prompt = tokens(30, 80) + tokens(31, 7)
    kvstore = redis_only(redis_server.url)
    writer = make_engine(kvstore)
    expected = writer.generate([prompt], GREEDY)[0].token_ids
    writer.close()
    client = redis_server.client()
    keys = client.keys("kvtier:*")
    assert len(keys) == 2 * 5  # 87 prompt + 5 computed generated tokens: 5 full blocks, a unit and a manifest each
    third_block = block_hashes(prompt, BLOCK)[2].hex().encode()
    (victim,) = [key for key in keys if third_block in key and key.endswith(b":h0-2")]
    value = client.get(victim)
    damaged = {
        "flip a payload byte": value[:-100] + bytes([value[-100] ^ 0x01]) + value[-99:],
        "truncate": value[: len(value) // 2],
        "wrong model": value[:7] + b"\xff" + value[8:],
        "garbage": b"not a block",
    }[damage]
    client.set(victim, damaged)
    reader = make_engine(kvstore)
    (done,) = reader.generate([prompt], GREEDY)
    assert done.token_ids == expected
    assert reader.kv_store_stats()["redis"]["corrupt_values"] == 1
    assert done.usage.cached_tokens.redis == 2 * BLOCK  # the run stops at the damaged block
    reader.tiers.writer.flush()
    rewritten = client.get(victim)  # deleted, then written again by the recompute
    assert rewritten != damaged
    codec.decode(rewritten, reader.tiers.unit_of(block_hashes(prompt, BLOCK)[2]))


def test_redis_at_maxmemory_with_lru_never_fails_a_request(tmp_path):
    from tests.redis_server import RedisServer

    server = RedisServer(tmp_path / "full", extra_args=("--maxmemory", "4mb", "--maxmemory-policy", "allkeys-lru"))
    server.start()
    try:
        prompts = [tokens(40 + i, 400) for i in range(12)]  # 300 blocks of 32 KiB: 9.6 MiB into 4 MiB
        kvstore = redis_only(server.url, write_batch_bytes="1MiB")
        engine = make_engine(kvstore, num_blocks=64)
        expected = make_engine(KVStoreConfig(prefix_caching=False)).generate(prompts, GREEDY)
        assert run_waves(engine, [[p] for p in prompts]) == [c.token_ids for c in expected]
        assert server.client().info("memory")["used_memory"] < 6 * 2**20
        assert server.client().info("stats")["evicted_keys"] > 0
        assert engine.kv_store_stats()["redis"]["stored_blocks"] > 0
    finally:
        server.stop()


def test_a_stalled_redis_costs_at_most_its_timeouts(redis_server):
    prompt = tokens(50, 300)
    kvstore = redis_only(redis_server.url, socket_timeout_s=0.2, connect_timeout_s=0.2, max_retries=1)
    expected = make_engine(KVStoreConfig(prefix_caching=False)).generate([prompt], GREEDY)[0].token_ids
    engine = make_engine(kvstore)
    redis_server.pause()
    try:
        started = time.monotonic()
        (done,) = engine.generate([prompt], GREEDY)
        elapsed = time.monotonic() - started
    finally:
        redis_server.resume()
    assert done.token_ids == expected
    assert elapsed < 2.0  # one lookup: 2 attempts x 0.2 s timeout + backoff, plus about 0.1 s of compute
    assert engine.kv_store_stats()["redis"]["errors"] > 0


def test_stored_blocks_expire_after_the_configured_ttl(redis_server):
    engine = make_engine(redis_only(redis_server.url, ttl_s=300))
    engine.generate([tokens(60, 40)], GREEDY)
    engine.close()
    client = redis_server.client()
    ttls = [client.ttl(key) for key in client.keys("kvtier:*")]
    assert ttls and all(0 < ttl <= 300 for ttl in ttls)


def test_a_full_write_behind_queue_drops_and_counts(redis_server):
    engine = make_engine(redis_only(redis_server.url, write_queue_blocks=2, socket_timeout_s=0.5))
    redis_server.pause()  # the writer thread blocks on its first batch; the queue fills behind it
    try:
        (done,) = engine.generate([tokens(61, 200)], GREEDY)  # 12 full blocks for a 2-block queue
    finally:
        redis_server.resume()
    stats = engine.kv_store_stats()["redis"]
    assert stats["dropped_writes"] >= 12 - 2 - 1
    assert len(done.token_ids) == GREEDY.max_tokens


def test_gpu_hits_on_blocks_a_full_queue_dropped_are_not_counted_again_and_are_written_later(redis_server):
    """A 2-block write queue behind a stalled Redis drops most of a 12-block prefix; three more requests hit
    those blocks in the GPU pool, and are not counted as dropped writes again (they were, 12 at each hit).
    Once Redis answers, each hit queues what fits, until Redis holds the whole prefix."""
    prefix = tokens(63, 12 * BLOCK)
    kvstore = redis_only(redis_server.url, write_queue_blocks=2, socket_timeout_s=5.0, max_retries=0)
    engine = make_engine(kvstore)
    engine.cost_model.observe_prefill(tokens=10**9, seconds=1.0, flops=1e30)  # no Redis read on the step loop:
    engine.cost_model.observe_fetch("redis", num_bytes=1000, seconds=1.0)  # the first request's fetch is skipped
    redis_server.pause()  # the writer thread waits on its first batch; the queue stays full behind it
    try:
        engine.generate([prefix + tokens(64, 5)], GREEDY)
        dropped = engine.kv_store_stats()["redis"]["dropped_writes"]
        hits = [engine.generate([prefix + tokens(65 + i, 5)], GREEDY)[0] for i in range(3)]
        assert engine.kv_store_stats()["redis"]["dropped_writes"] == dropped >= 12 - 2
    finally:
        redis_server.resume()
    assert all(hit.usage.cached_tokens.gpu == 12 * BLOCK for hit in hits)
    for i in range(6):
        engine.tiers.writer.flush()
        engine.generate([prefix + tokens(70 + i, 5)], GREEDY)
    engine.tiers.writer.flush()
    assert engine.kv_store_stats()["redis"]["stored_blocks"] == 12
    (fresh,) = make_engine(kvstore).generate([prefix + tokens(80, 5)], GREEDY)
    assert fresh.usage.cached_tokens.redis == 12 * BLOCK


def test_the_cost_model_skips_a_fetch_slower_than_recomputing(redis_server):
    prompt = tokens(62, 100)
    writer = make_engine(redis_only(redis_server.url))
    expected = writer.generate([prompt], GREEDY)[0].token_ids
    writer.close()
    reader = make_engine(redis_only(redis_server.url))
    reader.cost_model.observe_prefill(tokens=10**9, seconds=1.0, flops=1e30)  # recomputing looks nearly free ...
    reader.cost_model.observe_fetch("redis", num_bytes=1000, seconds=1.0)  # ... and Redis looks slow
    (done,) = reader.generate([prompt], GREEDY)
    assert done.token_ids == expected and done.usage.cached_tokens.redis == 0
    assert reader.kv_store_stats()["redis"]["skipped_fetches"] == 1


@pytest.mark.parametrize("readers", [1, 3])
def test_a_fresh_reader_stops_fetching_once_its_first_round_shows_recomputing_is_faster(redis_server, readers):
    """No Redis rate is known in a fresh process, so a first, short round (8 blocks per parallel reader) is
    fetched; what it measured then stops the rest of the fetch, which is recomputed: the same tokens."""
    prompt = tokens(63, 45 * BLOCK)
    writer = make_engine(redis_only(redis_server.url))
    expected = writer.generate([prompt], GREEDY)[0].token_ids
    writer.close()
    reader = make_engine(redis_only(redis_server.url, read_parallelism=readers))
    reader.cost_model.observe_prefill(tokens=10**12, seconds=1.0, flops=1e30)  # recomputing looks nearly free
    (done,) = reader.generate([prompt], GREEDY)
    assert done.token_ids == expected and done.usage.cached_tokens.redis == 8 * readers * BLOCK
    assert reader.kv_store_stats()["redis"]["skipped_fetches"] == 1


def test_the_cost_model_prices_a_fetch_at_the_position_its_blocks_sit(redis_server):
    """Steps report their FLOPs (tokens at their positions) to the cost model, and a Redis lookup after GPU hits
    asks about the blocks where they start: block 4 of the prompt is token 64."""
    prompt = tokens(64, 10 * BLOCK + 3)
    writer = make_engine(redis_only(redis_server.url))
    writer.generate([prompt], GREEDY)
    writer.close()
    reader = make_engine(redis_only(redis_server.url, compute_while_reading="off"))  # reads from the start
    reader.generate([prompt[: 4 * BLOCK + 1]], GREEDY)  # its first 4 blocks now in the GPU pool (and Redis)
    assert reader.cost_model.prefill_flops_per_s.value > 0
    asked = []
    should_fetch = reader.cost_model.should_fetch

    def recording(tier, num_blocks, block_bytes, block_tokens, start_token=0):
        asked.append((tier, num_blocks, start_token))
        return should_fetch(tier, num_blocks, block_bytes, block_tokens, start_token)

    reader.cost_model.should_fetch = recording
    (done,) = reader.generate([prompt], GREEDY)
    assert asked[0] == ("redis", 6, 4 * BLOCK)
    assert done.usage.cached_tokens.gpu == 4 * BLOCK and done.usage.cached_tokens.redis == 6 * BLOCK


def test_a_request_reading_its_prefix_from_redis_does_not_hold_up_the_running_ones(redis_server):
    """The read starts when the request arrives, on the prefetch thread. With Redis paused, the running request
    keeps decoding while the new one waits its turn; once Redis is back, the new one is served from Redis with
    the tokens of a run without caches."""
    prefix, question = tokens(65, 10 * BLOCK), tokens(66, 5)
    expected = make_engine(KVStoreConfig(prefix_caching=False)).generate([prefix + question], GREEDY)[0].token_ids
    writer = make_engine(redis_only(redis_server.url))
    writer.generate([prefix + [1]], GREEDY)
    writer.close()
    # (no cost model: the read's first round, timed across the pause, can make Redis look slower than
    # recomputing the rest of the prefix, and the fetch would stop there)
    reader = make_engine(KVStoreConfig(cpu=CpuTierConfig(enabled=False), cost_model=False,
                                       redis=RedisConfig(url=redis_server.url, socket_timeout_s=10.0)))
    long_decode = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
    reader.add_request("running", tokens(67, 20), long_decode)
    reader.step()
    redis_server.pause()
    try:
        reader.add_request("reading", prefix + question, GREEDY)
        for _ in range(20):
            reader.step()
        assert reader.tiers.prefetching("reading")  # still waiting on the paused Redis ...
        running = reader._requests["running"].seq
        assert running.num_output_tokens >= 20  # ... and the running request decoded a token each step
    finally:
        redis_server.resume()
    generated, usage = [], None
    while reader.has_unfinished():
        for out in reader.step():
            if out.request_id == "reading":
                generated += out.new_token_ids
                usage = out.usage if out.finished else usage
    assert generated == expected and usage.cached_tokens.redis == 10 * BLOCK


def test_a_request_aborted_while_its_prefix_is_read_leaves_nothing_staged(redis_server):
    prefix = tokens(68, 10 * BLOCK)
    writer = make_engine(redis_only(redis_server.url))
    writer.generate([prefix + [1]], GREEDY)
    writer.close()
    reader = make_engine(redis_only(redis_server.url, socket_timeout_s=10.0))
    redis_server.pause()
    try:
        reader.add_request("gone", prefix + [2], GREEDY)
        assert reader.abort("gone")
    finally:
        redis_server.resume()
    reader.generate([tokens(69, 40)], GREEDY)  # steps collect the finished prefetch
    deadline = time.monotonic() + 10
    while reader.tiers._uncounted and time.monotonic() < deadline:
        time.sleep(0.05)
        reader.generate([tokens(70, 3)], GREEDY)
    assert len(reader.tiers._prefetches) == 0 and not reader.tiers._uncounted and not reader.tiers._staged
