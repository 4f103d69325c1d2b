"""A prefix in Redis computed from its start while Redis reads it from its end (``workers.redis_end_reads``),
with a real redis-server: the two meet, the tokens are those of a run without caches, and a block missing in
Redis or a stalled Redis only moves where they meet.

The cost model decides where the two should meet from measured rates. A fresh reader has measured its prefill
rate (on a warm-up prompt) but not Redis's, so each test sets Redis's rate to where recomputing and reading the
prefix take about as long (``read_as_fast_as_computing``): the first step then computes about half of it."""

from __future__ import annotations

import time

from kvstore.config import KVStoreConfig
from kvstore.hashing import block_hashes
from tests.integration.test_kv_tiers import BLOCK, GREEDY, make_engine, redis_only, tokens
from workers.engine import LLMEngine

PREFIX_BLOCKS = 40


def expected_and_reader(redis_url: str, prompt: list[int], **redis_options) -> tuple[list[int], LLMEngine]:
    expected = make_engine(KVStoreConfig(prefix_caching=False)).generate([prompt], GREEDY)[0].token_ids
    writer = make_engine(redis_only(redis_url))
    writer.generate([prompt], GREEDY)
    writer.close()  # every block written
    reader = make_engine(redis_only(redis_url, compute_while_reading="on", **redis_options))  # "auto": CUDA only
    reader.generate([tokens(999, 3 * BLOCK + 1)], GREEDY)  # measures the prefill rate; shares nothing
    read_as_fast_as_computing(reader, PREFIX_BLOCKS)
    return expected, reader


def read_as_fast_as_computing(engine: LLMEngine, blocks: int) -> None:
    model, block_bytes = engine.cost_model, engine.tiers.block_bytes
    model.observe_fetch("redis", blocks * block_bytes, model.recompute_seconds(0, blocks * BLOCK))


def test_the_computation_and_the_read_meet_and_give_the_uncached_tokens(redis_server):
    prompt = tokens(70, PREFIX_BLOCKS * BLOCK + 5)
    expected, reader = expected_and_reader(redis_server.url, prompt)
    reader.add_request("r", prompt, GREEDY)
    assert reader.tiers.reading_from_end("r")
    reader.step()  # admitted at once: it computes its first blocks while the read runs
    seq = reader._requests["r"].seq
    assert 0 < seq.num_computed_tokens < PREFIX_BLOCKS * BLOCK and seq.num_computed_tokens % BLOCK == 0
    assert seq.cached_tokens["redis"] == 0
    (done,) = reader.run_to_completion(["r"])
    assert done.token_ids == expected
    cached = done.usage.cached_tokens
    assert 0 < cached.redis < PREFIX_BLOCKS * BLOCK and cached.redis % BLOCK == 0  # the two met between
    stats = reader.kv_store_stats()["redis"]
    assert stats["hit_blocks"] == cached.redis // BLOCK and stats["errors"] == 0
    assert not reader.tiers.reading_from_end("r") and not reader.tiers._staged
    reader.tiers.writer.flush()
    # the blocks it computed were found in Redis (their manifests), so only the warm-up's 3 blocks were written
    assert reader.kv_store_stats()["redis"]["stored_blocks"] == 3


def test_a_block_missing_in_redis_stops_the_read_there_and_the_rest_is_computed(redis_server):
    prompt = tokens(71, PREFIX_BLOCKS * BLOCK + 5)
    expected, reader = expected_and_reader(redis_server.url, prompt)
    client = redis_server.client()
    hole = PREFIX_BLOCKS - 6  # the read from the end reaches it in its first round
    hole_hash = block_hashes(prompt, BLOCK)[hole].hex().encode()
    unit = [key for key in client.keys("kvtier:*") if hole_hash in key and not key.endswith(b":m")]
    assert len(unit) == 1
    client.delete(unit[0])
    (done,) = reader.generate([prompt], GREEDY)
    assert done.token_ids == expected
    assert 0 < done.usage.cached_tokens.redis <= (PREFIX_BLOCKS - hole - 1) * BLOCK  # only blocks after the hole


def test_a_stalled_redis_does_not_stall_the_request_it_computes_on(redis_server):
    prompt = tokens(72, PREFIX_BLOCKS * BLOCK + 5)
    expected, reader = expected_and_reader(redis_server.url, prompt, socket_timeout_s=1.0, max_retries=0)
    redis_server.pause()
    try:
        began = time.monotonic()
        (done,) = reader.generate([prompt], GREEDY)
        took = time.monotonic() - began
        deadline = time.monotonic() + 5.0  # the read gives up on its own, after its socket timeout
        while reader.kv_store_stats()["redis"]["errors"] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        redis_server.resume()
    assert done.token_ids == expected and done.usage.cached_tokens.redis == 0
    assert took < 1.0  # computed beside the stalled read, not after its timeout
    assert reader.kv_store_stats()["redis"]["errors"] > 0


def test_two_requests_reading_one_prefix_from_the_end_give_the_uncached_tokens(redis_server):
    """Two questions about one document arrive together; each computes the document from its start while its
    own read comes from the end. Both reads meet the computations, so where they meet in the same step the
    same blocks are loaded twice (each request into its own GPU blocks; that used to fail the step's moves)."""
    document = tokens(73, PREFIX_BLOCKS * BLOCK)
    prompts = [document + tokens(74, 5), document + tokens(75, 5)]
    expected, reader = expected_and_reader(redis_server.url, prompts[0])
    uncached = make_engine(KVStoreConfig(prefix_caching=False))
    expected = [expected, uncached.generate([prompts[1]], GREEDY)[0].token_ids]
    reader.add_request("a", prompts[0], GREEDY)
    reader.add_request("b", prompts[1], GREEDY)
    assert reader.tiers.reading_from_end("a") and reader.tiers.reading_from_end("b")
    done = reader.run_to_completion(["a", "b"])
    assert [d.token_ids for d in done] == expected
    assert sum(d.usage.cached_tokens.redis for d in done) > 0  # (the cost model may stop one read: its rate
    # is shared with the other's)
    assert not reader.tiers._staged and not reader.tiers._cpu_pins
    assert reader.block_pool.num_free == reader.block_pool.num_blocks
