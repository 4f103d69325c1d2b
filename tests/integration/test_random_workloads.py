"""Random workloads over shared prefixes with every tier on, against a real redis-server: two engines (two
workers) with small GPU pools (preemption) and CPU tiers, several prefetch threads, reads from the end on or
off, requests of a wave arriving together or between steps. Every request's tokens equal a run without
caches, and every GPU block comes back. (Run on the code before requests admitted, or meeting their reads,
in one step could load the same block, seeds 1, 5, 9, 10 and 12 failed: KeyError in the step's moves.)"""

from __future__ import annotations

import random

import pytest

from kvstore.config import CpuTierConfig, KVStoreConfig, RedisConfig
from tests.integration.test_kv_tiers import BLOCK, make_engine, tokens
from workers.sampling_params import SamplingParams


def random_waves(rng: random.Random) -> list[list[list[int]]]:
    """Six waves of 1-5 prompts, each a leading part of one of four documents (3, 10 or 25 blocks), then
    1-39 tokens of its own."""
    documents = [tokens(1000 + i, rng.choice([3, 10, 25]) * BLOCK) for i in range(4)]

    def prompt() -> list[int]:
        document = rng.choice(documents)
        return document[: rng.randrange(1, len(document) + 1)] + tokens(rng.randrange(10**6), rng.randrange(1, 40))

    return [[prompt() for _ in range(rng.randrange(1, 6))] for _ in range(6)]


def tiered_engine(rng: random.Random, redis_url: str, compute_while_reading: str):
    redis = RedisConfig(url=redis_url, compute_while_reading=compute_while_reading,
                        prefetch_threads=rng.choice([1, 2, 3]))
    kvstore = KVStoreConfig(cpu=CpuTierConfig(capacity=str(rng.choice([8, 40]) * 32 * 1024)), redis=redis)
    return make_engine(kvstore, num_blocks=rng.choice([30, 45, 64]))


def run_wave(rng: random.Random, engine, wave: list[list[int]], params: SamplingParams, name: str) -> list:
    """Submit the wave's prompts, each followed by a step half the time; step until all finish."""
    generated: dict[str, list[int]] = {}

    def collect(outputs) -> None:
        for output in outputs:
            generated.setdefault(output.request_id, []).extend(output.new_token_ids)

    ids = [f"{name}-{i}" for i in range(len(wave))]
    for request_id, prompt in zip(ids, wave):
        engine.add_request(request_id, prompt, params)
        if rng.random() < 0.5:
            collect(engine.step())
    while engine.has_unfinished():
        collect(engine.step())
    return [generated[request_id] for request_id in ids]


@pytest.mark.parametrize("seed", range(1, 13))
def test_random_shared_prefix_workloads_give_the_uncached_tokens(redis_server, seed):
    rng = random.Random(seed)
    waves = random_waves(rng)
    params = SamplingParams(max_tokens=rng.randrange(1, 24), temperature=0, ignore_eos=True)
    uncached = make_engine(KVStoreConfig(prefix_caching=False), num_blocks=4096)
    expected = [[done.token_ids for done in uncached.generate(wave, params)] for wave in waves]
    compute_while_reading = rng.choice(["on", "off"])
    engines = [tiered_engine(rng, redis_server.url, compute_while_reading) for _ in range(2)]
    for engine in engines:  # measures the prefill rate the cost model needs
        engine.generate([tokens(999, 3 * BLOCK + 1)], params)
    for index, wave in enumerate(waves):
        engine = engines[rng.randrange(2)]
        assert run_wave(rng, engine, wave, params, str(index)) == expected[index], f"wave {index}"
        assert engine.block_pool.num_free == engine.block_pool.num_blocks, f"wave {index}"
        assert not engine.tiers._staged and not engine.tiers._cpu_pins
        if rng.random() < 0.5:
            assert engine.tiers.writer.flush()
    for engine in engines:
        engine.close()
