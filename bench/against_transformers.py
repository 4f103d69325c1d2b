"""The engine against transformers on the same weights, and against the GPU's memory bandwidth (CUDA only).

    python bench/against_transformers.py --model llama3-1b-shape --dtype bfloat16 --redis-url redis://127.0.0.1:6399/0

In one run, on one GPU, printing a Markdown table per part:
1. bandwidth: device-to-device copy (bytes read + written per second) and pinned host-to-device;
2. decode: B prompts of --prompt-len tokens, --decode-tokens new tokens each, for every batch size: engine
   tokens/s end to end (prefill included, as ``generate`` counts) and decode-only; transformers ``generate``
   tokens/s on the same weights; the speed-up; memory-bandwidth utilisation of a decode step, (weight bytes +
   KV bytes read) / step time / the device-to-device bandwidth above; the host share of a decode step (the
   part not spent waiting for sampled tokens: what overlapping scheduling with the GPU could win back);
3. TTFT of one --ttft-lens prompt: engine (the prompt in one step, and in chunks of --ttft-chunk tokens, the
   later chunks attending over the cached earlier ones) vs transformers' forward (last position's logits only);
4. caching overhead: decode tokens/s at --overhead-batch with GPU prefix cache, CPU tier and Redis
   write-behind on (--redis-url) vs every tier off, on random prompts that never share a block.
Engines run with decode CUDA graphs (--no-cuda-graphs: without) on the --attention-backend (default triton).
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import add_output_args, measure_bandwidths, progress, report, synced, write_json  # noqa: E402
from engine_throughput import run_batch  # noqa: E402
from kvstore.config import CpuTierConfig, KVStoreConfig, RedisConfig  # noqa: E402
from workers.engine import LLMEngine  # noqa: E402
from workers.engine_config import CacheConfig, EngineConfig, SchedulerConfig  # noqa: E402
from workers.presets import resolve_model_dir  # noqa: E402
from workers.sampling_params import SamplingParams  # noqa: E402

NO_TIERS = KVStoreConfig(prefix_caching=False)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama3-1b-shape", help="preset name or model directory")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="cuda", help="cuda (what the numbers are for); cpu: a smoke run")
    parser.add_argument("--attention-backend", default="triton")
    parser.add_argument("--no-cuda-graphs", action="store_true")
    parser.add_argument("--batch-sizes", default="1,32,128")
    parser.add_argument("--transformers-batch-sizes", help="the batch sizes generate runs at (default: all of them)")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=256)
    parser.add_argument("--ttft-lens", default="8192,32768")
    parser.add_argument("--ttft-chunk", type=int, default=8192, help="the chunked-prefill token budget also timed")
    parser.add_argument("--overhead-batch", type=int, default=32)
    parser.add_argument("--redis-url", help="a loopback Redis for the caching-overhead run (else CPU tier only)")
    parser.add_argument("--kv-cache-memory", default="16GiB")
    parser.add_argument("--bandwidth-mib", type=int, default=1024, help="buffer size of the bandwidth copies")
    parser.add_argument("--skip", default="", help="parts to leave out: decode,ttft,overhead,transformers")
    add_output_args(parser)
    args = parser.parse_args()
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    theirs = args.transformers_batch_sizes
    args.transformers_batch_sizes = [int(b) for b in theirs.split(",")] if theirs else args.batch_sizes
    if not set(args.transformers_batch_sizes) <= set(args.batch_sizes):
        parser.error(f"--transformers-batch-sizes {theirs}: each must be one of --batch-sizes")
    return args


def make_engine(args: argparse.Namespace, kvstore: KVStoreConfig = NO_TIERS, max_tokens: int = 8192) -> LLMEngine:
    config = EngineConfig(
        model=args.model, dtype=args.dtype, device=args.device, attention_backend=args.attention_backend,
        cuda_graphs=not args.no_cuda_graphs, cache=CacheConfig(memory=args.kv_cache_memory),
        scheduler=SchedulerConfig(max_num_batched_tokens=max_tokens),
    )
    return LLMEngine.from_config(config, kvstore, progress=False)


def release(engine: LLMEngine) -> None:
    engine.close()
    del engine
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def weight_bytes(engine: LLMEngine) -> int:
    """Bytes a decode step reads of the weights: every parameter once (a tied embedding is the LM head)."""
    return sum(p.numel() * p.element_size() for p in engine.runner.model.parameters())


def kv_bytes_read(engine: LLMEngine, batch: int, context: float) -> float:
    """Bytes of K and V one decode step reads: every layer's KV of ``context`` tokens per sequence."""
    shape = engine.cache_shape
    return batch * context * shape.bytes_per_block / shape.block_size


def engine_decode(args: argparse.Namespace, batches: list[int], d2d: float) -> dict[int, dict]:
    engine = make_engine(args)
    run_batch(engine, 2, 16, 4, "warmup")
    rows = {}
    for batch in progress(batches, "engine batches"):
        prefill_s, decode_s, host_share = run_batch(engine, batch, args.prompt_len, args.decode_tokens, f"b{batch}")
        step_s = decode_s / args.decode_tokens
        moved = weight_bytes(engine) + kv_bytes_read(engine, batch, args.prompt_len + args.decode_tokens / 2)
        rows[batch] = {"engine_tok_s": batch * (args.decode_tokens + 1) / (prefill_s + decode_s),
                       "engine_decode_tok_s": batch / step_s, "step_ms": 1e3 * step_s,
                       "bandwidth_utilisation": moved / step_s / (d2d * 1e9), "host_share": host_share}
        report(f"engine, batch {batch}: {rows[batch]['engine_tok_s']:,.0f} tok/s end to end, {1e3 * step_s:.2f} ms "
               f"per decode step, bandwidth utilisation {rows[batch]['bandwidth_utilisation']:.2f}")
    release(engine)
    return rows


def load_transformers(args: argparse.Namespace):
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, args.dtype)
    return AutoModelForCausalLM.from_pretrained(resolve_model_dir(args.model), dtype=dtype).to(args.device).eval()


def transformers_generate(model, args: argparse.Namespace, batch: int) -> float:
    """Tokens/s of ``generate`` (greedy, --decode-tokens + 1 new tokens, EOS ignored), prefill included."""
    rng = random.Random(batch)
    ids = torch.tensor([[rng.randrange(3, 256) for _ in range(args.prompt_len)] for _ in range(batch)],
                       device=args.device)
    new = args.decode_tokens + 1
    seconds = synced(lambda: model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                            min_new_tokens=new, do_sample=False, pad_token_id=0))
    return batch * new / seconds


def transformers_ttft(model, length: int) -> float:
    ids = torch.randint(3, 256, (1, length), device=model.device)
    with torch.inference_mode():
        model(ids[:, :128], logits_to_keep=1)  # warm-up
        return synced(lambda: model(ids, logits_to_keep=1))


def engine_ttft(engine: LLMEngine, length: int) -> float:
    prompt = [random.Random(length).randrange(3, 256) for _ in range(length)]
    return synced(lambda: engine.generate([prompt], SamplingParams(max_tokens=1, ignore_eos=True)))


def caching_overhead(args: argparse.Namespace) -> dict[str, float]:
    """Decode tokens/s at --overhead-batch with every tier on vs off (random prompts: nothing is reused, which
    the tiers' hit counters confirm; the model's blocks left in Redis by an earlier run are flushed first)."""
    redis = RedisConfig(url=args.redis_url) if args.redis_url else RedisConfig()
    result = {}
    for label, kvstore in (("tiers off", NO_TIERS), ("tiers on", KVStoreConfig(cpu=CpuTierConfig(), redis=redis))):
        engine = make_engine(args, kvstore)
        engine.flush_cache()
        run_batch(engine, 2, 16, 4, "warmup", seed=1 << 20)  # prompts the measured runs (seeds 0 and 1) never share
        times = [run_batch(engine, args.overhead_batch, args.prompt_len, args.decode_tokens, f"{label}{i}", seed=i)
                 for i in range(2)]  # new prompts each run: the second must not hit what the first cached
        seconds = min(t.prefill_s + t.decode_s for t in times)  # the better of two
        result[label] = args.overhead_batch * (args.decode_tokens + 1) / seconds
        report(f"caching overhead, {label}: {result[label]:,.0f} tok/s")
        if label == "tiers on":
            result["reused_blocks"] = sum(tier["hit_blocks"] for tier in engine.kv_store_stats().values())
        release(engine)
    result["ratio"] = result["tiers on"] / result["tiers off"]
    return result


def print_decode(rows: dict[int, dict]) -> None:
    print("\n| batch | engine tok/s | engine decode tok/s | decode ms/step | transformers tok/s | speed-up "
          "| bandwidth utilisation | host share of a step |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for batch, r in rows.items():
        theirs = r.get("transformers_tok_s")
        speedup = _cell(theirs and r["engine_tok_s"] / theirs, ".1f") + ("x" if theirs else "")
        print(f"| {batch} | {r['engine_tok_s']:,.0f} | {r['engine_decode_tok_s']:,.0f} | {r['step_ms']:.2f} | "
              f"{_cell(theirs, ',.1f')} | {speedup} | {r['bandwidth_utilisation']:.2f} | {r['host_share']:.2f} |")


def _cell(value: float | None, spec: str) -> str:
    """A table cell for a value that a skipped part (``--skip transformers``) leaves out: "-" then."""
    return format(value, spec) if value else "-"


def ttft_rows(args: argparse.Namespace, lengths: list[int], skip: set[str]) -> dict[int, dict]:
    """The prompt prefilled in one step (a token budget of the longest prompt), and in --ttft-chunk chunks."""
    rows = {n: {} for n in lengths}
    for label, budget in (("engine_ms", max(lengths)), ("engine_chunked_ms", args.ttft_chunk)):
        engine = make_engine(args, max_tokens=budget)
        engine_ttft(engine, 256)  # warm-up
        for n in progress(lengths, f"TTFT ({label})"):
            rows[n][label] = 1e3 * engine_ttft(engine, n)
            report(f"engine TTFT ({label}), {n:,} tokens: {rows[n][label]:,.1f} ms")
        release(engine)
    if "transformers" not in skip:
        model = load_transformers(args)
        for n in lengths:
            rows[n]["transformers_ms"] = 1e3 * transformers_ttft(model, n)
            report(f"transformers forward, {n:,} tokens: {rows[n]['transformers_ms']:,.1f} ms")
        del model
    print(f"\n| prompt tokens | engine TTFT ms, one step | engine, chunks of {args.ttft_chunk} | transformers forward ms "
          "| ratio, one step |")
    print("|---:|---:|---:|---:|---:|")
    for n, r in rows.items():
        theirs = r.get("transformers_ms")
        print(f"| {n:,} | {r['engine_ms']:,.1f} | {r['engine_chunked_ms']:,.1f} | {_cell(theirs, ',.1f')} | "
              f"{_cell(theirs and r['engine_ms'] / theirs, '.2f')} |")
    return rows


def main() -> None:
    args = parse_args()
    skip = set(filter(None, args.skip.split(",")))
    bandwidth = measure_bandwidths(args.device, args.bandwidth_mib * 2**20)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"{device_name}, model {args.model}, {args.dtype}, backend {args.attention_backend}, "
          f"CUDA graphs {'off' if args.no_cuda_graphs else 'on'}, torch {torch.__version__}")
    print(f"device copy {bandwidth['d2d_GBps']:,.0f} GB/s (read + written), "
          f"pinned host-to-device {bandwidth['h2d_pinned_GBps']:,.1f} GB/s", flush=True)
    results: dict = {"bandwidth": bandwidth}
    if "decode" not in skip:
        rows = results["decode"] = engine_decode(args, args.batch_sizes, bandwidth["d2d_GBps"])
        if "transformers" not in skip:
            model = load_transformers(args)
            for batch in progress(args.transformers_batch_sizes, "transformers batches"):
                rows[batch]["transformers_tok_s"] = transformers_generate(model, args, batch)
                report(f"transformers generate, batch {batch}: {rows[batch]['transformers_tok_s']:,.1f} tok/s")
            del model
        print_decode(rows)
    if "ttft" not in skip:
        results["ttft"] = ttft_rows(args, [int(n) for n in args.ttft_lens.split(",")], skip)
    if "overhead" not in skip:
        o = results["overhead"] = caching_overhead(args)
        print(f"\ncaching overhead, batch {args.overhead_batch}, {o['reused_blocks']} blocks reused: tiers off "
              f"{o['tiers off']:,.0f} tok/s, on {o['tiers on']:,.0f} tok/s, ratio {o['ratio']:.3f}")
    write_json(args.json_out, "against_transformers", args, [results])


if __name__ == "__main__":
    main()
