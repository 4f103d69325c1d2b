"""``kvtier bench`` end to end: every benchmark runs (quick sizes; real Redis, local Ray, gRPC) and leaves its
table, JSON rows and a PNG plot. Timings are never asserted, only that each measurement exists."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.redis_server import RedisServer

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BENCH = Path(__file__).resolve().parents[2] / "bench"


def kvtier_bench(*flags: str, timeout_s: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cluster.cli", "bench", *flags], capture_output=True, text=True,
                          timeout=timeout_s)


def test_every_benchmark_writes_its_table_json_and_plot(tmp_path):
    redis = RedisServer(tmp_path / "redis").start()
    out = tmp_path / "results"
    try:
        done = kvtier_bench("--quick", "--redis-url", redis.url, "--out-dir", str(out))
    finally:
        redis.stop()
    assert done.returncode == 0, done.stderr[-3000:]
    names = ("engine", "prefix", "host", "serving")
    rows = {name: json.loads((out / f"{name}.json").read_text())["rows"] for name in names}
    assert [row["batch"] for row in rows["engine"]] == [1, 4]
    assert [(row["batch"], row["context"]) for row in rows["host"]] == [(1, 64), (8, 64)]
    assert all(row["host_ms_per_step"] > 0 for row in rows["host"])
    assert all(row["decode_tok_s"] > 0 and row["prefill_tok_s"] > 0 for row in rows["engine"])
    (prefix,) = rows["prefix"]
    assert prefix["prefix_tokens"] == 256 and prefix["redis hit"] > 0 and prefix["redis GB/s"] > 0
    # a fresh process fetches it (on CUDA it may compute its first blocks meanwhile: workers/redis_end_reads.py)
    assert 0 < prefix["redis tokens"] <= 256 and not prefix["redis fetch stopped"]
    parts = [(row["part"], row.get("workload") or row.get("path") or row["requests"]) for row in rows["serving"]]
    assert parts == [("policies", "shared prefix"), ("policies", "random"), ("priority", "urgent"),
                     ("priority", "the rest"), ("priority", "urgent"), ("priority", "the rest"),
                     ("overhead", "client -> worker"), ("overhead", "client -> router -> worker")]
    for name in rows:
        assert (out / f"{name}.png").read_bytes()[:8] == PNG_MAGIC
    summary = (out / "summary.md").read_text()
    for heading, table in (("## engine:", "| batch | prefill tok/s"), ("## prefix:", "| prefix tokens |"),
                           ("## host:", "| batch | context | host ms/step |"),
                           ("## serving:", "| workload | policy |")):
        assert heading in summary and table in summary and table in done.stdout
    assert summary.count("![") == 4
    assert "kvtier bench [4/4] serving" in done.stderr


def test_flags_it_does_not_know_go_to_the_one_benchmark_named(tmp_path):
    done = kvtier_bench("engine", "--quick", "--batch-sizes", "3", "--out-dir", str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    assert [row["batch"] for row in json.loads((tmp_path / "engine.json").read_text())["rows"]] == [3]


def test_mistakes_are_named_before_anything_runs(tmp_path):
    no_redis = kvtier_bench("prefix", "--out-dir", str(tmp_path))
    assert no_redis.returncode == 2 and "--redis-url" in no_redis.stderr
    two_with_flags = kvtier_bench("engine", "serving", "--batch-sizes", "3", "--out-dir", str(tmp_path))
    assert two_with_flags.returncode == 2 and "name exactly one" in two_with_flags.stderr
    unknown = kvtier_bench("nonsense", "--out-dir", str(tmp_path))
    assert unknown.returncode == 2 and "'nonsense' is not a benchmark" in unknown.stderr
    assert not list(tmp_path.iterdir())  # nothing ran, nothing written


def test_the_comparison_with_transformers_measures_every_part_on_the_cpu(tmp_path):
    """bench/against_transformers.py is for the GPU; on the CPU, at toy sizes, every part still runs."""
    redis = RedisServer(tmp_path / "redis").start()
    out = tmp_path / "against.json"
    flags = ["--model", "tiny", "--dtype", "float32", "--device", "cpu", "--attention-backend", "torch",
             "--batch-sizes", "1,2", "--prompt-len", "48", "--decode-tokens", "4", "--ttft-lens", "64",
             "--ttft-chunk", "32", "--overhead-batch", "2", "--kv-cache-memory", "32MiB", "--bandwidth-mib", "16",
             "--redis-url", redis.url, "--json-out", str(out)]
    try:
        done = subprocess.run([sys.executable, str(BENCH / "against_transformers.py"), *flags],
                              capture_output=True, text=True, timeout=600)
    finally:
        redis.stop()
    assert done.returncode == 0, done.stderr[-3000:]
    (result,) = json.loads(out.read_text())["rows"]
    assert set(result["decode"]) == {"1", "2"}
    for row in result["decode"].values():
        assert row["engine_tok_s"] > 0 and row["transformers_tok_s"] > 0 and row["bandwidth_utilisation"] > 0
    ttft = result["ttft"]["64"]
    assert ttft["engine_ms"] > 0 and ttft["engine_chunked_ms"] > 0 and ttft["transformers_ms"] > 0
    assert 0 < row["host_share"] <= 1
    assert result["overhead"]["tiers on"] > 0 and result["overhead"]["tiers off"] > 0
    assert result["overhead"]["reused_blocks"] == 0  # random prompts: the tiers-on runs must not hit a cache
    assert "| batch | engine tok/s |" in done.stdout and "| prompt tokens |" in done.stdout
    judged = subprocess.run([sys.executable, str(BENCH / "acceptance.py"), "--fast1b", str(out)], capture_output=True,
                            text=True, timeout=60)
    assert judged.returncode == 0, judged.stderr
    assert "| 1B bandwidth utilisation, batch 1 | >= 0.5 | 0." in judged.stdout  # measured, toy-sized, judged
    assert "| 1B decode speed-up over transformers, batch 128 | >= 10x | not measured | - |" in judged.stdout


def run_with_redis(tmp_path, script: str, url_flag: str, flags: list[str], pattern: str):
    """Run bench/``script`` against a redis-server of its own; (the finished process, the keys it left)."""
    redis = RedisServer(tmp_path / "redis").start()
    try:
        done = subprocess.run([sys.executable, str(BENCH / script), url_flag, redis.url, *flags],
                              capture_output=True, text=True, timeout=300)
        keys = redis.client().keys(pattern)
    finally:
        redis.stop()
    assert done.returncode == 0, done.stderr[-3000:]
    return done, keys


def test_host_work_with_every_tier_on_is_measured_against_every_tier_off(tmp_path):
    """bench/host_overhead.py --tiers-redis-url: whole runs, model stubbed, with the blocks really written."""
    out = tmp_path / "tiers.json"
    flags = ["--batch-sizes", "2", "--contexts", "64", "--decode-steps", "16", "--json-out", str(out)]
    done, keys = run_with_redis(tmp_path, "host_overhead.py", "--tiers-redis-url", flags, "kvtier:*")
    (row,) = json.loads(out.read_text())["rows"]
    assert row["on"] > 0 and row["off"] > 0
    assert row["stored_blocks"] == 2 * (64 + 16) // 16  # the last run's full blocks, every one written
    assert len(keys) == 3 * 2 * row["stored_blocks"]  # three runs of random prompts: a unit and a manifest each
    assert row["on_step_thread_cpu"] > 0 and "| batch | context | blocks written |" in done.stdout


def test_redis_reads_are_measured_both_ways_and_leave_no_keys(tmp_path):
    """bench/redis_read.py at toy sizes: a row per connection count, each way's rate and CPU, its keys deleted."""
    flags = ["--value-size", "64KiB", "--values", "24", "--connections", "1,3", "--repeats", "1"]
    done, keys = run_with_redis(tmp_path, "redis_read.py", "--redis-url", flags, "*")
    rows = [line.split("|")[1:-1] for line in done.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    assert [cells[0].strip() for cells in rows[1:]] == ["1", "3"]
    assert all(float(cell) > 0 for cells in rows[1:] for cell in cells)
    assert keys == []


def test_a_burst_of_redis_hits_is_timed_per_thread_count_and_the_shared_document_read_once(tmp_path):
    """bench/redis_burst.py at toy sizes (tiny model): a row per workload and thread count, from fresh processes."""
    out = tmp_path / "burst.json"
    flags = ["--model", "tiny", "--long-len", "160", "--short-len", "32", "--question-len", "20", "--requests", "3",
             "--threads", "1,2", "--repeats", "1", "--json-out", str(out)]
    done, keys = run_with_redis(tmp_path, "redis_burst.py", "--redis-url", flags, "kvtier:*")
    rows = json.loads(out.read_text())["rows"]
    assert [(row["workload"], row["threads"]) for row in rows] == [
        (workload, threads) for workload in ("mixed", "shared", "system") for threads in (1, 2)]
    assert all(row["first_ms"] > 0 and row["last_ms"] >= row["others_ms"] > 0 for row in rows)
    # shared: the document is read once, by the first; system: the second shares the system prompt's read,
    # the third that and the first's read of its half of the document
    assert [row["shared_reads"] for row in rows] == [0, 0, 2, 2, 2, 2]
    tiny_block = 32 * 1024  # blocks loaded: (180 - 1) // 16 and (52 - 1) // 16 each, the document once, at most;
    # system: (132 - 1) // 16 for the first, then the other half and a question, then a question
    loaded = [round(row["loaded_GB"] * 1e9 / tiny_block) for row in rows]  # (the cost model may skip a fetch)
    assert all(0 < n <= most for n, most in zip(loaded, [11 + 2 * 3] * 2 + [10 + 3] * 2 + [8 + 7 + 1] * 2)), loaded
    assert keys and "| workload | prefetch threads |" in done.stdout


def test_a_burst_on_a_new_prefix_is_measured_and_computes_it_once(tmp_path):
    """bench/shared_burst.py at toy sizes (tiny model): a row per burst size; the prefix is computed once."""
    out = tmp_path / "burst.json"
    done = subprocess.run([sys.executable, str(BENCH / "shared_burst.py"), "--model", "tiny", "--prefix-len", "96",
                           "--question-len", "8", "--requests", "1,3", "--max-tokens", "2", "--json-out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(row["requests"], row["computed_prompt_tokens"]) for row in rows] == [(1, 104), (3, 120)]
    assert all(row["ttft_p50_ms"] > 0 and row["all_done_ms"] >= row["ttft_max_ms"] for row in rows)
    assert "| requests | prompt tokens computed (ideal) |" in done.stdout
