"""Time to first token of a long shared prefix, from each place it can come from; prints a Markdown table.

    python bench/prefix_reuse.py --redis-url redis://127.0.0.1:6379/0            # CPU: the `small` model
    python bench/prefix_reuse.py --model llama3-1b-shape --dtype bfloat16 --prefix-lens 16384 --redis-url ...

For each prefix length: a question after the prefix is answered (one token) with the prefix
- recomputed (every cache off),
- found in this engine's GPU block pool,
- found in its CPU tier (the GPU copy was evicted by another prefix and spilled there),
- found in Redis, written by this process and read by a separate process with empty GPU and CPU tiers.
Load bandwidths are bytes moved / time spent moving them. A PNG plot goes to --plot, the rows as JSON to --json-out.
Each hit is timed on an engine with nothing else to do: the Redis writes of the requests before it (each prefix
is written as it is computed) have finished first. On CUDA (or with --compute-while-reading on) the Redis hit
computes the prefix's first blocks while it reads the rest from the end, where the cost model predicts that
ends sooner (``kvstore.redis.compute_while_reading``; "tokens from Redis" is then what the read supplied).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import (add_engine_args, add_output_args, bar_panels, measure_bandwidths, progress,  # noqa: E402
                    report, write_json)
from kvstore.config import CpuTierConfig, KVStoreConfig, RedisConfig  # noqa: E402
from workers.engine import LLMEngine  # noqa: E402
from workers.engine_config import CacheConfig, EngineConfig, SchedulerConfig  # noqa: E402
from workers.sampling_params import SamplingParams  # noqa: E402

ONE_TOKEN = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(parser, default_model="small")
    parser.add_argument("--prefix-lens", default="2048,4096")
    parser.add_argument("--read-parallelism", type=int, default=1, help="kvstore.redis.read_parallelism")
    parser.add_argument("--staging-memory", default="5GiB", help="kvstore.redis.staging_memory (pinned at the "
                        "start with CUDA; 5GiB holds a 32k-token prefix of the 8B shape)")
    parser.add_argument("--question-len", type=int, default=64, help="new tokens after the prefix")
    parser.add_argument("--compute-while-reading", default="auto", choices=["auto", "on", "off"],
                        help="kvstore.redis.compute_while_reading: off reads the whole prefix before computing")
    parser.add_argument("--compare-reading", action="store_true", help="time the Redis hit a second time, in "
                        "another fresh process, with compute_while_reading off (the whole prefix read first)")
    parser.add_argument("--redis-url", required=True, help="a Redis the benchmark may write to (loopback)")
    add_output_args(parser, default_plot="docs/prefix_reuse.png")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # run one Redis-hit measurement (another process)
    return parser.parse_args()


def redis_config(args: argparse.Namespace, staging_memory: str) -> RedisConfig:
    """--read-parallelism MGETs at once per read, each on its own connection (one more stays for the writer)."""
    defaults = RedisConfig()
    connections = max(defaults.max_connections, args.read_parallelism * defaults.prefetch_threads + 1)
    return RedisConfig(url=args.redis_url, read_parallelism=args.read_parallelism, max_connections=connections,
                       staging_memory=staging_memory, compute_while_reading=args.compute_while_reading)


def engine_for(args: argparse.Namespace, kvstore: KVStoreConfig, num_blocks: int) -> LLMEngine:
    config = EngineConfig(
        model=args.model, dtype=args.dtype, device=args.device,
        attention_backend=args.attention_backend, cache=CacheConfig(num_blocks=num_blocks),
        scheduler=SchedulerConfig(max_num_batched_tokens=8192),
    )
    return LLMEngine.from_config(config, kvstore, progress=False)


def ttft(engine: LLMEngine, prompt: list[int]) -> tuple[float, int]:
    """(seconds to the first token, prompt tokens that came from a cache), once earlier Redis writes are done."""
    if engine.tiers is not None and engine.tiers.writer is not None:
        assert engine.tiers.writer.flush(timeout_s=120), "earlier Redis writes did not finish in 2 minutes"
    began = time.perf_counter()
    (done,) = engine.generate([prompt], ONE_TOKEN)
    return time.perf_counter() - began, done.usage.cached_tokens.total


def prompts(prefix_len: int, vocab: int, question_len: int) -> tuple[list[int], list[list[int]]]:
    rng = random.Random(prefix_len)
    prefix = [rng.randrange(3, min(vocab, 256)) for _ in range(prefix_len)]
    questions = [[rng.randrange(3, min(vocab, 256)) for _ in range(question_len)] for _ in range(4)]
    return prefix, questions


def measure_local(args: argparse.Namespace, prefix_len: int) -> dict[str, float]:
    blocks = (prefix_len + args.question_len) // 16 + 16
    uncached = engine_for(args, KVStoreConfig(prefix_caching=False), blocks)
    prefix, questions = prompts(prefix_len, uncached.model_config.vocab_size, args.question_len)
    ttft(uncached, prefix[:256] + questions[0])  # warm-up
    results = {"recompute": ttft(uncached, prefix + questions[0])[0]}
    report(f"{prefix_len:,}-token prefix, recompute: {1e3 * results['recompute']:,.0f} ms")
    del uncached
    kvstore = KVStoreConfig(cpu=CpuTierConfig(capacity=str(2 * blocks * 2**20)),
                            redis=redis_config(args, args.staging_memory))
    engine = engine_for(args, kvstore, blocks)  # room for one prefix: a second one evicts the first
    engine.flush_cache()
    ttft(engine, prefix + questions[0])
    results["gpu hit"], cached = ttft(engine, prefix + questions[1])
    assert cached >= prefix_len - 16, cached
    report(f"{prefix_len:,}-token prefix, GPU hit: {1e3 * results['gpu hit']:,.0f} ms")
    other, _ = prompts(prefix_len + 1, engine.model_config.vocab_size, args.question_len)
    ttft(engine, other + questions[0])  # evicts the prefix from the GPU pool into the CPU tier
    results["cpu hit"], cached = ttft(engine, prefix + questions[2])
    assert cached >= prefix_len - 16, cached
    stats = engine.kv_store_stats()
    results["cpu GB/s"] = stats["cpu"]["bytes_out"] / stats["cpu"]["transfer_seconds"] / 1e9
    report(f"{prefix_len:,}-token prefix, CPU hit: {1e3 * results['cpu hit']:,.0f} ms, {results['cpu GB/s']:.2f} GB/s")
    engine.close()  # every block is in Redis before the other process reads
    for mode, suffix in [(args.compute_while_reading, "")] + [("off", ", read first")] * args.compare_reading:
        child = subprocess.run([sys.executable, __file__, "--child", str(prefix_len), *sys.argv[1:],
                                "--compute-while-reading", mode], check=True, capture_output=True, text=True)
        results.update({key + suffix: value for key, value in json.loads(child.stdout).items()})
    return results


def measure_redis_in_child(args: argparse.Namespace) -> None:
    prefix_len = int(args.child)
    kvstore = KVStoreConfig(cpu=CpuTierConfig(enabled=False), redis=redis_config(args, args.staging_memory))
    engine = engine_for(args, kvstore, (prefix_len + args.question_len) // 16 + 16)
    prefix, questions = prompts(prefix_len, engine.model_config.vocab_size, args.question_len)
    ttft(engine, questions[0] + questions[1])  # warm-up, no shared prefix
    seconds, cached = ttft(engine, prefix + questions[3])  # the cost model may stop a fetch slower than recompute
    stats = engine.kv_store_stats()["redis"]
    print(json.dumps({"redis hit": seconds, "redis GB/s": stats["bytes_out"] / stats["transfer_seconds"] / 1e9,
                      "redis tokens": cached, "redis fetch stopped": stats["skipped_fetches"] > 0}))


def main() -> None:
    args = parse_args()
    if args.child:
        measure_redis_in_child(args)
        return
    rows, bandwidth = {}, {}
    if torch.cuda.is_available():
        bandwidth = measure_bandwidths("cuda")
        print(f"pinned host-to-device {bandwidth['h2d_pinned_GBps']:.1f} GB/s, device copy "
              f"{bandwidth['d2d_GBps']:,.0f} GB/s (read + written), measured now\n")
    read_first = " | Redis hit, read first ms | Redis->GPU GB/s, read first" if args.compare_reading else ""
    print("| prefix tokens | recompute ms | GPU hit ms | CPU hit ms | Redis hit (other process) ms | tokens from Redis "
          f"| CPU->GPU GB/s | Redis->GPU GB/s{read_first} |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|" + "---:|---:|" * args.compare_reading)
    for prefix_len in progress([int(n) for n in args.prefix_lens.split(",")], "prefix lengths"):
        r = rows[prefix_len] = measure_local(args, prefix_len)
        stopped = " (the cost model stopped the fetch)" if r["redis fetch stopped"] else ""
        second = f" {r['redis hit, read first'] * 1e3:,.0f} | {r['redis GB/s, read first']:.2f} |" \
            if args.compare_reading else ""
        print(f"| {prefix_len:,} | {r['recompute'] * 1e3:,.0f} | {r['gpu hit'] * 1e3:,.0f} | {r['cpu hit'] * 1e3:,.0f}"
              f" | {r['redis hit'] * 1e3:,.0f} | {r['redis tokens']:,}{stopped} | {r['cpu GB/s']:.2f} "
              f"| {r['redis GB/s']:.2f} |{second}", flush=True)
    write_json(args.json_out, "prefix", args, [{"prefix_tokens": n, **r, **bandwidth} for n, r in rows.items()])
    modes = ["recompute", "gpu hit", "cpu hit", "redis hit"]
    series = {f"{n:,}-token prefix": [r[mode] * 1e3 for mode in modes] for n, r in sorted(rows.items())}
    bar_panels(args.plot, f"kvtier prefix reuse: {args.model}, question {args.question_len} tokens",
               [("time to first token (ms)", modes, series)])
    if args.plot:
        print(f"plot written to {args.plot}", file=sys.stderr)


if __name__ == "__main__":
    main()
