"""The ``kvtier`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from cluster.config import ConfigError, load_config
from workers.engine_config import EngineConfigError
from workers.layers import WeightLoadError
from workers.model_config import ModelConfigError
from workers.validation import InvalidRequestError

log = logging.getLogger("kvtier")

# CLI flag -> key path in the config (flags given override the config file)
_ENGINE_FLAGS = {
    "model": ("engine", "model"),
    "dtype": ("engine", "dtype"),
    "device": ("engine", "device"),
    "max_model_len": ("engine", "max_model_len"),
    "block_size": ("engine", "cache", "block_size"),
    "kv_cache_memory": ("engine", "cache", "memory"),
    "num_kv_blocks": ("engine", "cache", "num_blocks"),
    "max_num_seqs": ("engine", "scheduler", "max_num_seqs"),
    "max_num_batched_tokens": ("engine", "scheduler", "max_num_batched_tokens"),
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="kvtier: %(message)s")
    try:
        return args.handler(args)
    except (ConfigError, EngineConfigError, InvalidRequestError, ModelConfigError, WeightLoadError,
            FileNotFoundError) as error:
        print(f"kvtier: error: {error}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvtier", description="kvtier: LLM serving with tiered KV-cache offload")
    commands = parser.add_subparsers(dest="command", required=True)
    generate = commands.add_parser("generate", help="generate completions for one or more prompts, as one batch")
    _add_generate_flags(generate)
    generate.set_defaults(handler=run_generate)
    return parser


def _add_generate_flags(parser: argparse.ArgumentParser) -> None:
    prompts = parser.add_argument_group("prompts (repeatable; all are submitted together as one batch)")
    prompts.add_argument("--prompt", dest="prompts", action="append", default=[], help="text")
    prompts.add_argument("--prompt-token-ids", dest="prompts", action="append", type=_token_ids, metavar="1,2,3")
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--max-tokens", type=int, default=16)
    sampling.add_argument("--temperature", type=float, default=1.0, help="0 is greedy (default 1.0)")
    sampling.add_argument("--top-p", type=float, default=1.0)
    sampling.add_argument("--top-k", type=int, default=0, help="0 keeps every token")
    sampling.add_argument("--min-p", type=float, default=0.0)
    sampling.add_argument("--seed", type=int, default=None)
    sampling.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    sampling.add_argument("--stop-token-ids", type=_token_ids, default=(), metavar="1,2")
    sampling.add_argument("--ignore-eos", action="store_true")
    engine = parser.add_argument_group("engine (override the config file)")
    engine.add_argument("--config", help="kvtier YAML config file")
    engine.add_argument("--model", help="built-in preset (tiny) or a Hugging Face-format directory")
    engine.add_argument("--dtype", help="auto, float32, bfloat16, float16")
    engine.add_argument("--device", help="auto, cpu, cuda, cuda:N")
    engine.add_argument("--max-model-len", type=int)
    engine.add_argument("--block-size", type=int)
    engine.add_argument("--kv-cache-memory", help="auto, a fraction of free memory (0.8) or a size (4GiB)")
    engine.add_argument("--num-kv-blocks", type=int, help="exact KV pool size in blocks (overrides memory)")
    engine.add_argument("--max-num-seqs", type=int)
    engine.add_argument("--max-num-batched-tokens", type=int)
    parser.add_argument("--json", action="store_true", help="print one JSON object per prompt, in order")
    parser.add_argument("--quiet", action="store_true", help="no progress or info on stderr")


def _token_ids(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None


def engine_overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for flag, key_path in _ENGINE_FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            node = overrides
            for key in key_path[:-1]:
                node = node.setdefault(key, {})
            node[key_path[-1]] = value
    return overrides


def run_generate(args: argparse.Namespace) -> int:
    from workers.engine import LLMEngine
    from workers.sampling_params import SamplingParams

    if not args.prompts:
        raise InvalidRequestError("prompt", "give at least one --prompt or --prompt-token-ids")
    config = load_config(args.config, engine_overrides(args))
    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        min_p=args.min_p, seed=args.seed, stop=tuple(args.stop), stop_token_ids=tuple(args.stop_token_ids),
        ignore_eos=args.ignore_eos,
    )
    engine = LLMEngine.from_config(config.engine, progress=not args.quiet)
    for completion in engine.generate(args.prompts, params):
        if args.json:
            record = {
                "token_ids": completion.token_ids, "text": completion.text,
                "finish_reason": completion.finish_reason.value, "usage": asdict(completion.usage),
            }
            print(json.dumps(record), flush=True)
        else:
            print(completion.text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
