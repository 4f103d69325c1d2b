"""Requests arriving together at a fresh worker whose prefixes Redis holds: time to first token of each, with
one prefetch thread and with several; prints a Markdown table.

    python bench/redis_burst.py --redis-url redis://127.0.0.1:6379/0          # CPU: the `small` model
    python bench/redis_burst.py --model llama3-1b-shape --dtype bfloat16 --long-len 16384 --redis-url ...

Workloads (each run in a fresh process with empty GPU and CPU tiers, after one process wrote every prefix):
- mixed: one request with a --long-len prefix, then --requests - 1 with --short-len prefixes of their own;
- shared: --requests requests with the same --long-len prefix (a document) and questions of their own;
- system: a --short-len system prompt, then one of two documents of half --long-len each (taken in turn),
  then a question: the first request's read of the system prompt is shared by all, each document's first
  request's read of it by the others about that document.
A request's question is --question-len new tokens; each answers one token. ``kvstore.redis.prefetch_threads``
reads that many requests' prefixes at once; requests wanting the same blocks share one read whatever it is.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import add_engine_args, add_output_args, progress, report, write_json  # noqa: E402

from kvstore.config import CpuTierConfig, KVStoreConfig, RedisConfig  # noqa: E402
from workers.engine import LLMEngine  # noqa: E402
from workers.engine_config import CacheConfig, EngineConfig, SchedulerConfig  # noqa: E402
from workers.sampling_params import SamplingParams  # noqa: E402

ONE_TOKEN = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
WORKLOADS = ("mixed", "shared", "system")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(parser, default_model="small")
    parser.add_argument("--long-len", type=int, default=4096)
    parser.add_argument("--short-len", type=int, default=256)
    parser.add_argument("--question-len", type=int, default=32)
    parser.add_argument("--requests", type=int, default=4)
    parser.add_argument("--threads", default="1,2", help="kvstore.redis.prefetch_threads values to compare")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="which of " + ", ".join(WORKLOADS))
    parser.add_argument("--compute-while-reading", default="auto", choices=["auto", "on", "off"],
                        help="kvstore.redis.compute_while_reading of the measured workers")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per workload and thread count")
    parser.add_argument("--redis-url", required=True, help="a Redis the benchmark may write to (loopback)")
    add_output_args(parser)
    parser.add_argument("--child", help=argparse.SUPPRESS)  # "workload,threads": one measurement
    return parser.parse_args()


def prompts(args: argparse.Namespace, workload: str) -> list[list[int]]:
    rng = random.Random(f"{workload}-{args.long_len}-{args.short_len}")
    def draw(n: int) -> list[int]:
        return [rng.randrange(3, 256) for _ in range(n)]
    document = draw(args.long_len)
    if workload == "shared":
        return [document + draw(args.question_len) for _ in range(args.requests)]
    if workload == "system":
        system, halves = draw(args.short_len), [document[: args.long_len // 2], document[args.long_len // 2 :]]
        return [system + halves[i % 2] + draw(args.question_len) for i in range(args.requests)]
    return [document + draw(args.question_len)] + [draw(args.short_len + args.question_len)
                                                   for _ in range(args.requests - 1)]


def engine_for(args: argparse.Namespace, threads: int, compute_while_reading: str = "auto") -> LLMEngine:
    num_blocks = (args.long_len + args.requests * (args.short_len + args.question_len)) // 16 * 2 + 64
    redis = RedisConfig(url=args.redis_url, prefetch_threads=threads, max_connections=max(8, threads + 2),
                        compute_while_reading=compute_while_reading)
    config = EngineConfig(model=args.model, dtype=args.dtype, device=args.device,
                          attention_backend=args.attention_backend, cache=CacheConfig(num_blocks=num_blocks),
                          scheduler=SchedulerConfig(max_num_batched_tokens=max(8192, args.long_len)))
    return LLMEngine.from_config(config, KVStoreConfig(cpu=CpuTierConfig(enabled=False), redis=redis),
                                 progress=False)


def write_prefixes(args: argparse.Namespace) -> None:
    engine = engine_for(args, 1)
    for workload in WORKLOADS:
        for prompt in prompts(args, workload):
            engine.generate([prompt], ONE_TOKEN)
    engine.close()  # every block is in Redis


def measure_in_child(args: argparse.Namespace) -> None:
    """TTFT of each request of one workload, submitted together to a fresh engine."""
    workload, threads = args.child.split(",")
    engine = engine_for(args, int(threads), args.compute_while_reading)
    # the warm-up's prompt is in no cache (an earlier process's warm-up would be in Redis)
    engine.generate([random.Random().choices(range(3, 256), k=args.question_len + 16)], ONE_TOKEN)
    sent_before, computed_before = redis_bytes_sent(engine), engine.stats.computed_tokens
    began, first = time.perf_counter(), {}
    for i, prompt in enumerate(prompts(args, workload)):
        engine.add_request(str(i), prompt, ONE_TOKEN)
    while engine.has_unfinished():
        for out in engine.step():
            first.setdefault(int(out.request_id), time.perf_counter() - began)
    sent = redis_bytes_sent(engine) - sent_before
    stats = engine.kv_store_stats()["redis"]
    engine.close()
    print(json.dumps({"ttft_s": [first[i] for i in sorted(first)], "redis_sent": sent,
                      "loaded": stats["bytes_out"], "shared_reads": stats["shared_reads"],
                      "computed_tokens": engine.stats.computed_tokens - computed_before}))


def redis_bytes_sent(engine: LLMEngine) -> int:
    """What the Redis server has sent to its clients so far (INFO stats): the bytes every read took."""
    return int(engine.tiers.redis.client.info("stats")["total_net_output_bytes"])


def run_child(args: argparse.Namespace, workload: str, threads: int) -> dict:
    child = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--child", f"{workload},{threads}"],
                           check=True, capture_output=True, text=True)
    return json.loads(child.stdout.strip().splitlines()[-1])


def main() -> None:
    args = parse_args()
    if args.child:
        measure_in_child(args)
        return
    write_prefixes(args)
    print("| workload | prefetch threads | first request TTFT ms | others' TTFT ms, median | last TTFT ms "
          "| GB Redis sent | GB loaded | shared reads | tokens computed |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    plan = [(w, int(t)) for w in args.workloads.split(",") for t in args.threads.split(",")]
    for workload, threads in progress(plan, "workloads"):
        runs = [run_child(args, workload, threads) for _ in range(args.repeats)]
        for run in runs:
            report(f"{workload}, {threads} threads: TTFT ms {[round(s * 1e3) for s in run['ttft_s']]}")
        row = {"workload": workload, "threads": threads,
               "first_ms": statistics.median(r["ttft_s"][0] for r in runs) * 1e3,
               "others_ms": statistics.median(s for r in runs for s in r["ttft_s"][1:]) * 1e3,
               "last_ms": statistics.median(max(r["ttft_s"]) for r in runs) * 1e3,
               "sent_GB": statistics.median(r["redis_sent"] for r in runs) / 1e9,
               "loaded_GB": statistics.median(r["loaded"] for r in runs) / 1e9,
               "shared_reads": runs[0]["shared_reads"],
               "computed_tokens": statistics.median(r["computed_tokens"] for r in runs)}
        rows.append(row)
        print(f"| {workload} | {threads} | {row['first_ms']:,.0f} | {row['others_ms']:,.0f} | {row['last_ms']:,.0f} "
              f"| {row['sent_GB']:.3f} | {row['loaded_GB']:.3f} | {row['shared_reads']} "
              f"| {row['computed_tokens']:,.0f} |", flush=True)
    write_json(args.json_out, "redis_burst", args, rows)


if __name__ == "__main__":
    main()
