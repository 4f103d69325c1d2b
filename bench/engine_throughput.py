"""Prefill and decode throughput of one engine at several batch sizes; prints a Markdown table.

    python bench/engine_throughput.py                                   # CPU: the tiny model
    python bench/engine_throughput.py --model llama3-1b-shape --dtype bfloat16 --prompt-len 512 --decode-tokens 256
    kvtier bench engine                                                 # the same, with a PNG plot and JSON

Prefill: B prompts of --prompt-len random tokens, timed until every one has its first token.
Decode: the same B sequences generating --decode-tokens more tokens each (EOS ignored), timed from then on.
Host share: of the decode steps' time, the part not spent waiting for the device to hand back sampled tokens
(on a GPU, the host work the device does not hide; on the CPU the forward itself runs on the host, so ~1).
"""

from __future__ import annotations

import argparse
import platform
import random
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import add_engine_args, add_output_args, bar_panels, progress, write_json  # noqa: E402
from workers.engine import LLMEngine  # noqa: E402
from workers.engine_config import CacheConfig, EngineConfig, SchedulerConfig  # noqa: E402
from workers.sampling_params import SamplingParams  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(parser, default_model="tiny")
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--kv-cache-memory", default="auto")
    add_output_args(parser)
    return parser.parse_args()


class BatchTimes(NamedTuple):
    prefill_s: float
    decode_s: float
    decode_host_share: float  # of the decode steps' time, the part not spent waiting for sampled tokens


def run_batch(engine: LLMEngine, batch: int, prompt_len: int, decode_tokens: int, tag: str,
              seed: int | None = None) -> BatchTimes:
    """``batch`` random prompts (drawn from ``seed``, default the batch size) through prefill and decode."""
    rng = random.Random(batch if seed is None else seed)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(max_tokens=decode_tokens + 1, temperature=0, ignore_eos=True)
    ids = [f"{tag}-{i}" for i in range(batch)]
    for request_id in ids:
        engine.add_request(request_id, [rng.randrange(vocab) for _ in range(prompt_len)], params)
    started = set()
    start = time.perf_counter()
    while len(started) < batch:
        started |= {o.request_id for o in engine.step() if o.new_token_ids}
    prefill_done = time.perf_counter()
    step_seconds, wait_seconds = engine.stats.step_seconds, engine.stats.token_wait_seconds
    while engine.has_unfinished():
        engine.step()
    decode_s = time.perf_counter() - prefill_done
    waited = (engine.stats.token_wait_seconds - wait_seconds) / (engine.stats.step_seconds - step_seconds)
    return BatchTimes(prefill_done - start, decode_s, 1 - waited)


def describe_device(engine: LLMEngine) -> str:
    if engine.device.type == "cuda":
        return torch.cuda.get_device_name(engine.device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def main() -> None:
    args = parse_args()
    config = EngineConfig(
        model=args.model, dtype=args.dtype, device=args.device, attention_backend=args.attention_backend,
        cache=CacheConfig(memory=args.kv_cache_memory),
        scheduler=SchedulerConfig(max_num_batched_tokens=args.max_num_batched_tokens),
    )
    engine = LLMEngine.from_config(config)
    run_batch(engine, 2, 16, 4, "warmup")
    title = f"engine throughput: model {args.model}, {engine.runner.kv_cache.dtype}, {describe_device(engine)}"
    print(f"\n{title}")
    print(f"prompt {args.prompt_len} tokens, {args.decode_tokens} decoded tokens, torch {torch.__version__}\n")
    print("| batch | prefill tok/s | decode tok/s | decode ms/step | host share of a decode step |")
    print("|---:|---:|---:|---:|---:|")
    rows = []
    for batch in progress([int(b) for b in args.batch_sizes.split(",")], "batch sizes"):
        prefill_s, decode_s, host_share = run_batch(engine, batch, args.prompt_len, args.decode_tokens, f"b{batch}")
        row = {"batch": batch, "prefill_tok_s": batch * args.prompt_len / prefill_s,
               "decode_tok_s": batch * args.decode_tokens / decode_s,
               "decode_ms_per_step": 1000 * decode_s / args.decode_tokens, "decode_host_share": host_share}
        rows.append(row)
        print(f"| {batch} | {row['prefill_tok_s']:,.0f} | {row['decode_tok_s']:,.0f} | "
              f"{row['decode_ms_per_step']:.1f} | {host_share:.2f} |", flush=True)
    write_json(args.json_out, "engine", args, rows)
    batches = [f"batch {row['batch']}" for row in rows]
    bar_panels(args.plot, title, [("prefill tokens/s", batches, {"prefill": [r["prefill_tok_s"] for r in rows]}),
                                  ("decode tokens/s", batches, {"decode": [r["decode_tok_s"] for r in rows]})])


if __name__ == "__main__":
    main()
