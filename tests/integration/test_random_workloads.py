"""Random workloads over shared prefixes with every tier on, against a real redis-server: two engines (two
workers) with small GPU pools (preemption), small step budgets (chunked prefill) and CPU tiers, several
prefetch threads, reads from the end on or off; requests with cache salts, greedy or seeded sampling,
arriving together or between steps, some aborted, and (in one test) of random priorities, so that requests
preempt each other for slots and blocks. Every request that is not aborted gets the tokens of a run
without caches, and every GPU block comes back. (Run three times on the code before requests admitted, or
meeting their reads, in one step could load the same block, one seed failed in each run, with KeyError in
the step's moves; which one depends on the threads' timing.) The same, with Redis killed and restarted,
paused, emptied and its values damaged between steps: Redis never changes a token nor keeps a block."""

from __future__ import annotations

import dataclasses
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from kvstore.config import CpuTierConfig, KVStoreConfig, RedisConfig
from tests.integration.test_kv_tiers import BLOCK, tokens
from tests.redis_server import RedisServer
from workers.engine import Completion, LLMEngine
from workers.engine_config import CacheConfig, EngineConfig, SchedulerConfig
from workers.sampler import TokenLogprobs
from workers.sampling_params import SamplingParams


@dataclass(frozen=True)
class Request:
    prompt: list[int]
    params: SamplingParams
    salt: str | None
    aborted: bool
    priority: int = 0


def random_waves(rng: random.Random, priorities: random.Random | None = None,
                 scoring: random.Random | None = None) -> list[list[Request]]:
    """Eight waves of 1-6 requests, each prompt a leading part of one of four documents (3, 10 or 25 blocks),
    then 1-39 tokens of its own; priorities drawn from ``priorities`` (all 0 without it; a second generator,
    so the rest of a seed's workload is the same either way), and from ``scoring`` whether a request asks for
    its prompt's log-probabilities and whether it has penalties (a third of them each; none without it)."""
    documents = [tokens(1000 + i, rng.choice([3, 10, 25]) * BLOCK) for i in range(4)]

    def request() -> Request:
        document = rng.choice(documents)
        prompt = document[: rng.randrange(1, len(document) + 1)] + tokens(rng.randrange(10**6), rng.randrange(1, 40))
        params = SamplingParams(max_tokens=rng.randrange(1, 24), temperature=rng.choice([0, 0.8]),
                                top_p=rng.choice([1.0, 0.9]), seed=rng.randrange(1000), ignore_eos=True)
        priority = priorities.choice([-1, 0, 0, 1, 2]) if priorities is not None else 0
        if scoring is not None and scoring.random() < 0.33:
            params = dataclasses.replace(params, prompt_logprobs=scoring.choice([0, 2]))
        if scoring is not None and scoring.random() < 0.33:
            params = dataclasses.replace(params, repetition_penalty=1.3, presence_penalty=0.8, frequency_penalty=0.4)
        return Request(prompt, params, rng.choice([None, None, "tenant-1", "tenant-2"]), rng.random() < 0.15,
                       priority)

    return [[request() for _ in range(rng.randrange(1, 7))] for _ in range(8)]


def engine(kvstore: KVStoreConfig, num_blocks: int, step_tokens: int, max_num_seqs: int) -> LLMEngine:
    config = EngineConfig(model="tiny", cache=CacheConfig(num_blocks=num_blocks),
                          scheduler=SchedulerConfig(max_num_batched_tokens=step_tokens, max_num_seqs=max_num_seqs))
    return LLMEngine.from_config(config, kvstore, progress=False)


def tiered_engine(rng: random.Random, redis_url: str, compute_while_reading: str,
                  breaker_reset_s: float = 2.0) -> LLMEngine:
    redis = RedisConfig(url=redis_url, compute_while_reading=compute_while_reading,
                        prefetch_threads=rng.choice([1, 2, 3]), breaker_reset_s=breaker_reset_s)
    kvstore = KVStoreConfig(cpu=CpuTierConfig(capacity=str(rng.choice([8, 40]) * 32 * 1024)), redis=redis)
    return engine(kvstore, rng.choice([30, 45, 64]), rng.choice([16, 48, 512]), rng.choice([2, 8]))


def uncached_runs(waves: list[list[Request]]) -> list[list[Completion]]:
    reference = engine(KVStoreConfig(prefix_caching=False), 4096, 8192, 64)
    expected = []
    for wave in waves:
        for i, request in enumerate(wave):
            reference.add_request(str(i), request.prompt, request.params, request.salt)
        expected.append(reference.run_to_completion([str(i) for i in range(len(wave))]))
    return expected


def uncached_tokens(waves: list[list[Request]]) -> list[list[list[int]]]:
    return [[done.token_ids for done in wave] for wave in uncached_runs(waves)]


def same_scores(found: list[TokenLogprobs], expected: list[TokenLogprobs]) -> bool:
    """Token for token, the same log-probabilities (to 1e-4: the chunks differ) and alternatives' values."""
    return len(found) == len(expected) and all(
        f.token_id == e.token_id and abs(f.logprob - e.logprob) < 1e-4
        and len(f.top) == len(e.top) and all(abs(a[1] - b[1]) < 1e-4 for a, b in zip(f.top, e.top))
        for f, e in zip(found, expected))


def run_wave(rng: random.Random, engine: LLMEngine, wave: list[Request], name: str,
             before_step: Callable[[], None] = lambda: None,
             scores: dict[str, list[TokenLogprobs]] | None = None) -> dict[str, list[int]]:
    """Submit the wave's requests, each followed by a step half the time; abort those to abort (after a step,
    half the time); step until the rest finish. Tokens by request id (and prompt logprobs into ``scores``)."""
    generated: dict[str, list[int]] = {}

    def step() -> None:
        before_step()
        for output in engine.step():
            generated.setdefault(output.request_id, []).extend(output.new_token_ids)
            if scores is not None:
                scores.setdefault(output.request_id, []).extend(output.prompt_logprobs)

    for i, request in enumerate(wave):
        engine.add_request(f"{name}-{i}", request.prompt, request.params, request.salt, priority=request.priority)
        if rng.random() < 0.5:
            step()
    for i, request in enumerate(wave):
        if request.aborted:
            if rng.random() < 0.5:
                step()
            engine.abort(f"{name}-{i}")
    while engine.has_unfinished():
        step()
    return generated


class RedisFaults:
    """Before a step, now and then: kill Redis (and start it again some steps later), pause it for up to
    0.8 s, or empty it; before a wave, more often than not, corrupt, truncate, replace or delete up to half of
    its values. ``done`` names each."""

    def __init__(self, server: RedisServer, rng: random.Random) -> None:
        self.server, self.rng = server, rng
        self.steps_down = 0
        self.paused_until = 0.0
        self.resume_later: threading.Timer | None = None
        self.done: list[str] = []

    def before_step(self) -> None:
        if time.monotonic() < self.paused_until:
            return
        if self.server.process is None:
            self.steps_down -= 1
            if self.steps_down <= 0:
                self.server.start()
                self.done.append("restart")
            return
        draw = self.rng.random()
        if draw < 0.02:
            self.server.kill()
            self.steps_down = self.rng.randrange(1, 20)
            self.done.append("kill")
        elif draw < 0.04:
            self._pause(self.rng.uniform(0.05, 0.8))
        elif draw < 0.045:
            self.server.client().flushall()
            self.done.append("flushall")

    def before_wave(self) -> None:
        if self.server.process is not None and time.monotonic() >= self.paused_until and self.rng.random() < 0.6:
            self._damage_values()

    def _pause(self, seconds: float) -> None:
        self.server.pause()
        self.paused_until = time.monotonic() + seconds + 0.05
        self.resume_later = threading.Timer(seconds, self.server.resume)
        self.resume_later.start()
        self.done.append(f"pause {seconds:.2f} s")

    def _damage_values(self) -> None:
        client = self.server.client()
        keys = list(client.scan_iter(count=1000))
        for key in self.rng.sample(keys, min(len(keys), self.rng.randrange(1, len(keys) // 2 + 2))):
            value = client.get(key) or b"?"
            at = self.rng.randrange(len(value))
            flipped = bytes(byte ^ 0x5A for byte in value[at : at + 256])  # same length: only a checksum sees it
            damaged = self.rng.choice([value[:at], value[:at] + flipped + value[at + 256 :],
                                       self.rng.randbytes(self.rng.randrange(1, 64)), None])
            client.set(key, damaged) if damaged is not None else client.delete(key)
            self.done.append("damage value")

    def stop(self) -> None:
        """Redis up and running again."""
        if self.resume_later is not None:
            self.resume_later.cancel()
        if self.server.process is None:
            self.server.start()
        self.server.resume()


def warmed_up(engines: list[LLMEngine]) -> list[LLMEngine]:
    for tiered in engines:  # measures the prefill rate the cost model needs
        tiered.generate([tokens(999, 3 * BLOCK + 1)], SamplingParams(max_tokens=2, temperature=0))
    return engines


@pytest.mark.parametrize("seed, with_priorities, with_scores", [
    *((seed, False, False) for seed in range(1, 13)), *((seed, True, False) for seed in range(1, 9)),
    *((seed, seed % 2 == 0, True) for seed in range(1, 7))])
def test_random_shared_prefix_workloads_give_the_uncached_tokens(redis_server, seed, with_priorities, with_scores):
    """(With scores: a third of the requests also ask for their prompt's log-probabilities, which read no
    cache but store what they compute, and get those of the uncached run; a third have penalties.)"""
    rng = random.Random(seed)
    waves = random_waves(rng, random.Random(-seed) if with_priorities else None,
                         random.Random(seed + 100) if with_scores else None)
    expected = uncached_runs(waves)
    compute_while_reading = rng.choice(["on", "off"])
    engines = warmed_up([tiered_engine(rng, redis_server.url, compute_while_reading) for _ in range(2)])
    for index, wave in enumerate(waves):
        tiered = engines[rng.randrange(2)]
        scores: dict[str, list[TokenLogprobs]] = {}
        generated = run_wave(rng, tiered, wave, str(index), scores=scores)
        for i, request in enumerate(wave):
            if not request.aborted:
                assert generated[f"{index}-{i}"] == expected[index][i].token_ids, f"wave {index}, request {i}"
                assert same_scores(scores[f"{index}-{i}"], expected[index][i].prompt_logprobs), f"wave {index}, {i}"
        assert tiered.block_pool.num_free == tiered.block_pool.num_blocks, f"wave {index}"
        assert not tiered.tiers._staged and not tiered.tiers._cpu_pins
        if rng.random() < 0.3:
            assert tiered.tiers.writer.flush()
    for tiered in engines:
        tiered.close()


@pytest.mark.parametrize("seed", range(1, 7))
def test_random_workloads_with_redis_killed_paused_emptied_and_its_values_damaged_give_the_uncached_tokens(
        redis_server, seed):
    rng = random.Random(seed)
    waves = random_waves(rng)
    expected = uncached_tokens(waves)
    compute_while_reading = rng.choice(["on", "off"])
    engines = warmed_up([tiered_engine(rng, redis_server.url, compute_while_reading, breaker_reset_s=0.2)
                         for _ in range(2)])
    faults = RedisFaults(redis_server, rng)
    try:
        for index, wave in enumerate(waves):
            tiered = engines[rng.randrange(2)]
            for engine_ in engines:  # (what one wrote, the other may read)
                engine_.tiers.writer.flush(timeout_s=2.0)
            faults.before_wave()
            generated = run_wave(rng, tiered, wave, str(index), faults.before_step)
            for i, request in enumerate(wave):
                if not request.aborted:
                    assert generated[f"{index}-{i}"] == expected[index][i], f"wave {index}, request {i}: {faults.done}"
            assert tiered.block_pool.num_free == tiered.block_pool.num_blocks, f"wave {index}"
    finally:
        faults.stop()
        for tiered in engines:
            tiered.close()
    assert faults.done  # every seed here meets at least one fault
