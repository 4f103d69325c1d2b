"""Parallel reads of the Redis transport against a real redis-server: the same values in key order as one MGET,
absent keys as None, and a dead Redis a miss for the whole read; reads streamed into the caller's buffers
(``read_into``) give the same bytes in either protocol and leave the connections in step."""

from __future__ import annotations

import threading
import time

import pytest

from kvstore.config import RedisConfig
from kvstore.redis_store import RedisStore, _slices


def test_a_read_split_across_connections_returns_what_one_mget_does(redis_server):
    server = redis_server
    keys = [f"kvtier:test:{i}" for i in range(100)]
    stores = {n: RedisStore(RedisConfig(url=server.url, read_parallelism=n, prefetch_threads=1)) for n in (1, 4, 7)}
    try:
        assert stores[1].put_many([(key, key.encode() * 1000) for key in keys[::3]])  # a third of them exist
        reads = {n: store.get_many(keys) for n, store in stores.items()}
        server.kill()
        after_death = stores[4].get_many(keys)
    finally:
        for store in stores.values():
            store.close()
    expected = [key.encode() * 1000 if i % 3 == 0 else None for i, key in enumerate(keys)]
    assert reads[1] == reads[4] == reads[7] == expected
    assert after_death is None and stores[4].errors > 0


def test_small_reads_stay_whole_and_large_ones_split_evenly():
    keys = [str(i) for i in range(40)]
    assert [len(part) for part in _slices(keys, 4)] == [10, 10, 10, 10]
    assert [len(part) for part in _slices(keys[:33], 4)] == [9, 9, 9, 6]
    assert [len(part) for part in _slices(keys[:12], 4)] == [12]  # under 2 x 8 keys: one MGET
    assert _slices([], 4) == []


class CollectingSink:
    """Receives each value into a buffer of its own (in two parts, as a staged block and its header would)."""

    def __init__(self) -> None:
        self.values: dict[int, bytes | None] = {}

    def buffers(self, index: int, length: int) -> list[memoryview]:
        return [memoryview(bytearray(min(length, 5))), memoryview(bytearray(length - min(length, 5)))]

    def received(self, index: int, value: list[memoryview] | None) -> None:
        self.values[index] = None if value is None else b"".join(bytes(part) for part in value)


@pytest.mark.parametrize("protocol", [2, 3])
def test_streamed_reads_give_the_values_and_leave_connections_in_step(redis_server, protocol):
    server = redis_server
    keys = [f"kvtier:test:{i}" for i in range(100)]
    values = {key: key.encode() * (37 * i) for i, key in enumerate(keys) if i % 3}  # some absent, one empty
    store = RedisStore(RedisConfig(url=f"{server.url}?protocol={protocol}", read_parallelism=4, prefetch_threads=1))
    try:
        assert store.put_many(list(values.items()))
        for _ in range(3):  # the same pooled connections again and again
            sink = CollectingSink()
            assert store.read_into(keys, sink)
            assert sink.values == {i: values.get(key) for i, key in enumerate(keys)}
            assert store.get_many(keys[:2]) == [None, values[keys[1]]]  # redis-py's parser after ours
        server.kill()
        assert not store.read_into(keys, CollectingSink()) and store.errors > 0
    finally:
        store.close()


def test_a_streamed_read_from_a_paused_redis_gives_up_within_its_timeouts(redis_server):
    server = redis_server
    config = RedisConfig(url=server.url, socket_timeout_s=0.2, max_retries=1, retry_backoff_s=0.05)
    store = RedisStore(config)
    try:
        assert store.put_many([("kvtier:test:a", b"a" * 100_000)])
        server.pause()
        began = time.monotonic()
        assert not store.read_into(["kvtier:test:a"], CollectingSink())
        elapsed = time.monotonic() - began
        server.resume()
        sink = CollectingSink()
        assert store.read_into(["kvtier:test:a"], sink) and sink.values == {0: b"a" * 100_000}  # back in step
    finally:
        store.close()
    assert elapsed < 2 * 0.2 + 0.05 + 0.5  # two attempts' timeouts and one backoff, plus slack


def test_the_read_connections_are_open_before_the_first_read(redis_server):
    server = redis_server
    observer = server.client()
    newest = max(int(client["id"]) for client in observer.client_list())  # ids only grow: later ones are the store's
    store = RedisStore(RedisConfig(url=server.url, read_parallelism=3))
    try:
        assert store.open_read_connections()
        opened = sum(int(client["id"]) > newest for client in observer.client_list())
        server.kill()
        assert not store.open_read_connections()  # a warning, not an error
    finally:
        store.close()
    assert opened == 3


def test_every_reader_the_config_allows_the_writer_and_the_probe_at_once_never_run_out_of_connections(redis_server):
    # 2 prefetch threads x 3 connections each + the writer = 7 connections; the health probe and flushes have
    # their own. (With redis-py's default pool the probe took one of the 7: about 50 reads and probes failed
    # with "Too many connections" in this second, counted as Redis errors.)
    config = RedisConfig(url=redis_server.url, read_parallelism=3, prefetch_threads=2, max_connections=7)
    store = RedisStore(config)
    keys = [f"kvtier:test:{i}" for i in range(48)]  # three slices of 16
    assert store.put_many([(key, b"x" * 100_000) for key in keys])
    ends = time.monotonic() + 1.0
    outcomes: list[bool] = []

    def repeat(call) -> None:
        while time.monotonic() < ends:
            outcomes.append(call())

    users = [lambda: store.get_many(keys) == [b"x" * 100_000] * 48] * 2 + [
        lambda: store.put_many([(key, b"x" * 100_000) for key in keys[:8]]),
        lambda: store.health().up,
        lambda: store.delete_matching("kvtier:absent:*") == 0,
    ]
    threads = [threading.Thread(target=repeat, args=(user,)) for user in users]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        store.close()
    assert len(outcomes) > 20 and all(outcomes)
    assert store.errors == 0


@pytest.mark.parametrize("protocol", [2, 3])
def test_values_written_in_parts_read_back_whole_with_their_ttl(redis_server, protocol):
    server = redis_server
    payload = memoryview(bytearray(range(256)) * 4096)  # 1 MiB, sent from this buffer
    store = RedisStore(RedisConfig(url=f"{server.url}?protocol={protocol}", ttl_s=600))
    try:
        items = [(f"kvtier:test:{i}", (b"header-%d" % i, payload)) for i in range(20)] + [("kvtier:test:m", b"m")]
        assert store.put_many(items)
        assert store.get_many([key for key, _ in items]) == [b"header-%d" % i + bytes(payload) for i in range(20)] + [
            b"m"]
        assert 0 < server.client().ttl("kvtier:test:3") <= 600
        assert store.put_many([("kvtier:test:again", b"x")]) and store.get_many(["kvtier:test:again"]) == [b"x"]
    finally:
        store.close()


def test_a_write_redis_refuses_is_a_failed_write_and_the_connection_stays_usable(start_redis):
    server = start_redis("--maxmemory", "2mb", "--maxmemory-policy", "noeviction")
    store = RedisStore(RedisConfig(url=server.url, max_retries=0))
    try:
        big = [(f"kvtier:test:{i}", (b"h", bytes(500_000))) for i in range(12)]  # 6 MB: past maxmemory
        assert not store.put_many(big) and store.errors == 1
        assert store.get_many(["kvtier:test:absent"]) == [None]  # every reply was read: the connection is in step
        server.client().flushall()
        assert store.put_many([("kvtier:test:small", b"s")]) and store.get_many(["kvtier:test:small"]) == [b"s"]
    finally:
        store.close()


def test_a_trial_call_that_redis_answers_with_an_error_closes_the_breaker(start_redis):
    """Redis stalls (the breaker opens), comes back full (noeviction), and refuses the trial write: it answered,
    so the breaker closes and the next read goes out. (It used to stay half-open, refusing every call after.)"""
    server = start_redis("--maxmemory", "2mb", "--maxmemory-policy", "noeviction")
    store = RedisStore(RedisConfig(url=server.url, max_retries=0, socket_timeout_s=0.1, breaker_reset_s=0.2))
    try:
        server.pause()
        for _ in range(3):
            assert store.get_many(["kvtier:test:k"]) is None
        server.resume()
        assert store.health().breaker == "open"
        time.sleep(0.3)
        big = [(f"kvtier:test:{i}", (b"h", bytes(500_000))) for i in range(12)]
        assert not store.put_many(big)  # the trial: refused, out of memory
        assert store.health().breaker == "closed" and store.get_many(["kvtier:test:k"]) == [None]
        for _ in range(3):
            store._breaker_for(None).record_failure()
        time.sleep(0.3)

        def broken():
            raise ValueError("a bug in the caller")

        with pytest.raises(ValueError):
            store._call(broken)  # a trial that raised something else ends too: the breaker opens again
        assert store.health().breaker == "open"
    finally:
        store.close()


def test_a_stalled_redis_cluster_node_opens_only_its_own_breaker(tmp_path):
    """One node of three paused: after three timeouts its keys are refused at once, while the keys of the
    other nodes are still read (one breaker for the whole cluster turned Redis off for all of them)."""
    from tests.redis_server import RedisClusterNodes

    cluster = RedisClusterNodes(tmp_path / "cluster").start()
    store = RedisStore(RedisConfig(url=cluster.url, cluster=True, max_retries=0, socket_timeout_s=0.2))
    try:
        keys = [f"kvtier:test:{{{i}}}" for i in range(30)]
        assert store.put_many([(key, key.encode()) for key in keys])
        node_of = {key: store.client.get_node_from_key(key).port for key in keys}
        stalled = next(node for node in cluster.nodes if node.port == node_of[keys[0]])
        on_stalled = [key for key in keys if node_of[key] == stalled.port]
        elsewhere = [key for key in keys if node_of[key] != stalled.port]
        assert len(on_stalled) >= 4 and elsewhere
        stalled.pause()
        try:
            for key in on_stalled[:3]:
                assert store.get_many([key]) is None  # a timeout each: its node's breaker opens
            began = time.monotonic()
            assert store.get_many([on_stalled[0]]) is None and time.monotonic() - began < 0.1  # refused at once
            assert [store.get_many([key]) for key in elsewhere] == [[key.encode()] for key in elsewhere]
            assert store.health().breaker == "open"
        finally:
            stalled.resume()
    finally:
        store.close()
        cluster.stop()

def test_a_redis_cluster_node_used_as_a_plain_redis_says_what_to_set(tmp_path, caplog):
    from tests.redis_server import RedisClusterNodes

    cluster = RedisClusterNodes(tmp_path / "cluster").start()
    store = RedisStore(RedisConfig(url=cluster.url))
    try:
        keys = [f"kvtier:test:{{{i}}}" for i in range(20)]  # some in other nodes' slots
        with caplog.at_level("WARNING", logger="kvstore.redis_store"):
            missed = [key for key in keys if store.get_many([key]) is None]
        assert missed and "set kvstore.redis.cluster: true" in caplog.text
    finally:
        store.close()
        cluster.stop()

def test_the_password_file_wins_over_the_urls_and_a_rotated_one_reaches_new_connections(tmp_path):
    """The url's password is stale and the file's is right: the file's is used. Then the password is rotated
    (Redis's requirepass and the file, as a Secret's update does) and the server drops every connection: the
    store reconnects with the new one, without being made again."""
    from tests.redis_server import RedisServer

    server = RedisServer(tmp_path / "redis", password="first-password").start()
    password_file = tmp_path / "password"
    password_file.write_text("first-password\n")
    url = f"redis://:stale-password@127.0.0.1:{server.port}/0"
    store = RedisStore(RedisConfig(url=url, password_file=str(password_file)))
    try:
        assert store.put_many([("kvtier:test:k", b"v")]) and store.get_many(["kvtier:test:k"]) == [b"v"]
        admin = server.client()
        admin.config_set("requirepass", "second-password")
        password_file.write_text("second-password\n")
        server.password = "second-password"
        server.client().client_kill_filter(_type="normal", skipme=True)  # every connection of the store
        assert store.get_many(["kvtier:test:k"]) == [b"v"]  # (its first attempt finds the connection closed)
        assert store.health().up
    finally:
        store.close()
        server.stop()

def test_a_write_sent_to_a_node_that_no_longer_owns_the_slot_follows_the_move(tmp_path):
    """Writes go to the node redis-py's slot map names; where a node answers MOVED (the map is stale), the
    write is redone through redis-py, which follows the move. Here every write is first sent to the wrong node."""
    from tests.redis_server import RedisClusterNodes

    cluster = RedisClusterNodes(tmp_path / "cluster").start()
    store = RedisStore(RedisConfig(url=cluster.url, cluster=True))
    try:
        keys = [f"kvtier:{{tag{i}}}:unit" for i in range(6)]
        owners = {key: store.client.get_node_from_key(key) for key in keys}
        nodes = store.client.get_primaries()
        wrong = {key: next(node for node in nodes if node.name != owners[key].name) for key in keys}
        store._pool_for = lambda key: wrong[key].redis_connection.connection_pool  # a stale slot map
        assert store.put_many([(key, (b"h", bytes(40_000) + key.encode())) for key in keys])
        del store._pool_for
        assert [store.client.get(key) for key in keys] == [b"h" + bytes(40_000) + key.encode() for key in keys]
    finally:
        store.close()
        cluster.stop()
