"""bench/acceptance.py judges issue 6's points from the benchmarks' JSON: each bar on both sides, and what a
run did not reach (or measured on reused blocks, or fetched only in part) is never called a pass."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def acceptance():
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module("acceptance")


def fast_run(speedup_1: float, utilisation: float, ttft_ratio: float, overhead: float, reused: int = 0) -> dict:
    decode = {"1": {"engine_tok_s": 12.6 * speedup_1, "transformers_tok_s": 12.6, "bandwidth_utilisation": utilisation},
              "128": {"engine_tok_s": 15000.0, "transformers_tok_s": 1426.0, "bandwidth_utilisation": 0.3}}
    ttft = {"8192": {"engine_ms": 100 * ttft_ratio, "transformers_ms": 100.0}}  # 32k not reached
    return {"decode": decode, "ttft": ttft, "overhead": {"ratio": overhead, "reused_blocks": reused}}


def verdicts(module, shape: str, run: dict, bar: float) -> dict[str, str]:
    return {p.name: p.row().rsplit("|", 2)[1].strip() for p in module.decode_points(shape, run, bar)}


def test_each_decode_point_passes_at_its_bar_and_fails_below_it():
    module = acceptance()
    good = verdicts(module, "8B", fast_run(20.0, 0.7, 1.0, 0.97), 0.7)
    bad = verdicts(module, "8B", fast_run(19.9, 0.69, 1.01, 0.96), 0.7)
    names = ["8B decode speed-up over transformers, batch 1", "8B bandwidth utilisation, batch 1",
             "8B TTFT at 8,192 tokens / transformers forward", "8B throughput with every tier on / off, nothing reused"]
    assert [good[n] for n in names] == ["pass"] * 4 and [bad[n] for n in names] == ["FAIL"] * 4
    assert good["8B decode speed-up over transformers, batch 128"] == "pass"  # 15000 / 1426 = 10.5x
    assert good["8B TTFT at 32,768 tokens / transformers forward"] == "-"  # not reached: no verdict


def test_an_overhead_measured_on_reused_blocks_gets_no_verdict():
    module = acceptance()
    assert verdicts(module, "1B", fast_run(25, 0.6, 0.9, 1.2, reused=6), 0.5)[
        "1B throughput with every tier on / off, nothing reused"] == "-"


def test_prefix_points_and_a_fetch_the_cost_model_stopped(tmp_path):
    module = acceptance()
    rows = [{"prefix_tokens": 16384, "recompute": 1.0, "gpu hit": 0.09, "cpu hit": 0.2, "cpu GB/s": 40.0,
             "h2d_pinned_GBps": 55.0},
            {"prefix_tokens": 32768, "recompute": 2.0, "redis hit": 1.9, "redis GB/s": 1.1,
             "redis fetch stopped": True}]
    (tmp_path / "prefix.json").write_text(json.dumps({"rows": rows}))
    points = {p.name: p.row() for p in module.prefix_points(module.load_rows(str(tmp_path / "prefix.json")))}
    assert points["8B GPU hit TTFT / recompute, 16k"].endswith("| 0.09 | pass |")
    assert points["8B CPU-tier hit TTFT / recompute, 16k"].endswith("| 0.2 | FAIL |")
    assert points["8B CPU->GPU load / pinned host-to-device, 16k"].endswith("| 0.727 | pass |")
    assert points["8B Redis hit (fresh process) TTFT / recompute, 32k"].endswith("| 0.95 | pass |")
    assert "the cost model stopped the fetch | - |" in points["8B Redis->GPU, 32k, whole prefix fetched"]
    assert module.load_rows(str(tmp_path / "missing.json")) == []


def test_the_redis_rate_point_takes_the_run_that_read_the_whole_prefix_first(tmp_path):
    module = acceptance()
    rows = [{"prefix_tokens": 32768, "recompute": 2.0, "redis hit": 1.0, "redis GB/s": 1.5,
             "redis fetch stopped": False, "redis hit, read first": 1.9, "redis GB/s, read first": 2.7,
             "redis fetch stopped, read first": False}]
    (tmp_path / "prefix.json").write_text(json.dumps({"rows": rows}))
    points = {p.name: p.row() for p in module.prefix_points(module.load_rows(str(tmp_path / "prefix.json")))}
    assert points["8B Redis hit (fresh process) TTFT / recompute, 32k"].endswith("| 0.5 | pass |")
    assert points["8B Redis->GPU, 32k, whole prefix fetched"].endswith("| 2.7 GB/s | pass |")
