"""The router's choice of a worker for one request: the cache-aware policy matching a long prompt's block
hashes against every worker's entries in the prefix index. It runs on the router's event loop, which relays
every stream's tokens, so its time is a pause for all of them.

    python bench/route_choice.py                      # 8,192 blocks (128k tokens at block size 16)
    python bench/route_choice.py --blocks 2048 --workers 4,16,64

Two indexes per worker count: "staggered" (worker w holds the first w/n of the prompt on its GPU, the next
1/n on its CPU tier, and Redis holds it all) and "every GPU" (every worker holds the whole prompt on its GPU).
The table gives the best of --repeats choices in ms. Pure Python: no torch, no network.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_json  # noqa: E402  (puts the repo on sys.path)

from router.policies import CacheAware, WorkerLoad  # noqa: E402
from router.prefix_index import PrefixIndex  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=8192, help="blocks in the prompt")
    parser.add_argument("--workers", default="2,8,32", help="worker counts, comma-separated")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json-out", help="write the results here as JSON")
    return parser.parse_args()


def indexes(hashes: list[bytes], count: int) -> dict[str, PrefixIndex]:
    staggered, every_gpu = PrefixIndex(), PrefixIndex()
    blocks = len(hashes)
    for w in range(count):
        staggered.replace(f"w{w}", {"gpu": hashes[: blocks * w // count],
                                    "cpu": hashes[blocks * w // count : blocks * (w + 1) // count]})
        every_gpu.replace(f"w{w}", {"gpu": hashes})
    staggered.redis.add(hashes)
    return {"staggered": staggered, "every GPU": every_gpu}


def best_ms(policy: CacheAware, loads: list[WorkerLoad], hashes: list[bytes], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        began = time.perf_counter()
        policy.choose(loads, hashes, 16)
        best = min(best, time.perf_counter() - began)
    return best * 1e3


def main() -> None:
    args = parse_args()
    hashes = [hashlib.sha256(str(i).encode()).digest() for i in range(args.blocks)]
    print(f"\ncache-aware choice for a prompt of {args.blocks:,} blocks, best of {args.repeats}\n")
    print("| workers | staggered, ms | every GPU, ms |")
    print("|---:|---:|---:|")
    rows = []
    for count in (int(n) for n in args.workers.split(",")):
        loads = [WorkerLoad(f"w{w}", w) for w in range(count)]
        times = {name: best_ms(CacheAware(index), loads, hashes, args.repeats)
                 for name, index in indexes(hashes, count).items()}
        rows.append({"workers": count, "blocks": args.blocks, **{f"{k} ms": v for k, v in times.items()}})
        print(f"| {count} | {times['staggered']:.1f} | {times['every GPU']:.1f} |", flush=True)
    write_json(args.json_out, "route_choice", args, rows)


if __name__ == "__main__":
    main()
