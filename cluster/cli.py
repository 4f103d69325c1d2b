"""The ``kvtier`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from cluster.bench_command import add_bench_parser
from cluster.config import ConfigError, load_config
from workers.engine_config import EngineConfigError
from workers.layers import WeightLoadError
from workers.model_config import ModelConfigError
from workers.parallel import TensorParallelError
from workers.validation import InvalidRequestError

log = logging.getLogger("kvtier")

# CLI flag -> key path in the config (flags given override the config file)
_ENGINE_FLAGS = {
    "model": ("engine", "model"),
    "dtype": ("engine", "dtype"),
    "device": ("engine", "device"),
    "attention_backend": ("engine", "attention_backend"),
    "max_model_len": ("engine", "max_model_len"),
    "block_size": ("engine", "cache", "block_size"),
    "kv_cache_memory": ("engine", "cache", "memory"),
    "num_kv_blocks": ("engine", "cache", "num_blocks"),
    "max_num_seqs": ("engine", "scheduler", "max_num_seqs"),
    "max_num_batched_tokens": ("engine", "scheduler", "max_num_batched_tokens"),
    "redis_url": ("kvstore", "redis", "url"),
    "tp": ("engine", "tensor_parallel_size"),
    "port": ("router", "port"),
    "workers": ("workers", "count"),
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "bench":  # only `kvtier bench` passes flags on (to the benchmark it runs)
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="kvtier: %(message)s")
    try:
        return args.handler(args)
    except (ConfigError, EngineConfigError, InvalidRequestError, ModelConfigError, WeightLoadError,
            FileNotFoundError, TensorParallelError) as error:
        print(f"kvtier: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # (what was running has been stopped and closed on the way out)
        print("kvtier: interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvtier", description="kvtier: LLM serving with tiered KV-cache offload")
    commands = parser.add_subparsers(dest="command", required=True)
    generate = commands.add_parser("generate", help="generate completions for one or more prompts, as one batch")
    _add_generate_flags(generate)
    generate.set_defaults(handler=run_generate)
    cache = commands.add_parser("cache", help="manage the shared KV cache")
    cache_commands = cache.add_subparsers(dest="cache_command", required=True)
    flush = cache_commands.add_parser(
        "flush", help="delete a model's (or one cache salt's) blocks from Redis; with --server, from every tier "
        "of a running cluster too (every worker's GPU and CPU tiers)")
    _add_model_flags(flush)
    flush.add_argument("--cache-salt", help="only this salt's blocks (default: every salt of the model)")
    flush.add_argument("--tenant", help="only this tenant's blocks (what requests with its tokens stored, whatever "
                       "their salts; with --cache-salt, that salt of it), in Redis or through a router without "
                       "token auth (with a token, the token names the tenant)")
    flush.add_argument("--server", help="flush a running cluster through its router (host:port): its model, "
                       "every worker's GPU and CPU tiers, and Redis")
    _add_connection_flags(flush)
    flush.add_argument("--quiet", action="store_true")
    flush.set_defaults(handler=run_cache_flush)
    serve = commands.add_parser("serve", help="start a kvtier cluster (Ray workers and the gRPC router)")
    _add_model_flags(serve)
    serve.add_argument("--port", type=int, help="router port (default 50051)")
    serve.add_argument("--workers", type=int, help="number of workers (default 2)")
    serve.add_argument("--quiet", action="store_true")
    serve.set_defaults(handler=run_serve_command)
    status = commands.add_parser(
        "status", help="workers, KV use and hit rate per tier, queues and Redis health (exit 1 unless every "
        "worker is healthy)")
    status.add_argument("--server", default="127.0.0.1:50051", help="router host:port")
    _add_connection_flags(status)
    status.add_argument("--json", action="store_true", help="print the report as one JSON object")
    status.add_argument("--watch", type=float, metavar="SECONDS", help="print a fresh report this often, until Ctrl-C")
    status.add_argument("--quiet", action="store_true")
    status.set_defaults(handler=run_status)
    add_bench_parser(commands)
    return parser


def _add_connection_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ca-file", help="TLS: the CA (PEM) that signed the router's certificate")
    parser.add_argument("--token-file", help="file holding the bearer token (default: $KVTIER_TOKEN, if set)")


def connect(args: argparse.Namespace):
    """A client of ``args.server`` with the TLS and token flags applied."""
    import os
    from pathlib import Path

    from cluster.client import KvtierClient

    token = os.environ.get("KVTIER_TOKEN") or None
    if args.token_file:
        token = Path(args.token_file).read_text().strip()
    return KvtierClient(args.server, ca_file=args.ca_file, token=token)


def _add_model_flags(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    engine = parser.add_argument_group("engine and cache (override the config file)")
    engine.add_argument("--config", help="kvtier YAML config file")
    engine.add_argument("--model", help="built-in preset (tiny) or a Hugging Face-format directory")
    engine.add_argument("--dtype", help="auto, float32, bfloat16, float16")
    engine.add_argument("--block-size", type=int)
    engine.add_argument("--redis-url", help="redis:// or rediss:// URL of the shared KV tier")
    return engine


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
    sampling.add_argument("--repetition-penalty", type=float, default=1.0,
                          help="divide (multiply, if negative) the logits of tokens in the prompt or the output; "
                               "1 is off")
    sampling.add_argument("--presence-penalty", type=float, default=0.0,
                          help="subtract from the logits of tokens the output holds, in [-2, 2]")
    sampling.add_argument("--frequency-penalty", type=float, default=0.0,
                          help="subtract per occurrence in the output, in [-2, 2]")
    sampling.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    sampling.add_argument("--stop-token-ids", type=_token_ids, default=(), metavar="1,2")
    sampling.add_argument("--ignore-eos", action="store_true")
    sampling.add_argument("--min-tokens", type=int, default=0,
                          help="generate at least this many tokens before EOS, a stop token id or a stop string")
    sampling.add_argument("--logprobs", type=int, metavar="N",
                          help="with --json: each generated token's log-probability and its N most likely "
                               "alternatives' (0-20)")
    sampling.add_argument("--prompt-logprobs", type=int, metavar="N",
                          help="with --json: each prompt token's log-probability given those before it and its N "
                               "most likely alternatives' (0-20), one per prompt position (the first is null); "
                               "the whole prompt is computed (no cached block is read)")
    sampling.add_argument("--priority", type=int, default=0,
                          help="scheduling priority of each prompt, lower first (0; with --server, against the "
                               "cluster's other requests)")
    engine = _add_model_flags(parser)
    engine.add_argument("--device", help="auto, cpu, cuda, cuda:N")
    engine.add_argument("--attention-backend", help="torch (reference) or triton (paged kernels, CUDA)")
    engine.add_argument("--max-model-len", type=int)
    engine.add_argument("--tp", type=int, help="tensor-parallel ranks (local processes), default 1")
    engine.add_argument("--kv-cache-memory", help="auto, a fraction of free memory (0.8) or a size (4GiB)")
    engine.add_argument("--num-kv-blocks", type=int, help="exact KV pool size in blocks (overrides memory)")
    engine.add_argument("--max-num-seqs", type=int)
    engine.add_argument("--max-num-batched-tokens", type=int)
    engine.add_argument("--cache-salt", help="tenant salt: blocks are shared only between requests with the same")
    engine.add_argument("--no-cache", action="store_true", help="turn every KV cache tier off (recompute all)")
    parser.add_argument("--server", help="send the prompts to a running cluster's router (host:port)")
    _add_connection_flags(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object per prompt, in order")
    parser.add_argument("--stream", action="store_true", help="print one prompt's text as it is generated")
    parser.add_argument("--stats", action="store_true", help="print engine and KV tier counters to stderr as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress or info on stderr")


def _token_ids(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None


def engine_overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    if getattr(args, "no_cache", False):
        overrides["kvstore"] = {"prefix_caching": False}
    for flag, key_path in _ENGINE_FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            node = overrides
            for key in key_path[:-1]:
                node = node.setdefault(key, {})
            node[key_path[-1]] = value
    return overrides


def sampling_params_of(args: argparse.Namespace):
    from workers.sampling_params import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        min_p=args.min_p, seed=args.seed, repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty, stop=tuple(args.stop),
        stop_token_ids=tuple(args.stop_token_ids), ignore_eos=args.ignore_eos, min_tokens=args.min_tokens,
        logprobs=args.logprobs,
        prompt_logprobs=args.prompt_logprobs,
    )


def run_generate(args: argparse.Namespace) -> int:
    from cluster.client import logprobs_record
    from workers.engine import LLMEngine

    if not args.prompts:
        raise InvalidRequestError("prompt", "give at least one --prompt or --prompt-token-ids")
    if args.stream:
        return run_streamed_generate(args)
    if args.server:
        return run_remote_generate(args)
    config = load_config(args.config, engine_overrides(args))
    params = sampling_params_of(args)
    engine = LLMEngine.from_config(config.engine, config.kvstore, progress=not args.quiet)
    try:
        completions = engine.generate(args.prompts, params, cache_salt=args.cache_salt, priority=args.priority)
    finally:
        engine.close()  # queued Redis writes land before the process exits
    for completion in completions:
        record = {"token_ids": completion.token_ids, "text": completion.text,
                  "finish_reason": completion.finish_reason.value, "usage": asdict(completion.usage),
                  "seed": completion.seed}
        print_completion(args, record, [logprobs_record(lp.token_id, lp.logprob, lp.top) for lp in completion.logprobs],
                         [logprobs_record(lp.token_id, lp.logprob, lp.top) for lp in completion.prompt_logprobs])
    if args.stats:
        stats = {"engine": asdict(engine.stats), "kvstore": engine.kv_store_stats()}
        print(f"kvtier stats: {json.dumps(stats)}", file=sys.stderr, flush=True)
    return 0


def run_streamed_generate(args: argparse.Namespace) -> int:
    """``--stream``: one prompt's text as it is generated, from a router (``--server``) or a local engine."""
    if len(args.prompts) != 1 or args.json:
        raise InvalidRequestError("stream", "--stream takes one prompt, and not --json")
    params = sampling_params_of(args)
    if args.server:
        return _stream_from_server(args, params)
    from workers.engine import LLMEngine

    config = load_config(args.config, engine_overrides(args))
    engine = LLMEngine.from_config(config.engine, config.kvstore, progress=not args.quiet)
    try:
        engine.add_request("stream", args.prompts[0], params, args.cache_salt, priority=args.priority)
        while engine.has_unfinished():
            for output in engine.step():
                print(output.new_text, end="", flush=True)
    finally:
        engine.close()
    print(flush=True)
    return 0


def _stream_from_server(args: argparse.Namespace, params) -> int:
    import grpc

    from cluster.client import build_request

    client = connect(args)
    try:
        for response in client.stream(build_request(args.prompts[0], params, args.cache_salt, priority=args.priority)):
            if response.HasField("delta"):
                print(response.delta.text, end="", flush=True)
    except grpc.RpcError as error:
        print(f"\nkvtier: error: {error.code().name}: {error.details()}", file=sys.stderr)
        return 2
    finally:
        client.close()
    print(flush=True)
    return 0


def run_remote_generate(args: argparse.Namespace) -> int:
    """The prompts go to a router, concurrently (the cluster batches them); output as the offline form."""
    from concurrent.futures import ThreadPoolExecutor

    import grpc

    client = connect(args)
    params = sampling_params_of(args)
    try:
        with ThreadPoolExecutor(max_workers=min(32, len(args.prompts))) as pool:
            completions = list(pool.map(lambda p: client.complete(p, params, args.cache_salt, priority=args.priority),
                                        args.prompts))
    except grpc.RpcError as error:
        print(f"kvtier: error: {error.code().name}: {error.details()}", file=sys.stderr)
        return 2
    finally:
        client.close()
    for completion in completions:
        record = {"token_ids": completion.token_ids, "text": completion.text,
                  "finish_reason": completion.finish_reason, "usage": completion.usage, "seed": completion.seed}
        print_completion(args, record, completion.logprobs, completion.prompt_logprobs)
    return 0


def print_completion(args: argparse.Namespace, record: dict, logprobs: list[dict], prompt_logprobs: list[dict]) -> None:
    """With --json, ``record`` and the log-probabilities asked for (the prompt's aligned with its positions: the
    first token has none); else the text."""
    if not args.json:
        print(record["text"], flush=True)
        return
    if args.logprobs is not None:
        record["logprobs"] = logprobs
    if args.prompt_logprobs is not None:
        record["prompt_logprobs"] = [None, *prompt_logprobs]
    print(json.dumps(record), flush=True)


def run_serve_command(args: argparse.Namespace) -> int:
    from cluster.serve import run_serve

    return run_serve(load_config(args.config, engine_overrides(args)))


def run_status(args: argparse.Namespace) -> int:
    """One report, or with ``--watch`` a fresh one every so many seconds until Ctrl-C (exit 0 then)."""
    client = connect(args)
    try:
        while True:
            code = _print_status(client, args)
            if not args.watch:  # watching goes on through errors (a router restarting, say)
                return code
            time.sleep(args.watch)
    except KeyboardInterrupt:
        return 0
    finally:
        client.close()


def _print_status(client, args: argparse.Namespace) -> int:
    import grpc

    from cluster.status_view import render_status, status_report

    try:
        report = status_report(client.cluster_info(), client.stats())
    except grpc.RpcError as error:
        print(f"kvtier: error: {args.server}: {error.code().name}: {error.details()}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report), flush=True)
    else:
        clear = "\x1b[H\x1b[2J" if args.watch and sys.stdout.isatty() else ""
        stamp = f"{time.strftime('%H:%M:%S')}  " if args.watch else ""
        print(f"{clear}{stamp}{render_status(report, args.server)}\n", flush=True)
    return 0 if report["ready"] else 1


def _flushed_salts(args: argparse.Namespace):
    """The salts ``kvtier cache flush`` covers, and how to name them in its report ("" for every salt)."""
    from kvstore.redis_keys import SaltSelection
    from router.tenancy import tenant_salt, tenant_scope

    if args.tenant is not None and args.cache_salt is not None:
        return SaltSelection.one_salt(tenant_salt(args.tenant, args.cache_salt)), \
            f"cache salt {args.cache_salt!r} of tenant {args.tenant!r}"
    if args.tenant is not None:
        return SaltSelection.in_scope(tenant_scope(args.tenant)), f"tenant {args.tenant!r}"
    if args.cache_salt is not None:
        return SaltSelection.one_salt(args.cache_salt), f"cache salt {args.cache_salt!r}"
    return SaltSelection(), ""


def run_cache_flush(args: argparse.Namespace) -> int:
    if args.server:
        return _flush_cluster(args)
    from kvstore.redis_keys import flush_pattern
    from kvstore.redis_store import RedisStore
    from workers.model_loader import model_fingerprint_of

    config = load_config(args.config, engine_overrides(args))
    if config.kvstore.redis.url is None:
        raise ConfigError("kvstore.redis.url: flush needs a Redis URL (--redis-url or the config file)")
    fingerprint = model_fingerprint_of(config.engine)
    salts, named = _flushed_salts(args)
    store = RedisStore(config.kvstore.redis)
    deleted = store.delete_matching(flush_pattern(fingerprint, salts))
    store.close()
    if deleted is None:
        print(f"kvtier: error: Redis at {config.kvstore.redis.url} did not answer", file=sys.stderr)
        return 1
    scope = f"{named} of " if named else ""
    print(f"deleted {deleted} keys (block units and manifests) of {scope}model {config.engine.model} "
          f"({fingerprint[:16]}) from Redis")
    return 0


def _flush_cluster(args: argparse.Namespace) -> int:
    """Exit 0 only when every worker and Redis were flushed."""
    import grpc

    salts, named = _flushed_salts(args)
    client = connect(args)
    if args.tenant is not None and client.metadata:
        client.close()
        raise InvalidRequestError("tenant", "a token names its tenant already: flush with the token alone")
    try:
        response = client.flush_cache(None if salts.everything else salts.salt, salts.scope)
    except grpc.RpcError as error:
        print(f"kvtier: error: {args.server}: {error.code().name}: {error.details()}", file=sys.stderr)
        return 2
    finally:
        client.close()
    for worker_id, flushed in sorted(response.workers.items()):
        print(f"{worker_id}: dropped {flushed.gpu_blocks} GPU blocks and {flushed.cpu_blocks} CPU-tier blocks")
    scope = f" of {named}" if named else ""
    print(f"Redis: deleted {response.redis_keys} keys (block units and manifests){scope}")
    for worker_id, why in sorted(response.not_flushed.items()):
        print(f"kvtier: error: {worker_id} was not flushed: {why}", file=sys.stderr)
    if response.redis_error:
        print(f"kvtier: error: {response.redis_error}", file=sys.stderr)
    return 1 if response.not_flushed or response.redis_error else 0


if __name__ == "__main__":
    sys.exit(main())
