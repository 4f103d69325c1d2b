"""A burst of requests on one long prefix that no tier holds yet (a batch of questions on a new document),
submitted to one engine at once; prints a Markdown table.

    python bench/shared_burst.py                                   # CPU: the `small` model
    python bench/shared_burst.py --model llama3-1b-shape --dtype bfloat16 --prefix-len 16384 --requests 32

For each burst size: prompt tokens the engine computed (the ideal is the prefix once plus every question),
time to first token p50 and max, and the time until every request finished. Greedy, --max-tokens each.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import add_engine_args, add_output_args, report, write_json  # noqa: E402

from workers.engine import LLMEngine  # noqa: E402
from workers.engine_config import CacheConfig, EngineConfig, SchedulerConfig  # noqa: E402
from workers.sampling_params import SamplingParams  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(parser, default_model="small")
    parser.add_argument("--prefix-len", type=int, default=2000)
    parser.add_argument("--question-len", type=int, default=32)
    parser.add_argument("--requests", default="4,16", help="burst sizes, comma-separated")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--num-kv-blocks", type=int, default=4096)
    add_output_args(parser)
    return parser.parse_args()


def burst(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams) -> dict[str, float]:
    """Submit every prompt, step until all finish; what the engine computed and when first tokens came."""
    computed_before = engine.stats.computed_tokens
    first_token_at: dict[str, float] = {}
    began = time.perf_counter()
    for index, prompt in enumerate(prompts):
        engine.add_request(f"burst-{index}", prompt, params)
    while engine.has_unfinished():
        for output in engine.step():
            if output.new_token_ids and output.request_id not in first_token_at:
                first_token_at[output.request_id] = time.perf_counter() - began
    wall = time.perf_counter() - began
    decodes = len(prompts) * (params.max_tokens - 1)
    ttfts = sorted(first_token_at.values())
    return {"computed_prompt_tokens": engine.stats.computed_tokens - computed_before - decodes,
            "ttft_p50_ms": statistics.median(ttfts) * 1e3, "ttft_max_ms": ttfts[-1] * 1e3, "all_done_ms": wall * 1e3}


def main() -> None:
    args = parse_args()
    config = EngineConfig(
        model=args.model, dtype=args.dtype, device=args.device, attention_backend=args.attention_backend,
        cache=CacheConfig(num_blocks=args.num_kv_blocks),
        scheduler=SchedulerConfig(max_num_batched_tokens=args.max_num_batched_tokens),
    )
    engine = LLMEngine.from_config(config, progress=False)
    vocab = engine.model_config.vocab_size
    rng = random.Random(0)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    engine.generate([[rng.randrange(3, vocab) for _ in range(256)]], params)  # warm-up
    rows = []
    for size in (int(n) for n in args.requests.split(",")):
        prefix = [rng.randrange(3, vocab) for _ in range(args.prefix_len)]  # a new one: no tier holds it
        prompts = [prefix + [rng.randrange(3, vocab) for _ in range(args.question_len)] for _ in range(size)]
        row = {"requests": size, "ideal_prompt_tokens": args.prefix_len + size * args.question_len,
               **burst(engine, prompts, params)}
        report(f"{size} requests: {row}")
        rows.append(row)
    print(f"\n{args.model} on {engine.device}, prefix {args.prefix_len} + question {args.question_len} tokens, "
          f"max_num_batched_tokens {args.max_num_batched_tokens}\n")
    print("| requests | prompt tokens computed (ideal) | TTFT p50 (ms) | TTFT max (ms) | all done (ms) |")
    print("|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['requests']} | {row['computed_prompt_tokens']:,} ({row['ideal_prompt_tokens']:,}) | "
              f"{row['ttft_p50_ms']:,.0f} | {row['ttft_max_ms']:,.0f} | {row['all_done_ms']:,.0f} |")
    write_json(args.json_out, "shared_burst", args, rows)


if __name__ == "__main__":
    main()
