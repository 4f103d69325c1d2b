"""Security with real components: TLS and bearer tokens on the router (real Ray, real gRPC), tenants isolated
in every tier, and a Redis with requirepass and TLS (a real redis-server), including a wrong password."""

from __future__ import annotations

import random
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cluster.client import KvtierClient, build_request
from kvstore.config import CpuTierConfig, KVStoreConfig, RedisConfig
from protos.kvtier.v1 import generation_pb2 as pb
from protos.kvtier.v1 import generation_pb2_grpc as pb_grpc
from router.tenancy import tenant_salt, tenant_scope
from tests.local_cluster import local_cluster
from tests.pki import make_pki
from tests.redis_server import RedisServer, free_port
from workers.engine import LLMEngine
from workers.engine_config import CacheConfig, EngineConfig
from workers.sampling_params import SamplingParams

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
TOKENS = {"acme": "acme-token-0123456789abcdef", "globex": "globex-token-0123456789abcdef"}
LIMITED = ("initech", "initech-token-0123456789abcdef")  # a tenant with limits: one call at once, priority >= 0
REDIS_PASSWORD = "redis-password-0123456789"


def prompt(seed: int, count: int = 160) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 250) for _ in range(count)]


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def secure_redis(tmp_path_factory, pki):
    server = RedisServer(tmp_path_factory.mktemp("secure-redis"), password=REDIS_PASSWORD, tls=pki.server).start()
    yield server
    server.stop()


def redis_config(server: RedisServer, password_file, **options) -> RedisConfig:
    return RedisConfig(url=server.url, password_file=str(password_file), ca_file=server.tls.ca_file, **options)


def engine_with(redis: RedisConfig) -> LLMEngine:
    kvstore = KVStoreConfig(cpu=CpuTierConfig(enabled=False), redis=redis)
    return LLMEngine.from_config(EngineConfig(cache=CacheConfig(num_blocks=256)), kvstore, progress=False)


def test_a_redis_with_requirepass_and_tls_serves_the_shared_tier(secure_redis, tmp_path):
    password_file = tmp_path / "password"
    password_file.write_text(REDIS_PASSWORD + "\n")
    shared = prompt(1)
    first = engine_with(redis_config(secure_redis, password_file))
    expected = first.generate([shared], GREEDY)[0].token_ids
    first.close()  # the write-behind queue lands
    assert secure_redis.client().dbsize() > 0
    second = engine_with(redis_config(secure_redis, password_file))
    done = second.generate([shared], GREEDY)[0]
    assert done.token_ids == expected
    assert done.usage.cached_tokens.redis == 144  # 9 full blocks of the 159-token cacheable prefix
    assert second.kv_store_stats()["redis"]["errors"] == 0
    second.close()


def test_a_wrong_redis_password_makes_every_fetch_a_counted_miss(secure_redis, tmp_path):
    good_file, bad_file = tmp_path / "good", tmp_path / "bad"
    good_file.write_text(REDIS_PASSWORD)
    bad_file.write_text("not-the-password")
    shared = prompt(2)
    writer = engine_with(redis_config(secure_redis, good_file))
    expected = writer.generate([shared], GREEDY)[0].token_ids
    writer.close()
    wrong = engine_with(redis_config(secure_redis, bad_file, breaker_failures=100))
    outputs = wrong.generate([shared, prompt(3)], GREEDY)
    assert outputs[0].token_ids == expected  # served, computed: never a failed request
    assert all(o.usage.cached_tokens.redis == 0 for o in outputs)
    stats = wrong.kv_store_stats()["redis"]
    assert stats["hit_blocks"] == 0 and stats["errors"] > 0 and stats["miss_blocks"] > 0
    wrong.close()


@pytest.fixture(scope="module")
def secure_cluster(tmp_path_factory, pki, secure_redis):
    directory = tmp_path_factory.mktemp("secure-cluster")
    (directory / "tokens.yaml").write_text("".join(f"{tenant}: [{token}]\n" for tenant, token in TOKENS.items())
                                           + f"{LIMITED[0]}: {{tokens: [{LIMITED[1]}], max_in_flight: 1, "
                                             "min_priority: 0}\n")
    (directory / "redis-password").write_text(REDIS_PASSWORD)
    overrides = {
        # (no cost model: under load it may judge a 9-block Redis read slower than recomputing, and these tests
        # ask where blocks are, not whether fetching them pays)
        "kvstore": {"cpu": {"enabled": False}, "cost_model": False,
                    "redis": {"url": secure_redis.url, "password_file": str(directory / "redis-password"),
                              "ca_file": pki.server.ca_file}},
        "workers": {"count": 2, "num_cpus": 0.5},
        "router": {"port": 0, "health_port": free_port(), "policy": "round_robin", "auth": {"tokens_file": str(directory / "tokens.yaml")},
                   "tls": {"cert_file": pki.server.cert_file, "key_file": pki.server.key_file}},
    }
    with local_cluster(overrides, "kvtier-security-test") as handle:
        handle.health_port = overrides["router"]["health_port"]
        yield handle


def client_of(cluster, pki, token: str | None = None, ca_file: str | None = None) -> KvtierClient:
    return KvtierClient(cluster.address, ca_file=ca_file or pki.server.ca_file, token=token)


def test_a_call_without_a_known_token_is_unauthenticated(secure_cluster, pki):
    for token in (None, "not-a-token-of-anyone-at-all", TOKENS["acme"] + "x"):
        client = client_of(secure_cluster, pki, token)
        with pytest.raises(grpc.RpcError) as caught:
            client.complete(prompt(4, 20), GREEDY)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as caught:
            client.cluster_info()
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        client.close()


def test_health_answers_without_a_token_and_in_plaintext_on_the_health_port(secure_cluster, pki):
    client = client_of(secure_cluster, pki)
    answer = health_pb2_grpc.HealthStub(client.channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
    client.close()
    with grpc.insecure_channel(f"127.0.0.1:{secure_cluster.health_port}") as channel:
        for service in ("", "kvtier.v1.Generation"):
            request = health_pb2.HealthCheckRequest(service=service)
            answer = health_pb2_grpc.HealthStub(channel).Check(request, timeout=10)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as caught:  # only health there: no API without TLS and a token
            pb_grpc.GenerationStub(channel).GetClusterInfo(pb.GetClusterInfoRequest(), timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_tls_fails_with_a_wrong_ca_or_in_plaintext(secure_cluster, pki):
    wrong_ca = client_of(secure_cluster, pki, TOKENS["acme"], ca_file=pki.other_ca_file)
    with pytest.raises(grpc.RpcError) as caught:
        wrong_ca.complete(prompt(5, 20), GREEDY, timeout_s=10)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    wrong_ca.close()
    plaintext = KvtierClient(secure_cluster.address, token=TOKENS["acme"])
    with pytest.raises(grpc.RpcError) as caught:
        plaintext.complete(prompt(5, 20), GREEDY, timeout_s=10)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    plaintext.close()


def wait_for_redis_to_settle(redis: RedisServer, timeout_s: float = 30) -> None:
    """Until the workers' write-behind has stopped adding keys."""
    deadline, last = time.monotonic() + timeout_s, -1
    while time.monotonic() < deadline:
        size = redis.client().dbsize()
        if size == last and size > 0:
            return
        last = size
        time.sleep(0.5)
    raise AssertionError("Redis never settled")


def test_two_tenants_identical_prompts_share_no_block_in_any_tier(secure_cluster, pki, secure_redis):
    acme = client_of(secure_cluster, pki, TOKENS["acme"])
    globex = client_of(secure_cluster, pki, TOKENS["globex"])
    shared = prompt(6)
    first = acme.complete(shared, GREEDY)  # round robin: one worker computes it and spills it to Redis
    wait_for_redis_to_settle(secure_redis)
    again = acme.complete(shared, GREEDY)  # the other worker finds it in Redis
    assert again.worker_id != first.worker_id and again.usage["cached_tokens"]["redis"] == 144
    for salt in (None, tenant_salt("acme", None), "anything"):  # not even by naming acme's derived salt
        other = globex.complete(shared, GREEDY, cache_salt=salt)
        assert other.token_ids == first.token_ids
        assert other.usage["cached_tokens"] == {"gpu": 0, "cpu": 0, "redis": 0}
    acme.close()
    globex.close()


def test_a_tenants_flush_deletes_its_own_blocks_from_redis_and_no_one_elses(secure_cluster, pki, secure_redis):
    """Without a cache salt, a tenant's flush drops every block of the tenant, whatever salts its requests
    gave (before, only those of requests without one); naming another tenant's scope changes nothing."""
    acme = client_of(secure_cluster, pki, TOKENS["acme"])
    globex = client_of(secure_cluster, pki, TOKENS["globex"])
    mine, mine_salted, theirs = prompt(7), prompt(9), prompt(8)
    acme.complete(mine, GREEDY)
    acme.complete(mine_salted, GREEDY, cache_salt="project-x")
    globex.complete(theirs, GREEDY)
    wait_for_redis_to_settle(secure_redis)
    before = secure_redis.client().dbsize()
    sneaky = globex.flush_cache(salt_scope=tenant_scope("acme"))  # the router puts globex's own scope in
    assert secure_redis.client().dbsize() == before - sneaky.redis_keys
    again = globex.complete(theirs, GREEDY)
    assert again.usage["cached_tokens"] == {"gpu": 0, "cpu": 0, "redis": 0}  # globex flushed itself
    wait_for_redis_to_settle(secure_redis)
    before = secure_redis.client().dbsize()
    response = acme.flush_cache()  # no salt asked: every block of acme's (the router puts its scope in)
    assert not response.not_flushed and not response.redis_error
    assert 0 < response.redis_keys < before and secure_redis.client().dbsize() == before - response.redis_keys
    assert set(response.workers) == {"worker-0", "worker-1"}
    again = globex.complete(theirs, GREEDY)  # globex's blocks are all still cached, on a GPU or in Redis
    assert again.usage["cached_tokens"]["gpu"] + again.usage["cached_tokens"]["redis"] == 144
    assert response.workers["worker-0"].gpu_blocks + response.workers["worker-1"].gpu_blocks >= 18  # acme's
    assert acme.complete(mine, GREEDY).usage["cached_tokens"] == {"gpu": 0, "cpu": 0, "redis": 0}
    salted = acme.complete(mine_salted, GREEDY, cache_salt="project-x")
    assert salted.usage["cached_tokens"] == {"gpu": 0, "cpu": 0, "redis": 0}
    acme.close()
    globex.close()


def test_a_tenants_limits_refuse_what_exceeds_them_and_no_one_elses_calls(secure_cluster, pki):
    """initech may run one call at once at priority 0 or later: a second one while its first streams is
    RESOURCE_EXHAUSTED naming it, and priority -1 INVALID_ARGUMENT naming the field; once its stream ends it
    may call again; acme, without limits of its own, runs two at once at priority -1 meanwhile."""
    initech, acme = client_of(secure_cluster, pki, LIMITED[1]), client_of(secure_cluster, pki, TOKENS["acme"])
    long_run = SamplingParams(max_tokens=2000, temperature=0, ignore_eos=True)
    first = initech.stream(build_request(prompt(10, 20), long_run))
    assert next(first).HasField("delta")
    with pytest.raises(grpc.RpcError) as caught:
        initech.complete(prompt(11, 20), GREEDY)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "tenant 'initech' has 1 requests in flight, its limit is 1" in caught.value.details()
    others = [acme.stream(build_request(prompt(12 + i, 20), long_run, priority=-1)) for i in range(2)]
    assert all(next(stream).HasField("delta") for stream in others)
    for stream in (first, *others):
        stream.cancel()
    with pytest.raises(grpc.RpcError) as caught:
        initech.complete(prompt(11, 20), GREEDY, priority=-1)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and caught.value.details().startswith("priority:")
    deadline = time.monotonic() + 30
    while True:  # the cancelled stream's call ends on the router a moment after the client cancels it
        try:
            assert len(initech.complete(prompt(11, 20), GREEDY).token_ids) == GREEDY.max_tokens
            break
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() < deadline
            time.sleep(0.1)
    initech.close()
    acme.close()
