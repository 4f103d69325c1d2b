"""Shared fixtures: a private model cache per test session, GPU tests skipped without CUDA, and Triton kernels
run by Triton's interpreter on the CPU where there is no GPU (set before any kernel is defined)."""

from __future__ import annotations

import gc
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tests.redis_server import RedisServer


@pytest.fixture(scope="session", autouse=True)
def kvtier_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Built-in presets are generated into a per-session directory, never the user's cache."""
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv("KVTIER_CACHE_DIR", str(tmp_path_factory.mktemp("kvtier-cache")))
    yield
    monkeypatch.undo()


@pytest.fixture(scope="module", autouse=True)
def collected_after_each_module():
    """What a test module left in reference cycles is freed before the next one: a pytest worker runs many
    modules, and one holding many engines' untouched KV pools (address space, not RSS) can no longer fork
    (Ray starts its processes by fork: ENOMEM under the kernel's overcommit heuristic)."""
    yield
    gc.collect()


@pytest.fixture
def redis_server(tmp_path) -> RedisServer:
    """A fresh redis-server of this test's own, on a free loopback port."""
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture
def start_redis(tmp_path):
    """``start_redis(*extra_args)``: a fresh redis-server of this test's own, with those arguments; every one
    it started is stopped after the test, whatever happened in it."""
    servers: list[RedisServer] = []

    def start(*extra_args: str) -> RedisServer:
        servers.append(RedisServer(tmp_path / f"redis-{len(servers)}", extra_args=extra_args).start())
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in gpu_items:
        item.add_marker(skip)
