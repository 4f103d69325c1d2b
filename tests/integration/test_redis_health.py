"""The Redis probe behind ``kvtier status`` and the kvtier_redis_* gauges, against real redis-server processes."""

from __future__ import annotations

from kvstore.config import RedisConfig
from kvstore.redis_store import RedisStore
from tests.redis_server import RedisClusterNodes, RedisServer


def test_a_live_redis_reports_its_memory_and_limit(tmp_path):
    server = RedisServer(tmp_path, extra_args=("--maxmemory", "64mb")).start()
    store = RedisStore(RedisConfig(url=server.url))
    try:
        before = store.health()
        assert store.put_many([("kvtier:health-test", b"x" * 4 * 2**20)])
        after = store.health()
    finally:
        store.close()
        server.stop()
    assert before.up and before.breaker == "closed" and before.error == ""
    assert before.max_memory_bytes == 64 * 2**20
    assert 0 < before.ping_s < 1
    assert after.used_memory_bytes >= before.used_memory_bytes + 4 * 2**20
    gauges = after.as_gauges()
    assert gauges["up"] == 1.0 and gauges["breaker_open"] == 0.0 and gauges["max_memory_bytes"] == 64 * 2**20


def test_a_dead_redis_is_down_and_the_probe_does_not_trip_the_breaker(tmp_path):
    server = RedisServer(tmp_path).start()
    store = RedisStore(RedisConfig(url=server.url, breaker_failures=1))
    server.kill()
    try:
        probes = [store.health() for _ in range(3)]
        breaker_after_probes = probes[-1].breaker
        assert store.get_many(["kvtier:any"]) is None  # the data path's failure does open it
        after_a_failed_call = store.health()
    finally:
        store.close()
    assert all(not probe.up and probe.ping_s is None for probe in probes)
    assert "ConnectionError" in probes[0].error
    assert breaker_after_probes == "closed"
    assert after_a_failed_call.breaker == "open" and after_a_failed_call.as_gauges()["breaker_open"] == 1.0


def test_a_redis_cluster_reports_the_memory_of_every_primary(tmp_path):
    cluster = RedisClusterNodes(tmp_path).start()
    store = RedisStore(RedisConfig(url=cluster.url, cluster=True))
    first_node = RedisStore(RedisConfig(url=cluster.url))  # the node the url names, alone
    try:
        health, one_node = store.health(), first_node.health()
    finally:
        store.close()
        first_node.close()
        cluster.stop()
    assert health.up
    assert health.used_memory_bytes > 2 * one_node.used_memory_bytes  # three primaries summed
