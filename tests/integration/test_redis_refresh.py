"""A prefix hot in one worker's GPU pool is never read from Redis, so Redis's LRU would evict it first, a TTL
would expire it, and a restart would lose it, while other workers (a new one, or one taking over when this one
dies) need it. The worker refreshes such blocks in Redis (touches their keys: LRU clock and TTL start again)
and writes again what Redis lost. With a real redis-server."""

from __future__ import annotations

import time

from kvstore.config import KVStoreConfig
from tests.integration.test_kv_tiers import GREEDY, make_engine, redis_only, tokens

PREFIX = tokens(61, 160)  # 10 blocks


def questions(*seeds: int) -> list[list[int]]:
    return [PREFIX + tokens(seed, 9) for seed in seeds]


def uncached(prompts: list[list[int]]) -> list[list[int]]:
    engine = make_engine(KVStoreConfig(prefix_caching=False))
    return [done.token_ids for done in engine.generate(prompts, GREEDY)]


def serve(engine, prompt: list[int]):
    (done,) = engine.generate([prompt], GREEDY)
    return done


def kvtier_keys(redis_server) -> list[bytes]:
    return sorted(redis_server.client().keys("kvtier:*"))


def test_a_hot_prefix_redis_lost_is_written_again_from_the_gpu_pool(redis_server):
    prompts = questions(62, 63, 64, 65)
    expected = uncached(prompts)
    kvstore = redis_only(redis_server.url, refresh_s=0.05)
    hot = make_engine(kvstore)
    assert serve(hot, prompts[0]).token_ids == expected[0]
    hot.tiers.writer.flush()
    redis_server.client().flushall()  # what a restarted Redis holds
    time.sleep(0.1)
    assert serve(hot, prompts[1]).token_ids == expected[1]  # a GPU hit, due: refreshed
    hot.tiers.wait_for_refreshes()
    stats = hot.kv_store_stats()["redis"]
    assert (stats["lost_blocks"], stats["refreshed_blocks"]) == (10, 0)
    stored = stats["stored_blocks"]
    done = serve(hot, prompts[2])  # the next GPU hit writes them again
    assert done.token_ids == expected[2] and done.usage.cached_tokens.gpu == 160
    hot.tiers.writer.flush()
    assert hot.kv_store_stats()["redis"]["stored_blocks"] - stored == 10
    fresh = serve(make_engine(kvstore), prompts[3])  # another worker
    assert fresh.token_ids == expected[3] and fresh.usage.cached_tokens.redis == 160


def test_a_refresh_rewrites_only_the_blocks_redis_lost_a_unit_of_and_touches_the_rest(redis_server):
    prompts = questions(66, 67, 68, 69)
    expected = uncached(prompts)
    kvstore = redis_only(redis_server.url, refresh_s=1.0)
    hot = make_engine(kvstore)
    assert serve(hot, prompts[0]).token_ids == expected[0]
    hot.tiers.writer.flush()
    client = redis_server.client()
    units = [key for key in kvtier_keys(redis_server) if not key.endswith(b":m")]
    assert len(units) == 10
    client.delete(units[3], units[7])  # two blocks lose their one unit; their manifests stay
    time.sleep(2.2)  # (OBJECT IDLETIME counts whole seconds of Redis's LRU clock: idle 2.2 s reads 2 or 3)
    assert min(client.object("idletime", key) for key in kvtier_keys(redis_server)) >= 2
    assert serve(hot, prompts[1]).token_ids == expected[1]
    hot.tiers.wait_for_refreshes()
    stats = hot.kv_store_stats()["redis"]
    assert (stats["lost_blocks"], stats["refreshed_blocks"]) == (2, 8)
    assert max(client.object("idletime", key) for key in kvtier_keys(redis_server)) <= 1  # touched just now
    stored = stats["stored_blocks"]
    assert serve(hot, prompts[2]).token_ids == expected[2]
    hot.tiers.writer.flush()
    assert hot.kv_store_stats()["redis"]["stored_blocks"] - stored == 2
    fresh = serve(make_engine(kvstore), prompts[3])
    assert fresh.token_ids == expected[3] and fresh.usage.cached_tokens.redis == 160


def test_a_refresh_starts_a_hot_prefixs_ttl_again(redis_server):
    """With ``ttl_s`` 4 the refresh interval is 2 s: a prefix hit 2.2 s after it was written has its keys'
    expiry set to 4 s again, so another worker still finds it 4.4 s after the write."""
    prompts = questions(70, 71, 72)
    expected = uncached(prompts)
    kvstore = redis_only(redis_server.url, ttl_s=4)
    hot, fresh = make_engine(kvstore), make_engine(kvstore)
    assert serve(hot, prompts[0]).token_ids == expected[0]
    hot.tiers.writer.flush()
    time.sleep(2.2)
    assert serve(hot, prompts[1]).token_ids == expected[1]
    hot.tiers.wait_for_refreshes()
    assert hot.kv_store_stats()["redis"]["refreshed_blocks"] == 10
    client = redis_server.client()
    assert len(kvtier_keys(redis_server)) == 20
    assert min(client.pttl(key) for key in kvtier_keys(redis_server)) > 3000
    time.sleep(2.2)
    done = serve(fresh, prompts[2])
    assert done.token_ids == expected[2] and done.usage.cached_tokens.redis == 160


def test_a_block_another_tp_degree_wrote_is_refreshed_by_the_units_its_manifest_lists(redis_server):
    """A tp=2 worker writes a prefix as two head slices per block; a tp=1 worker reads it, and its refresh
    touches both slices of each block; one slice gone makes just that block lost, written again whole."""
    from kvstore.hashing import block_hashes
    from tests.integration.test_tensor_parallel import generate_and_close, tiny_engine

    prompts = questions(73, 74, 75, 76)
    expected = uncached(prompts)
    generate_and_close(tiny_engine(2, redis_only(redis_server.url)), prompts[0])
    kvstore = redis_only(redis_server.url, refresh_s=0.05)
    hot = make_engine(kvstore)
    assert serve(hot, prompts[1]).usage.cached_tokens.redis == 160
    client = redis_server.client()
    fourth = block_hashes(PREFIX, 16)[3].hex().encode()
    (slice_key,) = [key for key in kvtier_keys(redis_server) if fourth in key and key.endswith(b":h1-2")]
    client.delete(slice_key)
    time.sleep(0.1)
    assert serve(hot, prompts[2]).token_ids == expected[2]
    hot.tiers.wait_for_refreshes()
    stats = hot.kv_store_stats()["redis"]
    assert (stats["lost_blocks"], stats["refreshed_blocks"]) == (1, 9)
    assert serve(hot, prompts[3]).token_ids == expected[3]
    hot.tiers.writer.flush()
    assert sorted(key.rsplit(b":", 1)[1] for key in kvtier_keys(redis_server) if fourth in key) == [b"h0-1", b"h0-2",
                                                                                                   b"m"]
    fresh = serve(make_engine(kvstore), prompts[0])
    assert fresh.token_ids == expected[0] and fresh.usage.cached_tokens.redis == 160


def test_a_hot_prefix_reaches_a_restarted_redis_again_and_a_refresh_while_it_is_down_fails_nothing(redis_server):
    """Redis killed, then restarted empty (no persistence): a refresh while it is down learns nothing (an error
    is counted, no block is forgotten, the request is served); the first after it is back finds the prefix
    lost, and the next hit writes it again for the other workers."""
    prompts = questions(77, 78, 79, 80, 81)
    expected = uncached(prompts)
    kvstore = redis_only(redis_server.url, refresh_s=0.05, breaker_reset_s=0.05)
    hot = make_engine(kvstore)
    assert serve(hot, prompts[0]).token_ids == expected[0]
    hot.tiers.writer.flush()
    redis_server.kill()
    time.sleep(0.1)
    assert serve(hot, prompts[1]).token_ids == expected[1]
    hot.tiers.wait_for_refreshes()
    stats = hot.kv_store_stats()["redis"]
    assert stats["errors"] >= 1 and (stats["lost_blocks"], stats["refreshed_blocks"]) == (0, 0)
    redis_server.start()
    time.sleep(0.1)
    assert serve(hot, prompts[2]).token_ids == expected[2]
    hot.tiers.wait_for_refreshes()
    assert hot.kv_store_stats()["redis"]["lost_blocks"] == 10
    assert serve(hot, prompts[3]).token_ids == expected[3]
    hot.tiers.writer.flush()
    fresh = serve(make_engine(kvstore), prompts[4])
    assert fresh.token_ids == expected[4] and fresh.usage.cached_tokens.redis == 160
