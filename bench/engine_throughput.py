"""Prefill and decode throughput of one engine at several batch sizes; prints a Markdown table.

    python bench/engine_throughput.py                                   # CPU: the tiny model
    python bench/engine_throughput.py --model llama3-1b-shape --dtype bfloat16 --prompt-len 512 --decode-tokens 256

Prefill: B prompts of --prompt-len random tokens, timed until every one has its first token.
Decode: the same B sequences generating --decode-tokens more tokens each (EOS ignored), timed from then on.
"""

from __future__ import annotations

import argparse
import platform
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import add_engine_args  # noqa: E402
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
    return parser.parse_args()


def run_batch(engine: LLMEngine, batch: int, prompt_len: int, decode_tokens: int, tag: str) -> tuple[float, float]:
    """(prefill seconds, decode seconds) for one batch."""
    rng = random.Random(batch)
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
    while engine.has_unfinished():
        engine.step()
    return prefill_done - start, time.perf_counter() - prefill_done


def describe_device(engine: LLMEngine) -> str:
    if engine.device.type == "cuda":
        return torch.cuda.get_device_name(engine.device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def main() -> None:
    args = parse_args()
    config = EngineConfig(
        model=args.model, dtype=args.dtype, device=args.device,
        cache=CacheConfig(memory=args.kv_cache_memory),
        scheduler=SchedulerConfig(max_num_batched_tokens=args.max_num_batched_tokens),
    )
    engine = LLMEngine.from_config(config)
    run_batch(engine, 2, 16, 4, "warmup")
    print(f"\nengine throughput: model {args.model}, {engine.runner.kv_cache.dtype}, {describe_device(engine)}")
    print(f"prompt {args.prompt_len} tokens, {args.decode_tokens} decoded tokens, torch {torch.__version__}\n")
    print("| batch | prefill tok/s | decode tok/s | decode ms/step |")
    print("|---:|---:|---:|---:|")
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        prefill_s, decode_s = run_batch(engine, batch, args.prompt_len, args.decode_tokens, f"b{batch}")
        prefill_rate = batch * args.prompt_len / prefill_s
        decode_rate = batch * args.decode_tokens / decode_s
        print(f"| {batch} | {prefill_rate:,.0f} | {decode_rate:,.0f} | {1000 * decode_s / args.decode_tokens:.1f} |")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
