"""The cluster (real Ray, router, two workers, a real redis-server) serving random requests from several
clients while a worker is killed now and then (Ray restarts it), and Redis is killed and restarted, paused
or emptied: every stream ends with the tokens and text of an uncached offline run (seeded, sampled streams
and stop strings included), and none fails."""

from __future__ import annotations

import random
import threading
import time

import grpc
import pytest

from cluster.client import KvtierClient, build_request
from kvstore.config import KVStoreConfig
from tests.local_cluster import local_cluster
from tests.redis_server import RedisServer
from workers.engine import LLMEngine
from workers.engine_config import EngineConfig
from workers.sampling_params import SamplingParams

CHAOS_S = 30.0
DOCUMENTS = [[random.Random(i).randrange(3, 250) for _ in range(n)] for i, n in enumerate([80, 300, 700])]


def random_request(rng: random.Random) -> tuple[list[int], SamplingParams, str | None]:
    document = rng.choice(DOCUMENTS)
    question = [rng.randrange(3, 250) for _ in range(rng.randrange(1, 30))]
    prompt = document[: rng.randrange(1, len(document) + 1)] + question
    params = SamplingParams(max_tokens=rng.randrange(1, 100), temperature=rng.choice([0, 0.8]),
                            top_p=rng.choice([1.0, 0.9]), seed=rng.randrange(1000), ignore_eos=True,
                            stop=rng.choice([(), (), ("a",), ("\n",)]))
    return prompt, params, rng.choice([None, None, "tenant"])


@pytest.fixture(scope="module")
def chaos_cluster(tmp_path_factory):
    redis = RedisServer(tmp_path_factory.mktemp("chaos-redis")).start()
    overrides = {
        "kvstore": {"redis": {"url": redis.url, "breaker_reset_s": 0.5}, "cpu": {"capacity": "2MiB"}},
        "engine": {"cache": {"num_blocks": 160}},  # small pools: blocks travel to the CPU tier and Redis
        "workers": {"count": 2, "num_cpus": 0.5},
        "router": {"port": 0, "max_in_flight": 64},
    }
    with local_cluster(overrides, "kvtier-chaos-test") as handle:
        client = KvtierClient(handle.address)
        yield handle, client, redis
        client.close()
    redis.stop()


class Clients:
    """Threads sending one random request after another until ``ends``, each stream checked against the
    offline engine."""

    def __init__(self, client: KvtierClient, ends: float) -> None:
        self.client, self.ends = client, ends
        self.offline = LLMEngine.from_config(EngineConfig(), KVStoreConfig(prefix_caching=False), progress=False)
        self.lock = threading.Lock()
        self.exact, self.wrong, self.failed = 0, [], []

    def run(self, seed: int) -> None:
        rng = random.Random(seed)
        while time.monotonic() < self.ends:
            prompt, params, salt = random_request(rng)
            try:
                tokens, text = self._stream(prompt, params, salt)
            except grpc.RpcError as error:
                self.failed.append(f"{error.code().name}: {error.details()}")
                continue
            with self.lock:
                expected = self.offline.generate([prompt], params)[0]
            if (tokens, text) == (expected.token_ids, expected.text):
                self.exact += 1
            else:
                self.wrong.append((len(prompt), params))

    def _stream(self, prompt, params, salt) -> tuple[list[int], str]:
        tokens, text = [], ""
        for response in self.client.stream(build_request(prompt, params, salt), timeout_s=120):
            tokens += response.delta.token_ids
            text += response.delta.text
        return tokens, text


def break_things(handle, client: KvtierClient, redis: RedisServer, ends: float, done: list[str]) -> None:
    """Every few seconds, once both workers are healthy: kill one, or kill Redis (back 1-2 s later), pause it
    or empty it."""
    import ray

    rng = random.Random(5)
    while time.monotonic() < ends - 6:
        time.sleep(rng.uniform(3, 6))
        back_by = time.monotonic() + 60
        while not all(w.healthy for w in client.cluster_info().workers):
            if time.monotonic() > back_by:
                done.append("a worker stayed down")
                return
            time.sleep(0.2)
        fault = rng.choice(["kill worker", "kill worker", "kill redis", "pause redis", "flush redis"])
        if fault == "kill worker":
            ray.kill(handle.workers[rng.choice(list(handle.workers))], no_restart=False)
        elif fault == "kill redis":
            redis.kill()
            time.sleep(rng.uniform(1, 2))
            redis.start()
        elif fault == "pause redis":
            redis.pause()
            time.sleep(rng.uniform(0.2, 0.8))
            redis.resume()
        else:
            redis.client().flushall()
        done.append(fault)


def test_random_requests_while_workers_and_redis_fail_all_end_exact(chaos_cluster):
    handle, client, redis = chaos_cluster
    ends = time.monotonic() + CHAOS_S
    clients, faults = Clients(client, ends), []
    threads = [threading.Thread(target=clients.run, args=(seed,)) for seed in range(3)]
    threads.append(threading.Thread(target=break_things, args=(handle, client, redis, ends, faults)))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert "kill worker" in faults and "a worker stayed down" not in faults, faults
    assert not clients.failed and not clients.wrong, (clients.failed[:3], clients.wrong[:3], faults)
    assert clients.exact >= 30
