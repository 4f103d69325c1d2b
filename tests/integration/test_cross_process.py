"""Reuse across processes through the CLI: process A computes a 2,000-token prefix, process B (same Redis, a
single server or a 3-node Redis Cluster) loads it and prefills only its own question."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from tests.redis_server import RedisClusterNodes

KVTIER = str(Path(sys.executable).parent / "kvtier")
rng = random.Random(5)
PREFIX = [rng.randrange(3, 250) for _ in range(2000)]
QUESTION_A = [rng.randrange(3, 250) for _ in range(24)]
QUESTION_B = [rng.randrange(3, 250) for _ in range(30)]
MAX_TOKENS = 8


def generate(prompt: list[int], *flags: str) -> tuple[dict, dict]:
    """One `kvtier generate` process: (its JSON record, its stats)."""
    command = [
        KVTIER, "generate", "--model", "tiny", "--prompt-token-ids", ",".join(map(str, prompt)),
        "--max-tokens", str(MAX_TOKENS), "--temperature", "0", "--ignore-eos", "--json", "--quiet", "--stats", *flags,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    (stats_line,) = [line for line in result.stderr.splitlines() if line.startswith("kvtier stats: ")]
    return json.loads(result.stdout), json.loads(stats_line.removeprefix("kvtier stats: "))


def check_reuse(redis_flags: list[str]) -> None:
    first, _ = generate(PREFIX + QUESTION_A, *redis_flags)
    assert first["usage"]["cached_tokens"] == {"gpu": 0, "cpu": 0, "redis": 0}
    second, stats = generate(PREFIX + QUESTION_B, *redis_flags)
    assert second["usage"]["cached_tokens"]["redis"] >= 1984
    assert stats["engine"]["computed_tokens"] == len(QUESTION_B) + MAX_TOKENS - 1  # only the tail was prefilled
    assert stats["kvstore"]["redis"]["hit_blocks"] == 125 and stats["kvstore"]["redis"]["errors"] == 0
    uncached, _ = generate(PREFIX + QUESTION_B, "--no-cache")
    assert second["token_ids"] == uncached["token_ids"]


def test_a_second_process_reuses_the_prefix_from_redis(redis_server):
    check_reuse(["--redis-url", redis_server.url])


def test_flush_removes_the_models_blocks(redis_server):
    generate(PREFIX[:400] + QUESTION_A, "--redis-url", redis_server.url, "--cache-salt", "a")
    generate(PREFIX[:400] + QUESTION_A, "--redis-url", redis_server.url, "--cache-salt", "b")
    client = redis_server.client()
    per_salt = client.dbsize() // 2
    flush = [KVTIER, "cache", "flush", "--model", "tiny", "--redis-url", redis_server.url]
    result = subprocess.run([*flush, "--cache-salt", "a"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert f"deleted {per_salt} keys (block units and manifests) of cache salt 'a'" in result.stdout
    assert client.dbsize() == per_salt
    again, _ = generate(PREFIX[:400] + QUESTION_A, "--redis-url", redis_server.url, "--cache-salt", "b")
    assert again["usage"]["cached_tokens"]["redis"] == 416  # (424 - 1) // 16 blocks: the last token is computed
    result = subprocess.run(flush, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and client.dbsize() == 0


def test_a_tenant_flush_removes_every_salt_of_that_tenant_and_no_other(redis_server):
    """The salts a router with token auth derives for acme (none asked, and "x") and one for globex."""
    from router.tenancy import tenant_salt

    for tenant, client_salt in (("acme", None), ("acme", "x"), ("globex", None)):
        generate(PREFIX[:100] + QUESTION_A, "--redis-url", redis_server.url, "--cache-salt",
                 tenant_salt(tenant, client_salt))
    client = redis_server.client()
    per_salt = client.dbsize() // 3
    flush = [KVTIER, "cache", "flush", "--model", "tiny", "--redis-url", redis_server.url, "--tenant", "acme"]
    result = subprocess.run(flush, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert f"deleted {2 * per_salt} keys (block units and manifests) of tenant 'acme'" in result.stdout
    assert client.dbsize() == per_salt
    again, _ = generate(PREFIX[:100] + QUESTION_A, "--redis-url", redis_server.url, "--cache-salt",
                        tenant_salt("globex", None))
    assert again["usage"]["cached_tokens"]["redis"] == 112  # (124 - 1) // 16 blocks, globex's untouched


def test_a_three_node_redis_cluster_serves_the_second_process(tmp_path):
    cluster = RedisClusterNodes(tmp_path / "cluster").start()
    try:
        check_reuse(["--redis-url", cluster.url, "--config", str(cluster_config(tmp_path))])
        assert sum(cluster.key_counts()) > 0
    finally:
        cluster.stop()


def cluster_config(tmp_path: Path) -> Path:
    path = tmp_path / "kvtier.yaml"
    path.write_text("kvstore:\n  redis:\n    cluster: true\n")
    return path


@pytest.mark.parametrize("flag", ["--no-cache"])
def test_no_cache_turns_every_tier_off(redis_server, flag):
    generate(PREFIX[:200] + QUESTION_A, "--redis-url", redis_server.url)
    record, stats = generate(PREFIX[:200] + QUESTION_A, "--redis-url", redis_server.url, flag)
    assert record["usage"]["cached_tokens"] == {"gpu": 0, "cpu": 0, "redis": 0}
    assert stats["engine"]["computed_tokens"] == 200 + len(QUESTION_A) + MAX_TOKENS - 1
