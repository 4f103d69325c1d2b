"""A worker's KV event stream to the router's index, over real gRPC: a snapshot larger than one gRPC message
may be (4 MiB unless a channel says otherwise) reaches the index whole, and the worker is healthy once it has."""

from __future__ import annotations

import asyncio
import hashlib

from cluster import worker_server
from cluster.worker_server import start_worker_server
from router.prefix_index import PrefixIndex
from router.worker_pool import WorkerPool
from workers.async_engine import AsyncEngine
from workers.engine import LLMEngine
from workers.engine_config import CacheConfig, EngineConfig


def hashes(tag: str, count: int) -> list[bytes]:
    return [hashlib.sha256(f"{tag}{i}".encode()).digest() for i in range(count)]


def test_a_snapshot_larger_than_a_grpc_message_reaches_the_index_whole():
    # What a 1B-class model's pool on an H100 and a CPU tier of 100 GiB hold: 200,000 blocks, 6.8 MB of hashes
    gpu, cpu = hashes("gpu", 140_000), hashes("cpu", 60_000)

    async def main() -> dict[str, dict[str, int]]:
        engine = AsyncEngine(LLMEngine.from_config(EngineConfig(model="tiny", cache=CacheConfig(num_blocks=64)),
                                                   progress=False))
        engine.engine.kv_snapshot = lambda: {"gpu": gpu, "cpu": cpu}  # the tiers' contents, not their blocks
        server, address = await start_worker_server(engine, "w0", "tiny")
        pool = WorkerPool(["w0"], PrefixIndex())
        try:
            await asyncio.wait_for(pool.connect("w0", address), timeout=20)
            assert pool.workers["w0"].healthy
            return {"gpu": pool.index.match("w0", gpu), "cpu": pool.index.match("w0", cpu)}
        finally:
            await pool.close()
            await server.stop(0)

    matched = asyncio.run(main())
    assert matched["gpu"] == {"gpu": 140_000, "cpu": 0, "redis": 0}
    assert matched["cpu"] == {"gpu": 0, "cpu": 60_000, "redis": 0}


def test_a_snapshot_is_cut_into_parts_of_at_most_so_many_hashes_each_naming_a_tier_once(monkeypatch):
    monkeypatch.setattr(worker_server, "_HASHES_PER_MESSAGE", 3)
    gpu, cpu = hashes("g", 4), hashes("c", 2)
    batches = list(worker_server._event_batches("snapshot", {"gpu": gpu, "cpu": cpu}))
    assert [(b.snapshot, b.snapshot_continues) for b in batches] == [(True, True), (False, False)]
    assert [[(e.tier, list(e.block_hashes)) for e in b.events] for b in batches] == [
        [("gpu", gpu[:3])], [("gpu", gpu[3:]), ("cpu", cpu)]]
    (empty,) = worker_server._event_batches("snapshot", {"gpu": [], "cpu": []})
    assert empty.snapshot and not empty.snapshot_continues and not empty.events
