"""Operations with real Ray, gRPC, Redis and an HTTP scrape: the metrics agree with what the clients were told."""

from __future__ import annotations

import json
import random
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from cluster import cli
from cluster.client import KvtierClient
from tests.local_cluster import local_cluster
from tests.redis_server import RedisServer, free_port
from workers.sampling_params import SamplingParams

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
BLOCK = 16
STALL_TIMEOUT_S = 2.0
POLL_S = 2.0  # cluster.router_actor._STATS_EVERY_S


def tokens(seed: int, count: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 250) for _ in range(count)]


@pytest.fixture(scope="module")
def metered_cluster(tmp_path_factory):
    redis = RedisServer(tmp_path_factory.mktemp("ops-redis")).start()
    metrics_port = free_port()
    overrides = {"kvstore": {"redis": {"url": redis.url}}, "workers": {"count": 2, "num_cpus": 0.5},
                 "router": {"port": 0, "metrics_port": metrics_port, "stall_timeout_s": STALL_TIMEOUT_S}}
    with local_cluster(overrides, "kvtier-ops-test") as handle:
        client = KvtierClient(handle.address)
        yield client, f"http://127.0.0.1:{metrics_port}/metrics", handle, redis
        client.close()
    redis.stop()


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def total(samples: dict, name: str, **labels) -> float:
    wanted = set(labels.items())
    return sum(value for (sample, sample_labels), value in samples.items()
               if sample == name and wanted <= set(sample_labels))


def test_scraped_hit_counters_equal_the_cached_tokens_clients_were_told(metered_cluster):
    client, url, _, _ = metered_cluster
    prefixes = [tokens(seed, 160) for seed in (1, 2, 3)]
    prompts = [prefixes[i % 3] + tokens(100 + i, 9) for i in range(12)]
    with ThreadPoolExecutor(max_workers=3) as pool:
        completions = list(pool.map(lambda p: client.complete(p, GREEDY), prompts))
    told = {tier: sum(c.usage["cached_tokens"][tier] for c in completions) for tier in ("gpu", "cpu", "redis")}
    assert sum(told.values()) > 0  # the workload did reuse prefixes
    samples = scrape(url)
    for tier, tokens_told in told.items():
        assert total(samples, "kvtier_prefix_cache_hit_tokens_total", tier=tier) == tokens_told
    assert total(samples, "kvtier_prefix_cache_query_tokens_total") == sum(len(p) for p in prompts)
    assert total(samples, "kvtier_requests_total", outcome="finished") == len(prompts)
    assert total(samples, "kvtier_routing_decisions_total") == len(prompts)
    assert total(samples, "kvtier_ttft_seconds_count") == len(prompts)
    assert total(samples, "kvtier_requests_running") == 0
    # The workers' own tier counters (polled by the router) tell the same story, in blocks.
    deadline = time.monotonic() + 15
    while True:
        samples = scrape(url)
        worker_tokens = {tier: BLOCK * total(samples, "kvtier_tier_hit_blocks_total", tier=tier) for tier in told}
        if worker_tokens == told or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert worker_tokens == told
    assert {labels for (name, labels) in samples if name == "kvtier_worker_requests_running"} == {
        (("worker", "worker-0"),), (("worker", "worker-1"),)}
    for counter in ("kvtier_worker_preemptions_total", "kvtier_worker_priority_preemptions_total"):
        assert {labels for (name, labels) in samples if name == counter} == {
            (("worker", "worker-0"),), (("worker", "worker-1"),)}


def status(address: str, capsys, *flags: str) -> tuple[int, str]:
    code = cli.main(["status", "--server", address, *flags])
    return code, capsys.readouterr().out


def test_status_shows_every_worker_its_tiers_and_redis_health(metered_cluster, capsys):
    client, url, handle, redis = metered_cluster
    code, text = status(handle.address, capsys, "--json")
    assert code == 0
    report, stats = json.loads(text), client.stats()
    assert [w["worker_id"] for w in report["workers"]] == ["worker-0", "worker-1"]
    for worker in report["workers"]:
        tiers = stats.workers[worker["worker_id"]].tiers
        for tier in ("gpu", "cpu", "redis"):
            assert worker["tiers"][tier]["hit_blocks"] == tiers[tier].counters["hit_blocks"]
        assert worker["tiers"]["gpu"]["capacity_blocks"] == tiers["gpu"].counters["capacity_blocks"] > 0
        assert worker["tiers"]["cpu"]["capacity_blocks"] == tiers["cpu"].counters["capacity_blocks"] > 0
        assert worker["redis"]["up"] and worker["redis"]["used_memory_bytes"] > 0
        assert (worker["running"], worker["waiting"], worker["tensor_parallel_size"]) == (0, 0, 1)
    totals = report["totals"]
    assert sum(totals["tiers"][t]["hit_blocks"] for t in ("gpu", "cpu", "redis")) > 0  # the workload above
    hits = sum(totals["tiers"][t]["hit_rate"] for t in ("gpu", "cpu", "redis"))
    assert 0 < hits <= 1
    code, text = status(handle.address, capsys)
    assert code == 0 and "worker-0" in text and "worker-1" in text and "hit Redis" in text
    assert [line.split()[1] for line in text.splitlines() if line.startswith("worker-")][-2:] == ["up", "up"]
    redis.kill()
    try:
        code, text = status(handle.address, capsys)
        assert code == 0  # the cluster still serves: Redis is a cache
        assert [line.split()[1] for line in text.splitlines() if line.startswith("worker-")][-2:] == ["DOWN", "DOWN"]
        deadline = time.monotonic() + 3 * POLL_S + 5
        while total(scrape(url), "kvtier_redis_up") != 0:
            assert time.monotonic() < deadline, "kvtier_redis_up stayed 1 with Redis dead"
            time.sleep(0.5)
    finally:
        redis.start()
    samples = scrape(url)
    capacity = total(samples, "kvtier_tier_capacity_blocks", tier="gpu")
    assert capacity == sum(w["tiers"]["gpu"]["capacity_blocks"] for w in report["workers"])


def test_status_watch_prints_a_fresh_report_until_interrupted(metered_cluster):
    import signal
    import subprocess
    import sys

    _, _, handle, _ = metered_cluster
    watcher = subprocess.Popen([sys.executable, "-m", "cluster.cli", "status", "--server", handle.address,
                                "--watch", "0.2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    reports = 0
    for line in watcher.stdout:
        reports += "kvtier at " in line
        if reports == 3:
            break
    watcher.send_signal(signal.SIGINT)
    assert watcher.wait(timeout=30) == 0
    assert reports == 3


def readiness(client: KvtierClient) -> int:
    request = health_pb2.HealthCheckRequest(service="kvtier.v1.Generation")
    return health_pb2_grpc.HealthStub(client.channel).Check(request, timeout=5).status


def test_a_stalled_engine_turns_readiness_off_within_the_configured_time(metered_cluster):
    import ray

    client, _, handle, _ = metered_cluster
    assert readiness(client) == health_pb2.HealthCheckResponse.SERVING
    ray.get([worker.hold_steps_for_test.remote(12.0) for worker in handle.workers.values()])
    held_at = time.monotonic()
    with ThreadPoolExecutor(max_workers=2) as pool:
        pending = [pool.submit(client.complete, tokens(200 + i, 40), GREEDY) for i in range(2)]
        while readiness(client) == health_pb2.HealthCheckResponse.SERVING:
            assert time.monotonic() - held_at < STALL_TIMEOUT_S + 2 * POLL_S + 2, "readiness stayed on"
            time.sleep(0.1)
        noticed_after = time.monotonic() - held_at
        assert noticed_after > STALL_TIMEOUT_S  # not before the engine was stalled for the configured time
        completions = [future.result(timeout=60) for future in pending]  # the hold ends: they finish
    assert all(len(c.token_ids) == GREEDY.max_tokens for c in completions)
    deadline = time.monotonic() + 3 * POLL_S + 2
    while readiness(client) != health_pb2.HealthCheckResponse.SERVING:
        assert time.monotonic() < deadline, "readiness did not come back"
        time.sleep(0.1)


def test_a_hung_worker_process_gets_no_new_requests_once_it_answers_nothing_for_the_stall_timeout(metered_cluster):
    """SIGSTOP one worker's process (its sockets stay open, so no call fails; nothing reports its steps): after
    ``stall_timeout_s`` without a stats answer it takes no new request, and a request for the prefix it holds
    goes to the other worker (it went to the hung one and waited out its deadline), readiness staying on."""
    import os
    import signal

    import ray

    client, _, handle, _ = metered_cluster
    prefix = tokens(300, 160)
    holder = client.complete(prefix + tokens(301, 9), GREEDY).worker_id
    pid = ray.get(handle.workers[holder].__ray_call__.remote(lambda actor: os.getpid()))
    os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(STALL_TIMEOUT_S + 4 * POLL_S + 1)  # (a silent round lasts two: the sleep, then the timeout)
        served = [client.complete(prefix + tokens(302 + i, 9), GREEDY, timeout_s=15) for i in range(3)]
        assert readiness(client) == health_pb2.HealthCheckResponse.SERVING
    finally:
        os.kill(pid, signal.SIGCONT)
    assert all(c.worker_id != holder for c in served)
    assert all(len(c.token_ids) == GREEDY.max_tokens for c in served)
    wait_until_it_takes_requests(handle, holder)  # it answers again


def wait_until_it_takes_requests(handle, worker_id: str, timeout_s: float = 60) -> None:
    """Until the router's worker pool has the worker healthy and not stalled."""
    import ray

    def state(router) -> tuple[bool, bool]:
        worker = router.pool.workers[worker_id]
        return worker.healthy, worker.stalled

    deadline = time.monotonic() + timeout_s
    while ray.get(handle.router.__ray_call__.remote(state)) != (True, False):
        assert time.monotonic() < deadline, f"worker {worker_id} took no request after it resumed"
        time.sleep(0.5)


def test_a_stream_on_a_worker_that_hangs_moves_to_another_worker_with_no_token_lost_or_repeated(metered_cluster):
    """SIGSTOP the worker serving a seeded, sampled stream after 20 tokens: once it is stalled, the router
    cancels its call and resumes the stream on the other worker, and the client gets the unbroken run's tokens
    and text (before, the stream waited on the hung worker until its deadline)."""
    import os
    import signal

    import ray

    from cluster.client import build_request
    from kvstore.config import KVStoreConfig
    from workers.engine import LLMEngine
    from workers.engine_config import EngineConfig

    client, url, handle, _ = metered_cluster
    params = SamplingParams(max_tokens=300, temperature=0.8, top_p=0.95, seed=91, ignore_eos=True)
    prompt = tokens(400, 50)
    moved_before = total(scrape(url), "kvtier_stream_migrations_total", reason="stalled")
    stream = client.stream(build_request(prompt, params), timeout_s=60)
    received, text = [], ""
    for response in stream:
        received += response.delta.token_ids
        text += response.delta.text
        if len(received) >= 20:
            break
    (busy,) = [w.worker_id for w in client.cluster_info().workers if w.load > 0]
    pid = ray.get(handle.workers[busy].__ray_call__.remote(lambda actor: os.getpid()))
    os.kill(pid, signal.SIGSTOP)
    try:
        for response in stream:
            if response.HasField("delta"):
                received += response.delta.token_ids
                text += response.delta.text
            else:
                final = response.final
    finally:
        os.kill(pid, signal.SIGCONT)
    offline = LLMEngine.from_config(EngineConfig(), KVStoreConfig(prefix_caching=False), progress=False)
    unbroken = offline.generate([prompt], params)[0]
    assert (received, text) == (unbroken.token_ids, unbroken.text)
    assert final.worker_id != busy and final.usage.completion_tokens == 300
    assert total(scrape(url), "kvtier_stream_migrations_total", reason="stalled") == moved_before + 1
    wait_until_it_takes_requests(handle, busy)
