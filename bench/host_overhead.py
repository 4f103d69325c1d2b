"""The engine's host work per decode step, with the model's forward replaced by a stub; prints a Markdown table.

    python bench/host_overhead.py                                  # batch 1, 32, 128; contexts 512 and 8k
    python bench/host_overhead.py --batch-sizes 128 --contexts 16000 --decode-graphs
    kvtier bench host                                              # the same, with a PNG plot and JSON

Everything a step does besides the forward runs for real: scheduling, the step's inputs built and copied
(``--decode-graphs``: packed into a CUDA graph's static buffers, run eagerly), sampling (greedy argmax over
the stub's logits), appending tokens, incremental detokenization, stop checks, prefix-cache hashing and the
outputs. The stub returns zero hidden states and logits that favour a different token per row and step, so
nothing stops early. On a GPU these milliseconds add to every step (the loop waits for each step's tokens), so
they are the part of a decode step's time the hardware does not set.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import add_output_args, bar_panels, progress, write_json  # noqa: E402
from kvstore.config import CpuTierConfig, KVStoreConfig, RedisConfig  # noqa: E402
from workers.engine import LLMEngine  # noqa: E402
from workers.engine_config import CacheConfig, EngineConfig, SchedulerConfig  # noqa: E402
from workers.sampling_params import SamplingParams  # noqa: E402


class StubModel(torch.nn.Module):
    """The engine's view of a model (forward, compute_logits) at no compute cost."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.calls = 0

    def forward(self, token_ids, positions, kv_cache, meta):  # [T] -> [T, 1]
        return torch.zeros(token_ids.shape[0], 1)

    def compute_logits(self, hidden):  # [S, 1] -> [S, V]
        self.calls += 1
        logits = torch.zeros(hidden.shape[0], self.vocab_size)
        rows = torch.arange(hidden.shape[0])
        logits[rows, (rows + self.calls) % (self.vocab_size - 8) + 8] = 1.0  # past the byte tokenizer's specials
        return logits


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", default="1,32,128")
    parser.add_argument("--contexts", default="512,8192", help="prompt lengths: the context each step reads")
    parser.add_argument("--decode-steps", type=int, default=64)
    parser.add_argument("--decode-graphs", action="store_true", help="build inputs as CUDA graphs read them")
    parser.add_argument("--model", default="small", help="whose config and tokenizer (its weights go unused)")
    parser.add_argument("--tiers-redis-url", help="instead: a whole run's host work with every tier on (GPU prefix "
                        "cache, CPU tier, Redis write-behind to this loopback Redis) against every tier off")
    add_output_args(parser)
    return parser.parse_args()


def stubbed_engine(model: str, batch: int, max_len: int, kvstore: KVStoreConfig | None = None) -> LLMEngine:
    config = EngineConfig(model=model, device="cpu", max_model_len=max_len,
                          cache=CacheConfig(num_blocks=batch * -(-max_len // 16) + 8),
                          scheduler=SchedulerConfig(max_num_batched_tokens=batch * max_len, max_num_seqs=batch))
    engine = LLMEngine.from_config(config, kvstore, progress=False)
    engine.runner.model = StubModel(engine.model_config.vocab_size)
    return engine


def add_requests(engine: LLMEngine, batch: int, context: int, steps: int, seed: int) -> None:
    rng = random.Random(seed)
    params = SamplingParams(max_tokens=steps + 1, temperature=0, ignore_eos=True)
    for index in range(batch):
        engine.add_request(f"{seed}-{index}", [rng.randrange(3, 250) for _ in range(context)], params)


def measure(model: str, batch: int, context: int, steps: int, decode_graphs: bool) -> float:
    """Seconds of host work per decode step of ``batch`` sequences of ``context`` tokens."""
    max_len = context + steps + 16
    engine = stubbed_engine(model, batch, max_len)
    if decode_graphs:
        engine.runner.enable_decode_graphs(batch, max_len, with_logits=True, capture=False)
    add_requests(engine, batch, context, steps, seed=batch * context)
    for _ in range(3):  # the prefill step, then two decode steps that plan storing its blocks
        engine.step()
    began = time.perf_counter()
    for _ in range(steps):
        engine.step()
    return (time.perf_counter() - began) / steps


def measure_tiers(model: str, batch: int, context: int, steps: int, redis_url: str) -> dict[str, float]:
    """Host seconds of a whole run (prefill to the last token; random prompts, so nothing is reused) with every
    tier off and on, wall time and the step loop's own CPU time (what it costs where the writer thread and
    redis-server have cores of their own; on 2 cores they take the loop's). The third of three runs: by then
    the GPU pool evicts into a CPU tier of one run's blocks that is already full, so its memory is touched
    once, as a long-running worker's is, not first here."""
    max_len = context + steps + 16
    result, kvstore = {}, KVStoreConfig(prefix_caching=False)
    for label in ("off", "on"):
        engine = stubbed_engine(model, batch, max_len, kvstore)
        one_run = CpuTierConfig(capacity=str(engine.cache_shape.num_blocks * engine.cache_shape.bytes_per_block))
        kvstore = KVStoreConfig(cpu=one_run, redis=RedisConfig(url=redis_url))  # for the "on" engine
        for run in range(3):
            written_before = drain_writes(engine)  # each run starts with an empty write queue
            add_requests(engine, batch, context, steps, seed=1000 * run + batch)
            began, began_cpu = time.perf_counter(), time.thread_time()
            while engine.has_unfinished():
                engine.step()
            result[label] = time.perf_counter() - began
            result[f"{label}_step_thread_cpu"] = time.thread_time() - began_cpu
        if label == "on":
            result["stored_blocks"] = drain_writes(engine) - written_before
        engine.close()
    return result


def drain_writes(engine: LLMEngine) -> int:
    """Wait for the Redis writes queued so far; the blocks written since the engine started."""
    if engine.tiers is None:
        return 0
    engine.tiers.writer.flush(timeout_s=60)
    return engine.kv_store_stats()["redis"]["stored_blocks"]


def main_tiers(args: argparse.Namespace, batches: list[int], contexts: list[int]) -> None:
    print(f"\nengine host work of a whole run (model stubbed), every tier off vs on, {args.model}'s config, "
          f"{args.decode_steps} decode steps, torch {torch.__version__}\n")
    print("| batch | context | blocks written | tiers off, ms | tiers on, ms | step loop CPU, off ms | on ms "
          "| added step-loop CPU µs per block |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for batch, context in progress([(b, c) for c in contexts for b in batches], "cases"):
        r = measure_tiers(args.model, batch, context, args.decode_steps, args.tiers_redis_url)
        added = r["on_step_thread_cpu"] - r["off_step_thread_cpu"]
        rows.append({"batch": batch, "context": context, **r})
        print(f"| {batch} | {context} | {r['stored_blocks']:,.0f} | {1e3 * r['off']:,.1f} | {1e3 * r['on']:,.1f} | "
              f"{1e3 * r['off_step_thread_cpu']:,.1f} | {1e3 * r['on_step_thread_cpu']:,.1f} | "
              f"{1e6 * added / max(1, r['stored_blocks']):,.0f} |", flush=True)
    write_json(args.json_out, "host_overhead_tiers", args, rows)


def main() -> None:
    args = parse_args()
    batches = [int(b) for b in args.batch_sizes.split(",")]
    contexts = [int(c) for c in args.contexts.split(",")]
    if args.tiers_redis_url:
        main_tiers(args, batches, contexts)
        return
    graphs = "decode-graph inputs" if args.decode_graphs else "eager inputs"
    print(f"\nengine host work per decode step (model stubbed), {graphs}, {args.model}'s tokenizer, "
          f"torch {torch.__version__}\n")
    print("| batch | context | host ms/step | µs per sequence |")
    print("|---:|---:|---:|---:|")
    rows = []
    for batch, context in progress([(b, c) for c in contexts for b in batches], "cases"):
        seconds = measure(args.model, batch, context, args.decode_steps, args.decode_graphs)
        rows.append({"batch": batch, "context": context, "host_ms_per_step": 1000 * seconds})
        print(f"| {batch} | {context} | {1000 * seconds:.2f} | {1e6 * seconds / batch:.1f} |", flush=True)
    write_json(args.json_out, "host_overhead", args, rows)
    series = {f"batch {b}": [r["host_ms_per_step"] for r in rows if r["batch"] == b] for b in batches}
    bar_panels(args.plot, f"engine host work per decode step ({graphs})",
               [("host ms per step", [f"context {c}" for c in contexts], series)])


if __name__ == "__main__":
    main()
