"""The cluster with real Ray, real gRPC and a real redis-server, on CPU: routing by cached prefix, a killed
worker (its prefix found again in Redis), streaming and cancellation, the bad-input matrix, overload, health."""

from __future__ import annotations

import random
import threading
import time

import grpc
import pytest

from cluster.client import KvtierClient, build_request
from kvstore.config import KVStoreConfig
from protos.kvtier.v1 import generation_pb2 as pb
from tests.local_cluster import local_cluster
from tests.redis_server import RedisServer
from workers.engine import LLMEngine
from workers.engine_config import EngineConfig
from workers.sampling_params import SamplingParams

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
rng = random.Random(11)
PREFIX = [rng.randrange(3, 250) for _ in range(1500)]


def question(seed: int) -> list[int]:
    return [random.Random(seed).randrange(3, 250) for _ in range(20)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    redis = RedisServer(tmp_path_factory.mktemp("cluster-redis")).start()
    overrides = {
        "kvstore": {"redis": {"url": redis.url}},
        "workers": {"count": 2, "num_cpus": 0.5},
        "router": {"port": 0, "max_in_flight": 4},
    }
    try:
        with local_cluster(overrides, "kvtier-test") as handle:
            client = KvtierClient(handle.address)
            yield handle, client, redis
            client.close()
    finally:
        redis.stop()  # (also when the cluster failed to start)


@pytest.fixture(scope="module")
def offline():
    return LLMEngine.from_config(EngineConfig(), KVStoreConfig(prefix_caching=False), progress=False)


def expected(offline: LLMEngine, prompt: list[int]) -> list[int]:
    return offline.generate([prompt], GREEDY)[0].token_ids


def wait_until(condition, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_tokens_through_the_router_equal_the_offline_engine(cluster, offline):
    _, client, _ = cluster
    prompt = question(1) * 3
    assert client.complete(prompt, GREEDY).token_ids == expected(offline, prompt)
    text = client.complete("Hello, kvtier", GREEDY)
    assert text.token_ids == offline.generate(["Hello, kvtier"], GREEDY)[0].token_ids
    penalized = SamplingParams(max_tokens=24, temperature=0.8, seed=5, ignore_eos=True, repetition_penalty=1.4,
                               presence_penalty=1.0, frequency_penalty=0.5)
    remote = client.complete(prompt, penalized).token_ids
    assert remote == offline.generate([prompt], penalized)[0].token_ids != client.complete(
        prompt, SamplingParams(max_tokens=24, temperature=0.8, seed=5, ignore_eos=True)).token_ids
    first = expected(offline, prompt)[0]
    held = SamplingParams(max_tokens=12, temperature=0, stop_token_ids=(first,), min_tokens=4)
    remote = client.complete(prompt, held)
    assert remote.token_ids == offline.generate([prompt], held)[0].token_ids and first not in remote.token_ids[:4]


def test_shared_prefix_requests_follow_the_prefix_and_survive_its_worker(cluster, offline):
    import ray

    handle, client, _ = cluster
    first = client.complete(PREFIX + question(100), GREEDY)
    holder = first.worker_id
    followers = [client.complete(PREFIX + question(101 + i), GREEDY) for i in range(5)]
    assert {f.worker_id for f in followers} == {holder}
    assert all(f.usage["cached_tokens"]["gpu"] >= 1488 for f in followers)
    time.sleep(0.5)  # the holder's write-behind lands its blocks in Redis

    ray.kill(handle.workers[holder], no_restart=False)
    after = client.complete(PREFIX + question(200), GREEDY, timeout_s=120)
    assert after.worker_id != holder
    assert after.usage["cached_tokens"]["redis"] > 0
    assert after.token_ids == expected(offline, PREFIX + question(200))

    def holder_healthy() -> bool:
        workers = {w.worker_id: w for w in client.cluster_info().workers}
        return workers[holder].healthy

    wait_until(holder_healthy)  # Ray restarted it; the supervisor reconnected it
    address = {w.worker_id: w.address for w in client.cluster_info().workers}[holder]
    direct = KvtierClient(address)
    assert direct.complete(question(300), GREEDY).token_ids == expected(offline, question(300))
    direct.close()


def test_streaming_is_incremental_and_cancelling_frees_the_worker(cluster):
    _, client, _ = cluster
    request = build_request(question(7) * 4, SamplingParams(max_tokens=400, temperature=0, ignore_eos=True))
    stream = client.stream(request)
    deltas = [next(stream) for _ in range(3)]
    assert all(d.HasField("delta") and len(d.delta.token_ids) >= 1 for d in deltas)
    stream.cancel()

    def idle() -> bool:
        stats = client.stats().workers
        return all(w.engine["running"] == 0 and w.engine["waiting"] == 0
                   and w.tiers["gpu"].counters["used_blocks"] == 0 for w in stats.values())

    wait_until(idle, timeout_s=30)


BAD_REQUESTS = [
    ("empty prompt", pb.GenerateRequest(text=""), "prompt"),
    ("no prompt", pb.GenerateRequest(), "prompt"),
    ("token id >= vocab", pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 100000])), "prompt_token_ids[1]"),
    ("max_tokens 0", pb.GenerateRequest(text="x", max_tokens=0), "max_tokens"),
    ("max_tokens < 0", pb.GenerateRequest(text="x", max_tokens=-3), "max_tokens"),
    ("too long", pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5] * 4000), max_tokens=200), "max_tokens"),
    ("temperature < 0", pb.GenerateRequest(text="x", sampling=pb.SamplingParams(temperature=-1)), "temperature"),
    ("top_p > 1", pb.GenerateRequest(text="x", sampling=pb.SamplingParams(top_p=1.5)), "top_p"),
    ("too many stops", pb.GenerateRequest(text="x", stop=[str(i) for i in range(17)]), "stop"),
    ("all resumed", pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 6]), resumed_tokens=2), "resumed_tokens"),
    ("resumed text", pb.GenerateRequest(text="xy", resumed_tokens=1), "resumed_tokens"),
]


@pytest.mark.parametrize("name, request_, field", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_input_is_invalid_argument_naming_the_field(cluster, name, request_, field):
    _, client, _ = cluster
    with pytest.raises(grpc.RpcError) as caught:
        list(client.stream(request_))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith(f"{field}: ")
    assert client.complete([5, 6, 7], GREEDY).finish_reason == "length"  # still serving


def test_a_message_over_the_size_limit_is_refused(cluster):
    _, client, _ = cluster
    huge = pb.GenerateRequest(text="x" * (4 * 2**20))
    with pytest.raises(grpc.RpcError) as caught:
        list(client.stream(huge))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert client.complete([5, 6, 7], GREEDY).finish_reason == "length"


def test_a_burst_over_the_admission_limit_gets_fast_resource_exhausted(cluster, offline):
    _, client, _ = cluster
    prompts = [question(400 + i) for i in range(12)]  # 3x the limit of 4
    results: list = [None] * len(prompts)
    params = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)

    def call(index: int) -> None:
        began = time.monotonic()
        try:
            results[index] = ("ok", client.complete(prompts[index], params).token_ids)
        except grpc.RpcError as error:
            results[index] = (error.code(), time.monotonic() - began)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    refused = [r for r in results if r[0] == grpc.StatusCode.RESOURCE_EXHAUSTED]
    served = [(i, r) for i, r in enumerate(results) if r[0] == "ok"]
    assert refused and served and len(refused) + len(served) == len(prompts)
    assert all(seconds < 1.0 for _, seconds in refused)
    for index, (_, tokens) in served:
        assert tokens == offline.generate([prompts[index]], params)[0].token_ids


def test_health_and_reflection(cluster):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    _, client, _ = cluster
    health = health_pb2_grpc.HealthStub(client.channel)
    for service in ("", "kvtier.v1.Generation"):
        status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(client.channel)
    responses = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for s in next(responses).list_services_response.service}
    assert "kvtier.v1.Generation" in names


def broken_mid_stream(cluster, offline, params: SamplingParams, prompt: list[int], break_worker,
                      prompt_scores: list | None = None) -> tuple:
    """Stream ``prompt``, call ``break_worker(handle, worker id)`` on the worker serving it after 20 tokens,
    read the rest: (tokens, text, final message, the broken worker's id, the unbroken run). The PromptLogprobs
    messages go to ``prompt_scores``."""
    handle, client, _ = cluster
    wait_until(lambda: all(w.healthy for w in client.cluster_info().workers))
    stream = client.stream(build_request(prompt, params))
    received, text, final = [], "", None
    for response in stream:
        if response.HasField("prompt_logprobs"):
            prompt_scores.append(response.prompt_logprobs)
        received += response.delta.token_ids
        text += response.delta.text
        if len(received) >= 20:
            break
    (busy,) = [w.worker_id for w in client.cluster_info().workers if w.load > 0]
    break_worker(handle, busy)
    for response in stream:
        if response.HasField("delta"):
            received += response.delta.token_ids
            text += response.delta.text
        elif response.HasField("prompt_logprobs"):
            prompt_scores.append(response.prompt_logprobs)
        else:
            final = response.final
    return received, text, final, busy, offline.generate([prompt], params)[0]


def test_a_worker_killed_mid_stream_is_migrated_without_a_lost_or_repeated_token(cluster, offline):
    """A seeded, sampled stream: after the move it draws what the unbroken run draws, and its text is whole."""
    import ray

    prompt = question(500) * 2
    params = SamplingParams(max_tokens=300, temperature=0.8, top_p=0.95, seed=77, ignore_eos=True)
    received, text, final, busy, unbroken = broken_mid_stream(
        cluster, offline, params, prompt, lambda handle, busy: ray.kill(handle.workers[busy], no_restart=False))
    assert received == unbroken.token_ids and text == unbroken.text
    assert final.worker_id != busy and final.usage.completion_tokens == 300
    assert final.usage.prompt_tokens == len(prompt) and final.seed == 77


def test_a_stream_migrated_after_its_prompt_logprobs_does_not_send_them_again(cluster, offline):
    """The prompt's log-probabilities come once, before the first token, in pieces of 1,024 positions; the
    worker is killed after 20 tokens and the next one, resuming, does not compute or send them again."""
    import ray

    prompt = PREFIX + question(502)
    params = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True, prompt_logprobs=1)
    pieces = []
    received, _, final, busy, unbroken = broken_mid_stream(
        cluster, offline, params, prompt, lambda handle, busy: ray.kill(handle.workers[busy], no_restart=False),
        pieces)
    assert received == unbroken.token_ids and final.worker_id != busy
    assert [(piece.start, len(piece.logprobs)) for piece in pieces] == [(1, 1024), (1025, len(prompt) - 1025)]
    scores = [found for piece in pieces for found in piece.logprobs]
    assert [found.token_id for found in scores] == prompt[1:]
    assert [found.logprob for found in scores] == pytest.approx([s.logprob for s in unbroken.prompt_logprobs],
                                                                abs=1e-5)


def test_a_stream_whose_worker_loses_a_rank_moves_on_to_another_worker(cluster, offline):
    """A step fails mid-stream as with a dead tensor-parallel rank: the worker answers UNAVAILABLE, so the
    router moves the stream on; the client gets the unbroken run's tokens and text, and no error (before, it
    got INTERNAL). The worker exits and Ray restarts it. The request is sampled without a seed: the router
    draws one before the first worker, the next worker goes on with it, and the final message tells it, so
    the run can be repeated (before, each worker drew its own and told none)."""
    import dataclasses

    import ray

    def lose_a_rank(handle, busy):
        ray.get(handle.workers[busy].fail_next_step_for_test.remote("rank 1 died (test)", rank_died=True))

    params = SamplingParams(max_tokens=200, temperature=0.8, ignore_eos=True)
    _, client, _ = cluster
    wait_until(lambda: all(w.healthy for w in client.cluster_info().workers))
    direct = KvtierClient(client.cluster_info().workers[0].address)  # one worker draws a seed, the other not:
    direct.complete([5, 6, 7], SamplingParams(max_tokens=2))  # their next draws (engine.seed 0) differ
    direct.close()
    prompt = question(600) * 2
    received, text, final, busy, _ = broken_mid_stream(cluster, offline, params, prompt, lose_a_rank)
    assert final.HasField("seed") and final.worker_id != busy
    unbroken = offline.generate([prompt], dataclasses.replace(params, seed=final.seed))[0]
    assert (received, text) == (unbroken.token_ids, unbroken.text)
    _, client, _ = cluster
    wait_until(lambda: all(w.healthy for w in client.cluster_info().workers))


def test_a_step_error_of_no_known_cause_is_not_carried_to_every_worker(cluster, offline):
    """The request itself may be what broke the step: the client gets INTERNAL, and only that worker restarts
    (moved on, such a request could take every worker down in turn)."""
    import ray

    def break_a_step(handle, busy):
        ray.get(handle.workers[busy].fail_next_step_for_test.remote("a step raised (test)", rank_died=False))

    with pytest.raises(grpc.RpcError) as caught:
        broken_mid_stream(cluster, offline, SamplingParams(max_tokens=200, temperature=0, ignore_eos=True),
                          question(601) * 2, break_a_step)
    assert caught.value.code() == grpc.StatusCode.INTERNAL and "a step raised (test)" in caught.value.details()
    _, client, _ = cluster
    wait_until(lambda: not all(w.healthy for w in client.cluster_info().workers), timeout_s=30)  # it exits,
    wait_until(lambda: all(w.healthy for w in client.cluster_info().workers))  # and Ray restarts it


def test_logprobs_and_prompt_logprobs_stream_through_the_router_as_the_offline_engine_computes_them(cluster, offline):
    from cluster.client import logprobs_record

    _, client, _ = cluster
    params = SamplingParams(max_tokens=12, temperature=0.7, seed=3, ignore_eos=True, logprobs=3)
    remote = client.complete(question(950), params)
    (local,) = offline.generate([question(950)], params)
    assert remote.token_ids == local.token_ids and len(remote.logprobs) == 12
    expected = [logprobs_record(lp.token_id, lp.logprob, lp.top) for lp in local.logprobs]
    for got, want in zip(remote.logprobs, expected):  # (to float32 on the wire; a worker's batch may differ)
        assert got["token_id"] == want["token_id"] and [t for t, _ in got["top"]] == [t for t, _ in want["top"]]
        assert got["logprob"] == pytest.approx(want["logprob"], abs=1e-5)
        assert [v for _, v in got["top"]] == pytest.approx([v for _, v in want["top"]], abs=1e-5)
    assert client.complete(question(950), GREEDY).logprobs == []  # not asked for, not sent
    scoring = SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=2)
    remote = client.complete(question(950), scoring)  # (its blocks are cached now: they are not read)
    (local,) = offline.generate([question(950)], scoring)
    assert remote.token_ids == local.token_ids and remote.usage["cached_tokens"] == {"gpu": 0, "cpu": 0, "redis": 0}
    assert [got["token_id"] for got in remote.prompt_logprobs] == question(950)[1:]
    assert [got["logprob"] for got in remote.prompt_logprobs] == pytest.approx(
        [found.logprob for found in local.prompt_logprobs], abs=1e-5)
    assert [[t for t, _ in got["top"]] for got in remote.prompt_logprobs] == [
        [t for t, _ in found.top] for found in local.prompt_logprobs]


def test_a_deadline_ends_the_stream_with_deadline_exceeded(cluster):
    _, client, _ = cluster
    request = build_request(question(800) * 4, SamplingParams(max_tokens=2000, temperature=0, ignore_eos=True))
    with pytest.raises(grpc.RpcError) as caught:
        list(client.stream(request, timeout_s=0.5))
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert client.complete([5, 6, 7], GREEDY).finish_reason == "length"


def test_workers_report_measured_rates_for_the_router(cluster):
    _, client, _ = cluster
    client.complete(question(900) * 20, GREEDY)  # a prefill-heavy step gets measured
    reports = [dict(w.engine) for w in client.stats().workers.values()]
    assert all(r["kv_bytes_per_token"] == 2048 for r in reports)  # tiny: 32 KiB per 16-token block
    assert any(r.get("prefill_tokens_per_s", 0) > 0 for r in reports)


def test_the_cli_against_the_cluster_prints_what_the_offline_cli_prints(cluster):
    import json
    import subprocess
    import sys
    from pathlib import Path

    handle, client, _ = cluster
    kvtier = str(Path(sys.executable).parent / "kvtier")
    flags = ["--prompt", "Hello there", "--prompt-token-ids", "5,6,7,8", "--max-tokens", "6", "--temperature", "0",
             "--ignore-eos", "--json", "--quiet"]
    remote = subprocess.run([kvtier, "generate", "--server", handle.address, *flags], capture_output=True, text=True,
                            timeout=120)
    local = subprocess.run([kvtier, "generate", "--model", "tiny", "--no-cache", *flags], capture_output=True,
                           text=True, timeout=120)
    assert remote.returncode == 0 and local.returncode == 0, remote.stderr + local.stderr

    def comparable(line: str) -> dict:
        """Everything but where cached tokens came from (the cluster's caches may be warm)."""
        record = json.loads(line)
        usage = record.pop("usage")
        assert set(usage["cached_tokens"]) == {"gpu", "cpu", "redis"}
        return record | {"prompt_tokens": usage["prompt_tokens"], "completion_tokens": usage["completion_tokens"]}

    remote_records = [comparable(line) for line in remote.stdout.splitlines()]
    assert len(remote_records) == 2
    assert remote_records == [comparable(line) for line in local.stdout.splitlines()]
    streamed = subprocess.run([kvtier, "generate", "--server", handle.address, "--stream",
                               *[flag for flag in flags[2:] if flag != "--json"]], capture_output=True, timeout=120)
    assert streamed.returncode == 0 and streamed.stdout.decode() == remote_records[1]["text"] + "\n"
    wait_until(lambda: client.cluster_info().ready)  # a worker killed by an earlier test may still be restarting
    status = subprocess.run([kvtier, "status", "--server", handle.address], capture_output=True, text=True,
                            timeout=60)
    assert status.returncode == 0, status.stderr
    assert "worker-0" in status.stdout and "worker-1" in status.stdout and "policy cache_aware" in status.stdout


def test_a_flush_through_the_router_empties_every_tier_of_every_worker(cluster, offline):
    import subprocess
    import sys
    from pathlib import Path

    handle, client, redis = cluster
    wait_until(lambda: all(w.healthy for w in client.cluster_info().workers))
    document = [random.Random(88).randrange(3, 250) for _ in range(400)]
    client.complete(document + question(801), GREEDY)
    assert client.complete(document + question(802), GREEDY).usage["cached_tokens"]["gpu"] >= 384  # it is cached
    kvtier = str(Path(sys.executable).parent / "kvtier")
    flushed = subprocess.run([kvtier, "cache", "flush", "--server", handle.address], capture_output=True, text=True,
                             timeout=120)
    assert flushed.returncode == 0, flushed.stderr
    lines = flushed.stdout.splitlines()
    assert [line.split(":")[0] for line in lines[:2]] == ["worker-0", "worker-1"]
    gpu_dropped = sum(int(line.split("dropped ")[1].split(" ")[0]) for line in lines[:2])
    assert gpu_dropped >= 25 and lines[2].startswith("Redis: deleted ")  # the document's 25 blocks, at least
    assert int(lines[2].split()[2]) > 0 and not redis.client().keys("kvtier:*")
    after = client.complete(document + question(803), GREEDY)
    assert after.usage["cached_tokens"] == {"gpu": 0, "cpu": 0, "redis": 0}  # computed again, everywhere
    assert after.token_ids == expected(offline, document + question(803))

def test_a_flush_names_a_worker_it_could_not_flush(cluster):
    import ray

    handle, client, _ = cluster
    wait_until(lambda: all(w.healthy for w in client.cluster_info().workers))
    ray.kill(handle.workers["worker-1"], no_restart=False)
    wait_until(lambda: not {w.worker_id: w.healthy for w in client.cluster_info().workers}["worker-1"])
    response = client.flush_cache()  # (before Ray has restarted it, which takes seconds)
    assert list(response.not_flushed) == ["worker-1"] and list(response.workers) == ["worker-0"]
    assert not response.redis_error  # worker-0 flushed Redis
    wait_until(lambda: all(w.healthy for w in client.cluster_info().workers))


def test_a_flush_that_could_not_reach_redis_says_so_and_the_cli_exits_1(cluster):
    import subprocess
    import sys
    from pathlib import Path

    handle, client, redis = cluster
    wait_until(lambda: all(w.healthy for w in client.cluster_info().workers))
    kvtier = str(Path(sys.executable).parent / "kvtier")
    redis.kill()
    try:
        flushed = subprocess.run([kvtier, "cache", "flush", "--server", handle.address], capture_output=True,
                                 text=True, timeout=120)
    finally:
        redis.start()  # same port
    assert flushed.returncode == 1, flushed.stdout + flushed.stderr
    assert "Redis did not answer" in flushed.stderr and "worker-0: dropped" in flushed.stdout

# Last: the router comes back on a new port, so the module's client no longer reaches it.
def test_a_restarted_router_routes_from_a_rebuilt_index(cluster):
    import ray

    handle, client, _ = cluster
    wait_until(lambda: all(w.healthy for w in client.cluster_info().workers))
    prefix = [random.Random(77).randrange(3, 250) for _ in range(600)]
    holder = client.complete(prefix + question(600), GREEDY).worker_id
    old_pid = ray.get(handle.router.pid.remote())
    ray.kill(handle.router, no_restart=False)

    def restarted_process() -> bool:
        try:
            return ray.get(handle.router.pid.remote(), timeout=10) != old_pid
        except ray.exceptions.RayActorError:
            return False  # still restarting

    wait_until(restarted_process)
    address = ray.get(handle.router.start.remote(), timeout=120)  # it started itself; this waits for it
    restarted = KvtierClient(address)
    try:
        assert restarted.cluster_info().ready
        after = restarted.complete(prefix + question(601), GREEDY)
        assert after.worker_id == holder and after.usage["cached_tokens"]["gpu"] >= 592
    finally:
        restarted.close()
