"""A prefix in Redis computed from its start while Redis reads it from its end (``workers.redis_end_reads``),
with a real redis-server: the two meet, the tokens are those of a run without caches, and a block missing in
Redis or a stalled Redis only moves where they meet.

The cost model decides where the two should meet from measured rates. A fresh reader has measured its prefill
rate (on a warm-up prompt) but not Redis's, so each test sets Redis's rate to where recomputing and reading the
prefix take about as long (``read_as_fast_as_computing``): the first step then computes about half of it."""

from __future__ import annotations

import threading
import time
from collections import Counter

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


def read_as_fast_as_computing(engine: LLMEngine, blocks: int, samples: int = 1) -> None:
    """``samples`` > 1: the rate's average forgets what it measured before."""
    model, block_bytes = engine.cost_model, engine.tiers.block_bytes
    for _ in range(samples):
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
    timeout_s = 2.5  # (well above the compute, which another test process may slow down)
    expected, reader = expected_and_reader(redis_server.url, prompt, socket_timeout_s=timeout_s, max_retries=0)
    redis_server.pause()
    try:
        began = time.monotonic()
        (done,) = reader.generate([prompt], GREEDY)
        took = time.monotonic() - began
        deadline = time.monotonic() + timeout_s + 4.0  # the read gives up on its own, after its socket timeout
        while reader.kv_store_stats()["redis"]["errors"] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        redis_server.resume()
    assert done.token_ids == expected and done.usage.cached_tokens.redis == 0
    assert took < timeout_s  # computed beside the stalled read, not after its timeout
    assert reader.kv_store_stats()["redis"]["errors"] > 0


def test_a_read_waited_for_that_stalls_is_computed_instead_of_waited_out(redis_server):
    """The cost model says to wait for the read (Redis measured 100 times faster than computing, after the read
    began), and Redis stalls: once the read has made no progress for several times what it was predicted to
    take, its blocks are computed rather than waiting out the socket timeout."""
    prompt = tokens(73, PREFIX_BLOCKS * BLOCK + 5)
    timeout_s = 5.0
    expected, reader = expected_and_reader(redis_server.url, prompt, socket_timeout_s=timeout_s, max_retries=0)
    redis_server.pause()
    try:
        reader.add_request("r", prompt, GREEDY)
        assert reader.tiers.reading_from_end("r")
        model, block_bytes = reader.cost_model, reader.tiers.block_bytes
        for _ in range(20):  # the average forgets the even rate it had
            model.observe_fetch("redis", PREFIX_BLOCKS * block_bytes,
                                model.recompute_seconds(0, PREFIX_BLOCKS * BLOCK) / 100)
        assert model.tokens_to_compute_first("redis", 0, PREFIX_BLOCKS, block_bytes, BLOCK) == 0  # "wait"
        began = time.monotonic()
        (done,) = reader.run_to_completion(["r"])
        took = time.monotonic() - began
    finally:
        redis_server.resume()
    assert done.token_ids == expected and done.usage.cached_tokens.redis == 0
    assert took < timeout_s / 2, took
    assert reader.kv_store_stats()["redis"]["skipped_fetches"] == 1


def test_two_requests_reading_one_prefix_from_the_end_give_the_uncached_tokens(redis_server):
    """Two questions about one document, both reading from the end (held at a gate): b arrives once a has
    computed the document's first half, finds that on the GPU and reads the rest itself. The next step both
    compute the same quarter (b is more urgent, so it does not wait for a's blocks: workers.blocks_in_flight),
    then the reads are let go: both stop at the same block, and in the following step both meet them on the
    same blocks, so those are loaded twice (each request into its own GPU blocks; that used to fail the step's
    moves)."""
    document = tokens(73, PREFIX_BLOCKS * BLOCK)
    prompts = [document + tokens(74, 5), document + tokens(75, 5)]
    expected, reader = expected_and_reader(redis_server.url, prompts[0])
    uncached = make_engine(KVStoreConfig(prefix_caching=False))
    expected = [expected, uncached.generate([prompts[1]], GREEDY)[0].token_ids]
    end_reads, release = reader.tiers._end_reads, threading.Event()
    fetch = end_reads._fetch

    def held(hashes, prefix, read):
        assert release.wait(30), "the read was never released"
        return fetch(hashes, prefix, read)

    end_reads._fetch = held
    reader.add_request("a", prompts[0], GREEDY)
    reader.step()  # a computes the document's first half
    read_as_fast_as_computing(reader, PREFIX_BLOCKS // 2, samples=30)  # (the step measured the prefill anew)
    reader.add_request("b", prompts[1], GREEDY, priority=-1)
    assert reader.tiers.reading_from_end("a") and reader.tiers.reading_from_end("b")
    reader.step()  # each computes a quarter, the same one
    computed = [reader._requests[name].seq.num_computed_tokens for name in "ab"]
    assert computed[0] == computed[1] < PREFIX_BLOCKS * BLOCK
    release.set()
    for name in "ab":
        end_reads.future(name).result(timeout=30)
    loads_of = Counter()
    stage = reader.tiers._stage_leading

    def counted(staged, wanted):
        run = stage(staged, wanted)
        loads_of.update(wanted[:run])
        return run

    reader.tiers._stage_leading = counted
    done = reader.run_to_completion(["a", "b"])
    assert loads_of and set(loads_of.values()) == {2}  # every block met was loaded for both
    assert [d.token_ids for d in done] == expected
    assert sum(d.usage.cached_tokens.redis for d in done) > 0  # (the cost model may stop one read: its rate
    # is shared with the other's)
    assert not reader.tiers._staged and not reader.tiers._cpu_pins
    assert reader.block_pool.num_free == reader.block_pool.num_blocks


def test_questions_arriving_together_follow_the_first_one_s_read_from_the_end(redis_server):
    """Three questions about one document at once: the first computes the document while Redis reads it from
    the end; the other two neither read nor compute it, but wait until those meet and find it on the GPU."""
    document = tokens(76, PREFIX_BLOCKS * BLOCK)
    prompts = [document + tokens(77 + i, 5) for i in range(3)]
    expected, reader = expected_and_reader(redis_server.url, prompts[0])
    expected = [expected] + [c.token_ids for c in make_engine(KVStoreConfig(prefix_caching=False)).generate(
        prompts[1:], GREEDY)]
    runs_read: list[int] = []
    fetch = reader.tiers._end_reads._fetch

    def recorded(hashes, prefix, read):
        runs_read.append(len(hashes))
        return fetch(hashes, prefix, read)

    reader.tiers._end_reads._fetch = recorded
    computed_before = reader.stats.computed_tokens
    for i, prompt in enumerate(prompts):
        reader.add_request(str(i), prompt, GREEDY)
    assert [reader.tiers.reading_from_end(str(i)) for i in range(3)] == [True, False, False]
    done = reader.run_to_completion([str(i) for i in range(3)])
    assert [d.token_ids for d in done] == expected
    assert runs_read == [PREFIX_BLOCKS]  # one read of the document
    first, *others = [d.usage.cached_tokens for d in done]
    assert 0 < first.redis <= PREFIX_BLOCKS * BLOCK and [(c.gpu, c.redis) for c in others] == [
        (PREFIX_BLOCKS * BLOCK, 0)] * 2
    # the document computed once (up to where the read met it), and each question's tokens (the last token
    # generated is not computed)
    assert reader.stats.computed_tokens - computed_before == PREFIX_BLOCKS * BLOCK - first.redis + 3 * (
        5 + GREEDY.max_tokens - 1)
    assert reader.kv_store_stats()["redis"]["shared_reads"] == 2
    assert reader.block_pool.num_free == reader.block_pool.num_blocks


def test_a_follower_whose_leader_goes_first_reads_the_rest_of_the_document_itself(redis_server):
    """The first question's read is held while it computes the document's first blocks; it is aborted while
    the second follows it: the second reads from Redis the blocks the first did not compute, finds those it
    did on the GPU, keeps its read of its own question's blocks, and gets the uncached tokens."""
    document = tokens(78, PREFIX_BLOCKS * BLOCK)
    prompts = [document + tokens(79, 5), document + tokens(80, 2 * BLOCK + 5)]
    _, reader = expected_and_reader(redis_server.url, prompts[1])  # the follower's question is in Redis too
    expected = make_engine(KVStoreConfig(prefix_caching=False)).generate([prompts[1]], GREEDY)[0].token_ids
    release, fetch = threading.Event(), reader.tiers._end_reads._fetch

    def held(hashes, prefix, read):
        assert release.wait(30), "the read was never released"
        return fetch(hashes, prefix, read)

    reader.tiers._end_reads._fetch = held
    reader.add_request("leader", prompts[0], GREEDY)
    reader.add_request("follower", prompts[1], GREEDY)
    reader.step()
    assert reader.tiers._end_reads.leader_of("follower") == "leader"
    computed = reader._requests["leader"].seq.num_computed_tokens // BLOCK
    assert 0 < computed < PREFIX_BLOCKS
    question = block_hashes(prompts[1], BLOCK)[PREFIX_BLOCKS:]
    (question_read,) = reader.tiers._prefetches.get("follower").futures()
    for _ in range(30):  # Redis as fast as 1 TB/s, so the cost model lets the follower's own read run
        reader.cost_model.observe_fetch("redis", 10**12, 1.0)
    reader.abort("leader")
    release.set()
    assert reader.tiers._end_reads.leader_of("follower") is None
    prefetch = reader.tiers._prefetches.get("follower")
    assert prefetch.hashes == block_hashes(document, BLOCK)[computed:] + question  # its own read, of the rest
    assert prefetch.futures()[-1] is question_read
    (done,) = [c for c in reader.run_to_completion(["follower"]) if c.request_id == "follower"]
    assert done.token_ids == expected
    cached = done.usage.cached_tokens
    assert (cached.gpu, cached.redis) == (computed * BLOCK, (PREFIX_BLOCKS + 2 - computed) * BLOCK)
    assert reader.block_pool.num_free == reader.block_pool.num_blocks
