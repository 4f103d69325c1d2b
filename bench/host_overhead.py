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
    add_output_args(parser)
    return parser.parse_args()


def measure(model: str, batch: int, context: int, steps: int, decode_graphs: bool) -> float:
    """Seconds of host work per decode step of ``batch`` sequences of ``context`` tokens."""
    max_len = context + steps + 16
    config = EngineConfig(model=model, device="cpu", max_model_len=max_len,
                          cache=CacheConfig(num_blocks=batch * -(-max_len // 16) + 8),
                          scheduler=SchedulerConfig(max_num_batched_tokens=batch * context, max_num_seqs=batch))
    engine = LLMEngine.from_config(config, progress=False)
    engine.runner.model = StubModel(engine.model_config.vocab_size)
    if decode_graphs:
        engine.runner.enable_decode_graphs(batch, max_len, with_logits=True, capture=False)
    rng = random.Random(batch * context)
    params = SamplingParams(max_tokens=steps + 1, temperature=0, ignore_eos=True)
    for index in range(batch):
        engine.add_request(str(index), [rng.randrange(3, 250) for _ in range(context)], params)
    for _ in range(3):  # the prefill step, then two decode steps that plan storing its blocks
        engine.step()
    began = time.perf_counter()
    for _ in range(steps):
        engine.step()
    return (time.perf_counter() - began) / steps


def main() -> None:
    args = parse_args()
    batches = [int(b) for b in args.batch_sizes.split(",")]
    contexts = [int(c) for c in args.contexts.split(",")]
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
