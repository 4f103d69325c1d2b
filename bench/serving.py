"""Serving benchmark over gRPC: routing policies on shared-prefix and random workloads, and router overhead.

    python bench/serving.py                       # CPU defaults: tiny model, 2 workers, every part
    python bench/serving.py --part policies --concurrency 16 --requests 96 --prefix-len 2048
    kvtier bench serving                          # the same, with a PNG plot and JSON

Policies: for each routing policy a fresh cluster (local Ray, real workers) serves the same requests at fixed
concurrency: a shared-prefix workload (groups of requests sharing a long prefix, interleaved) and random
prompts. Per run: TTFT and ITL p50/p99 (ms), TPOT (ms), output tokens/s, and prompt tokens found per tier.
Overhead: a bench-only worker streams tokens without a model; clients call it directly or through the
router's servicer: the TTFT the router adds (p50/p99) and the tokens/s it sustains.
Priority: one worker with fewer running slots (--priority-slots) than clients; every --urgent-every-th request
is sent at priority -1. TTFT of those and of the rest, and the same requests with every priority 0.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import grpc  # noqa: E402
from common import add_output_args, bar_panels, progress, write_json  # noqa: E402  (puts the repo on sys.path)

from cluster.client import build_request  # noqa: E402
from protos.kvtier.v1 import generation_pb2 as pb  # noqa: E402
from protos.kvtier.v1 import generation_pb2_grpc as pb_grpc  # noqa: E402
from workers.sampling_params import SamplingParams  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["policies", "priority", "overhead", "all"], default="all")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--policies", default="cache_aware,least_loaded,round_robin")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--groups", type=int, default=4, help="shared prefixes in the shared-prefix workload")
    parser.add_argument("--prefix-len", type=int, default=1024)
    parser.add_argument("--question-len", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--overhead-streams", type=int, default=400)
    parser.add_argument("--priority-slots", type=int, default=4, help="the worker's max_num_seqs in --part priority")
    parser.add_argument("--urgent-every", type=int, default=8, help="every n-th request is urgent (--part priority)")
    parser.add_argument("--num-kv-blocks", type=int, help="GPU pool per worker (default: from memory)")
    parser.add_argument("--no-cpu-tier", action="store_true", help="only the GPU pool caches (no CPU tier)")
    parser.add_argument("--router-prefill-tokens-per-s", type=float, default=20000.0,
                        help="the cache_aware cost model's prefill rate (set it to the model's measured rate)")
    add_output_args(parser)
    return parser.parse_args()


@dataclass
class Sample:
    started: float
    arrivals: list[float] = field(default_factory=list)  # one per delta
    tokens: int = 0
    cached: dict[str, int] = field(default_factory=dict)
    prompt_tokens: int = 0


def run_one(stub: pb_grpc.GenerationStub, request: pb.GenerateRequest) -> Sample:
    sample = Sample(time.perf_counter())
    for response in stub.Generate(request):
        if response.HasField("delta"):
            sample.arrivals.append(time.perf_counter())
            sample.tokens += len(response.delta.token_ids)
        else:
            cached = response.final.usage.cached_tokens
            sample.cached = {"gpu": cached.gpu, "cpu": cached.cpu, "redis": cached.redis}
            sample.prompt_tokens = response.final.usage.prompt_tokens
    return sample


def run_load(address: str, requests: list[pb.GenerateRequest], concurrency: int) -> tuple[list[Sample], float]:
    channel = grpc.insecure_channel(address)
    stub = pb_grpc.GenerationStub(channel)
    began = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        samples = list(pool.map(lambda r: run_one(stub, r), requests))
    wall = time.perf_counter() - began
    channel.close()
    return samples, wall


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def summarize(samples: list[Sample], wall: float) -> dict[str, float]:
    ttft = [(s.arrivals[0] - s.started) * 1e3 for s in samples if s.arrivals]
    itl = [(b - a) * 1e3 for s in samples for a, b in zip(s.arrivals, s.arrivals[1:])]
    tpot = [(s.arrivals[-1] - s.arrivals[0]) * 1e3 / (s.tokens - 1) for s in samples if s.tokens > 1]
    prompt = sum(s.prompt_tokens for s in samples) or 1
    hits = {tier: sum(s.cached.get(tier, 0) for s in samples) / prompt for tier in ("gpu", "cpu", "redis")}
    return {
        "ttft_p50": percentile(ttft, 0.5), "ttft_p99": percentile(ttft, 0.99),
        "itl_p50": percentile(itl, 0.5), "itl_p99": percentile(itl, 0.99),
        "tpot": statistics.mean(tpot) if tpot else float("nan"),
        "tok_s": sum(s.tokens for s in samples) / wall, **{f"hit_{t}": v for t, v in hits.items()},
    }


def workloads(args: argparse.Namespace) -> dict[str, list[pb.GenerateRequest]]:
    rng = random.Random(0)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    prefixes = [[rng.randrange(3, 250) for _ in range(args.prefix_len)] for _ in range(args.groups)]
    groups = [i % args.groups for i in range(args.requests)]
    rng.shuffle(groups)  # in a fixed order, round-robin would send each group to one worker by accident
    shared = [prefixes[g] + [rng.randrange(3, 250) for _ in range(args.question_len)] for g in groups]
    random_prompts = [[rng.randrange(3, 250) for _ in range(args.prefix_len + args.question_len)]
                      for _ in range(args.requests)]
    return {"shared prefix": [build_request(p, params) for p in shared],
            "random": [build_request(p, params) for p in random_prompts]}


def bench_policies(args: argparse.Namespace) -> list[dict]:
    import ray

    from cluster.config import load_config
    from cluster.serve import start_cluster, stop_cluster

    ray.init(include_dashboard=False, log_to_driver=False)
    print(f"\n{args.workers} workers, model {args.model}, concurrency {args.concurrency}, {args.requests} requests, "
          f"prefix {args.prefix_len} + question {args.question_len} tokens, {args.max_tokens} new tokens, "
          f"{args.groups} prefix groups, GPU pool {args.num_kv_blocks or 'auto'} blocks per worker, "
          f"CPU tier {'off' if args.no_cpu_tier else 'on'}\n")
    print("| workload | policy | TTFT p50 ms | TTFT p99 ms | TPOT ms | ITL p50 ms | ITL p99 ms | tok/s | "
          "GPU hit | CPU hit | Redis hit |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for policy in progress(args.policies.split(","), "routing policies"):
        overrides = {"engine": {"model": args.model, "cache": {"num_blocks": args.num_kv_blocks}},
                     "workers": {"count": args.workers, "num_cpus": 0.5}, "router": {"port": 0, "policy": policy,
                                "prefill_tokens_per_s": args.router_prefill_tokens_per_s},
                     "kvstore": {"cpu": {"enabled": not args.no_cpu_tier}}}
        cluster = start_cluster(load_config(overrides=overrides))
        for name, requests in workloads(args).items():
            r = summarize(*run_load(cluster.address, requests, args.concurrency))
            rows.append({"workload": name, "policy": policy, **r})
            print(f"| {name} | {policy} | {r['ttft_p50']:.0f} | {r['ttft_p99']:.0f} | {r['tpot']:.1f} | "
                  f"{r['itl_p50']:.1f} | {r['itl_p99']:.1f} | {r['tok_s']:.0f} | {r['hit_gpu']:.0%} | "
                  f"{r['hit_cpu']:.0%} | {r['hit_redis']:.0%} |", flush=True)
        stop_cluster(cluster)
    ray.shutdown()
    return rows


def bench_priority(args: argparse.Namespace) -> list[dict]:
    import ray

    from cluster.config import load_config
    from cluster.serve import start_cluster, stop_cluster

    ray.init(include_dashboard=False, log_to_driver=False)
    overrides = {"engine": {"model": args.model, "scheduler": {"max_num_seqs": args.priority_slots}},
                 "workers": {"count": 1, "num_cpus": 0.5}, "router": {"port": 0}}
    cluster = start_cluster(load_config(overrides=overrides))
    rng = random.Random(1)  # fresh prompts for each run: none finds another's prefix cached

    def random_prompts() -> list[list[int]]:
        return [[rng.randrange(3, 250) for _ in range(args.prefix_len + args.question_len)]
                for _ in range(args.requests)]

    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    urgent = {i for i in range(args.requests) if i % args.urgent_every == args.urgent_every - 1}
    print(f"\npriority: 1 worker with {args.priority_slots} running slots, model {args.model}, concurrency "
          f"{args.concurrency}, {args.requests} requests ({len(urgent)} urgent: priority -1), "
          f"{args.prefix_len + args.question_len} prompt tokens, {args.max_tokens} new tokens\n")
    print("| priorities | requests | TTFT p50 ms | TTFT p99 ms | TPOT ms |")
    print("|---|---|---:|---:|---:|")
    run_load(cluster.address, [build_request(p, params) for p in random_prompts()[: args.concurrency]],
             args.concurrency)  # warm-up
    rows = []
    for sent in progress((False, True), "runs"):
        requests = [build_request(p, params, priority=-1 if sent and i in urgent else 0)
                    for i, p in enumerate(random_prompts())]
        samples, wall = run_load(cluster.address, requests, args.concurrency)
        for kind, chosen in (("urgent", urgent), ("the rest", set(range(args.requests)) - urgent)):
            r = summarize([samples[i] for i in sorted(chosen)], wall)
            rows.append({"priorities": "sent" if sent else "all 0", "requests": kind, **r})
            print(f"| {'sent' if sent else 'all 0'} | {kind} | {r['ttft_p50']:.0f} | {r['ttft_p99']:.0f} | "
                  f"{r['tpot']:.1f} |", flush=True)
    stop_cluster(cluster)
    ray.shutdown()
    return rows


class TokenEmitter(pb_grpc.GenerationServicer, pb_grpc.WorkerControlServicer):
    """A bench-only worker: streams max_tokens one-token deltas at once, no model."""

    async def Generate(self, request, context):
        for index in range(request.max_tokens):
            yield pb.GenerateResponse(delta=pb.Delta(token_ids=[index % 250]))
        yield pb.GenerateResponse(final=pb.Final(finish_reason=pb.FINISH_REASON_LENGTH, worker_id="emitter"))

    async def GetClusterInfo(self, request, context):
        return pb.ClusterInfo(model="emitter", fingerprint="0" * 64, max_model_len=1 << 20, block_size=16,
                              vocab_size=256, ready=True)

    async def WatchKVEvents(self, request, context):
        yield pb.KVEventBatch(snapshot=True)
        await asyncio.Event().wait()


async def _start_overhead_servers() -> tuple[str, str]:
    from router.policies import make_policy
    from router.prefix_index import PrefixIndex
    from router.servicer import ModelFacts, RouterServicer
    from router.worker_pool import WorkerPool
    from workers.validation import RequestLimits

    emitter = grpc.aio.server()
    servicer = TokenEmitter()
    pb_grpc.add_GenerationServicer_to_server(servicer, emitter)
    pb_grpc.add_WorkerControlServicer_to_server(servicer, emitter)
    emitter_port = emitter.add_insecure_port("127.0.0.1:0")
    await emitter.start()
    pool = WorkerPool(["emitter"], PrefixIndex())
    await pool.connect("emitter", f"127.0.0.1:{emitter_port}")
    facts = ModelFacts("emitter", "0" * 64, 16, RequestLimits(256, 1 << 20, 1 << 40, False))
    router = grpc.aio.server()
    pb_grpc.add_GenerationServicer_to_server(
        RouterServicer(pool, make_policy("cache_aware", pool.index), "cache_aware", facts, None, 1 << 20), router)
    router_port = router.add_insecure_port("127.0.0.1:0")
    await router.start()
    _start_overhead_servers.keep = (emitter, router, pool)  # the servers live as long as the loop
    return f"127.0.0.1:{emitter_port}", f"127.0.0.1:{router_port}"


def bench_overhead(args: argparse.Namespace) -> list[dict]:
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    direct, routed = asyncio.run_coroutine_threadsafe(_start_overhead_servers(), loop).result(30)
    params = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
    requests = [build_request([5] * 512, params) for _ in range(args.overhead_streams)]
    print(f"\nrouter overhead: bench-only worker streaming 64 one-token deltas, {args.overhead_streams} streams, "
          f"concurrency {args.concurrency}\n")
    print("| path | TTFT p50 ms | TTFT p99 ms | streamed tokens/s |")
    print("|---|---:|---:|---:|")
    results = {}
    for name, address in progress((("client -> worker", direct), ("client -> router -> worker", routed)), "paths"):
        run_load(address, requests[:20], args.concurrency)  # warm-up
        results[name] = summarize(*run_load(address, requests, args.concurrency))
        r = results[name]
        print(f"| {name} | {r['ttft_p50']:.2f} | {r['ttft_p99']:.2f} | {r['tok_s']:,.0f} |", flush=True)
    through_router, straight = results["client -> router -> worker"], results["client -> worker"]
    added = [through_router[k] - straight[k] for k in ("ttft_p50", "ttft_p99")]
    print(f"\nthe router adds {added[0]:.2f} ms TTFT at p50 and {added[1]:.2f} ms at p99")
    return [{"path": name, **r} for name, r in results.items()]


def plot(args: argparse.Namespace, overhead: list[dict], policies: list[dict], priority: list[dict]) -> None:
    panels = []
    if policies:
        names = list(dict.fromkeys(row["policy"] for row in policies))
        workload_names = list(dict.fromkeys(row["workload"] for row in policies))

        def series(value) -> dict[str, list[float]]:
            return {w: [value(r) for p in names for r in policies if r["policy"] == p and r["workload"] == w]
                    for w in workload_names}

        panels += [("TTFT p50 (ms)", names, series(lambda r: r["ttft_p50"])),
                   ("output tokens/s", names, series(lambda r: r["tok_s"])),
                   ("prompt tokens cached (%)", names,
                    series(lambda r: 100 * (r["hit_gpu"] + r["hit_cpu"] + r["hit_redis"])))]
    if priority:
        runs = list(dict.fromkeys(row["priorities"] for row in priority))
        panels.append(("TTFT p50 (ms) by priority", [f"priorities {run}" for run in runs],
                       {kind: [r["ttft_p50"] for r in priority if r["requests"] == kind] for kind in ("urgent",
                                                                                                     "the rest")}))
    if overhead:
        paths = [row["path"].replace(" -> ", "\n-> ") for row in overhead]
        panels.append(("router overhead: TTFT (ms)", paths, {"p50": [r["ttft_p50"] for r in overhead],
                                                              "p99": [r["ttft_p99"] for r in overhead]}))
    bar_panels(args.plot, f"kvtier serving: model {args.model}, {args.workers} workers, "
               f"concurrency {args.concurrency}", panels)


def main() -> None:
    args = parse_args()
    # Policies first: Ray forks its processes, and a fork while this process's gRPC server threads run (the
    # overhead part's) can hang the child.
    policies = bench_policies(args) if args.part in ("policies", "all") else []
    priority = bench_priority(args) if args.part in ("priority", "all") else []
    overhead = bench_overhead(args) if args.part in ("overhead", "all") else []
    write_json(args.json_out, "serving", args, [*({"part": "policies", **r} for r in policies),
                                                 *({"part": "priority", **r} for r in priority),
                                                 *({"part": "overhead", **r} for r in overhead)])
    plot(args, overhead, policies, priority)


if __name__ == "__main__":
    main()
