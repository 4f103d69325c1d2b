"""Requests arriving together whose prefixes the lower tiers hold, with a real redis-server: a short read is
not held up behind a long one, a prefix several requests want is read once, and requests admitted in the
same step share the blocks one of them loads. Every answer equals a run without caches."""

from __future__ import annotations

import threading

from kvstore.config import CpuTierConfig, KVStoreConfig
from kvstore.hashing import block_hashes
from tests.integration.test_kv_tiers import BLOCK, GREEDY, make_engine, redis_only, tokens


def uncached(prompts: list[list[int]]) -> list[list[int]]:
    engine = make_engine(KVStoreConfig(prefix_caching=False))
    return [done.token_ids for done in engine.generate(prompts, GREEDY)]


def written_to_redis(url: str, prompts: list[list[int]]) -> None:
    writer = make_engine(redis_only(url))
    writer.generate(prompts, GREEDY)
    writer.close()  # every block is in Redis


def step_until(engine, done) -> dict:
    """Step until ``done(finished)`` or nothing is left; each finished request's (tokens, cached tokens)."""
    finished, generated = {}, {}
    while engine.has_unfinished() and not done(finished):
        for out in engine.step():
            generated.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.finished:
                finished[out.request_id] = (generated[out.request_id], out.usage.cached_tokens)
    return finished


def hold_reads_from(engine, prompt: list[int]) -> threading.Event:
    """Hold the prefetch threads' Redis reads that start at ``prompt``'s first block until the event is set
    (the reads themselves are real)."""
    first_hash = block_hashes(prompt, BLOCK)[0]
    release = threading.Event()
    fetch = engine.tiers._prefetches.fetch

    def held(hashes, prefix, first_block):
        if hashes[0] == first_hash:
            assert release.wait(30), "the read was never released"
        return fetch(hashes, prefix, first_block)

    engine.tiers._prefetches.fetch = held
    return release


def long_and_short(redis_url: str, seed: int):
    """A 40-block and a 3-block prompt, both in Redis; their uncached tokens; a fresh reader (two prefetch
    threads) whose reads of the long one are held until the event is set."""
    long_prompt, short_prompt = tokens(seed, 40 * BLOCK) + [5], tokens(seed + 1, 3 * BLOCK) + [5]
    written_to_redis(redis_url, [long_prompt, short_prompt])
    expected = uncached([long_prompt, short_prompt])
    reader = make_engine(redis_only(redis_url, prefetch_threads=2))
    return (long_prompt, short_prompt), expected, reader, hold_reads_from(reader, long_prompt)


def test_a_short_prefix_is_not_held_up_behind_a_long_read(redis_server):
    """The long prefix's read is held; the second prefetch thread reads the short one, which is served from
    Redis and finishes meanwhile. With one thread, its read would queue behind the held one."""
    (long_prompt, short_prompt), expected, reader, release = long_and_short(redis_server.url, 80)
    reader.add_request("long", long_prompt, GREEDY)
    reader.add_request("short", short_prompt, GREEDY)
    try:
        finished = step_until(reader, lambda finished: "short" in finished)
        assert list(finished) == ["short"] and reader.tiers.prefetching("long")
    finally:
        release.set()
    (short_tokens, short_cached) = finished["short"]
    assert short_tokens == expected[1] and short_cached.redis == 3 * BLOCK
    long_tokens, long_cached = step_until(reader, lambda finished: False)["long"]
    assert long_tokens == expected[0] and long_cached.redis == 40 * BLOCK


def test_a_request_arriving_while_a_lone_long_read_runs_is_not_held_up_by_it(redis_server):
    """Nothing else runs while the long prefix is read (held): the steps wait for it a moment at a time, not
    for all of it, so a request arriving meanwhile is admitted and served."""
    (long_prompt, short_prompt), expected, reader, release = long_and_short(redis_server.url, 84)
    reader.add_request("long", long_prompt, GREEDY)
    try:
        assert reader.step() == [] and reader.tiers.prefetching("long")
        reader.add_request("short", short_prompt, GREEDY)
        finished = step_until(reader, lambda finished: "short" in finished)
        assert list(finished) == ["short"] and finished["short"][0] == expected[1]
    finally:
        release.set()
    assert step_until(reader, lambda finished: False)["long"][0] == expected[0]


def test_requests_wanting_one_prefix_read_it_once_and_share_its_blocks(redis_server):
    """Three requests arrive together: a 20-block document, then two questions about it. The document is
    read once (the other two share that read and read only their own blocks after it). The first admitted
    (whichever saw the read done first) loads the document's blocks; the others share those GPU blocks."""
    document = tokens(82, 20 * BLOCK)
    prompts = [document + tokens(83 + i, BLOCK + 3) for i in range(3)]
    written_to_redis(redis_server.url, [document + [1]])
    expected = uncached(prompts)
    reader = make_engine(redis_only(redis_server.url))
    for i, prompt in enumerate(prompts):
        reader.add_request(str(i), prompt, GREEDY)
    finished = step_until(reader, lambda finished: False)
    assert [finished[str(i)][0] for i in range(3)] == expected
    cached = [finished[str(i)][1] for i in range(3)]
    assert sorted((c.gpu, c.redis) for c in cached) == [(0, 20 * BLOCK), (20 * BLOCK, 0), (20 * BLOCK, 0)]
    stats = reader.kv_store_stats()["redis"]
    assert stats["shared_reads"] == 2 and stats["hit_blocks"] == 20
    assert stats["bytes_out"] == 20 * reader.cache_shape.bytes_per_block  # one load of each block
    assert reader.block_pool.num_free == reader.block_pool.num_blocks  # every shared block came back


def test_requests_admitted_together_share_the_blocks_one_loads_from_the_cpu_tier():
    """8 of the prefix's 10 blocks were evicted to the CPU tier; two requests for it arrive together and are
    admitted in one step: one load per block (the second request shares the first's), and the tokens of a run
    without caches. (Each used to look the blocks up and the step's moves failed on the second load.)"""
    prefix, other = tokens(86, 10 * BLOCK), tokens(87, 10 * BLOCK)
    prompts = [prefix + [5, 6, 7], prefix + [8, 9, 10]]
    expected = uncached(prompts)
    engine = make_engine(KVStoreConfig(cpu=CpuTierConfig(capacity="4MiB")), num_blocks=13)
    engine.generate([prefix + [1]], GREEDY)
    engine.generate([other + [1]], GREEDY)  # 11 blocks: the prefix's last 8 go from the GPU to the CPU tier
    assert engine.kv_store_stats()["cpu"]["stored_blocks"] == 8
    outputs = engine.generate(prompts, GREEDY)
    assert [done.token_ids for done in outputs] == expected
    assert [(done.usage.cached_tokens.gpu, done.usage.cached_tokens.cpu) for done in outputs] == [
        (2 * BLOCK, 8 * BLOCK), (10 * BLOCK, 0)]
    stats = engine.kv_store_stats()["cpu"]
    assert stats["hit_blocks"] == 8 and stats["bytes_out"] == 8 * engine.cache_shape.bytes_per_block


def test_a_document_read_for_one_request_is_shared_by_the_next_though_both_share_a_system_prompt(redis_server):
    """A 4-block system prompt, then one of two 10-block documents, then a question. a asks about the first
    document, b and c about the second, all at once: b shares a's read of the system prompt and reads the
    second document; c shares both reads. Redis is asked for each document's blocks once."""
    system, documents = tokens(90, 4 * BLOCK), [tokens(91, 10 * BLOCK), tokens(92, 10 * BLOCK)]
    prompts = [system + documents[0] + tokens(93, 5), system + documents[1] + tokens(94, 5),
               system + documents[1] + tokens(95, 5)]
    written_to_redis(redis_server.url, [system + document + [1] for document in documents])
    expected = uncached(prompts)
    reader = make_engine(redis_only(redis_server.url, prefetch_threads=2))
    asked: list[bytes] = []
    fetch = reader.tiers._prefetches.fetch

    def recorded(hashes, prefix, first_block):
        asked.extend(hashes)
        return fetch(hashes, prefix, first_block)

    reader.tiers._prefetches.fetch = recorded
    for i, prompt in enumerate(prompts):
        reader.add_request(str(i), prompt, GREEDY)
    finished = step_until(reader, lambda finished: False)
    assert [finished[str(i)][0] for i in range(3)] == expected
    assert sorted(asked) == sorted(block_hashes(prompts[0], BLOCK) + block_hashes(prompts[1], BLOCK)[4:])
    assert reader.kv_store_stats()["redis"]["shared_reads"] == 2
    assert sum(finished[str(i)][1].redis + finished[str(i)][1].gpu for i in range(3)) == 3 * 14 * BLOCK
