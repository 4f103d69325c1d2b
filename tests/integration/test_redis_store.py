"""Parallel reads of the Redis transport against a real redis-server: the same values in key order as one MGET,
absent keys as None, and a dead Redis a miss for the whole read."""

from __future__ import annotations

from kvstore.config import RedisConfig
from kvstore.redis_store import RedisStore, _slices
from tests.redis_server import RedisServer


def test_a_read_split_across_connections_returns_what_one_mget_does(tmp_path):
    server = RedisServer(tmp_path).start()
    keys = [f"kvtier:test:{i}" for i in range(100)]
    stores = {n: RedisStore(RedisConfig(url=server.url, read_parallelism=n)) for n in (1, 4, 7)}
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
