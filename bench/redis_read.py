"""Redis -> host read rate of the two ways kvtier's Redis transport reads: redis-py's MGET (``get_many``: values
become ``bytes``) and the streamed MGET (``read_into``: each value lands straight in the caller's buffer), on 1
to N connections at once; prints a Markdown table.

    redis-server --port 6399 --save "" --daemonize yes [--io-threads 4 --io-threads-do-reads yes]
    python bench/redis_read.py --redis-url redis://127.0.0.1:6399/0 [--value-size 2MiB] [--values 256]

Values default to the Llama-3-8B shape's block (16 tokens x 32 layers x K and V x 8 KV heads x 128 x bf16 =
2 MiB); the destination buffers (pinned on CUDA) are allocated and touched once, before timing, as a warm
engine's staged blocks are. Client CPU is this process's CPU time (every reader thread; redis-server's
is not in it) per GB read: where the client's cores, not the server, set the rate, it is what limits it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import report  # noqa: E402
from kvstore.config import RedisConfig, parse_size  # noqa: E402
from kvstore.redis_store import RedisStore  # noqa: E402


class Buffers:
    """One preallocated destination per value (a ``kvstore.resp.ValueSink``)."""

    def __init__(self, count: int, size: int) -> None:
        import torch

        pinned = torch.cuda.is_available()
        self.tensors = [torch.ones(size, dtype=torch.uint8, pin_memory=pinned) for _ in range(count)]
        self.views = [memoryview(tensor.numpy()) for tensor in self.tensors]
        self.missing = 0

    def buffers(self, index: int, length: int) -> list[memoryview]:
        return [self.views[index][:length]]

    def received(self, index: int, value) -> None:
        self.missing += value is None


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis-url", required=True, help="a loopback Redis this benchmark may write to")
    parser.add_argument("--value-size", default="2MiB")
    parser.add_argument("--values", type=int, default=256, help="values per read (one prefix's blocks)")
    parser.add_argument("--connections", default="1,2,4,8", help="read_parallelism values to try")
    parser.add_argument("--repeats", type=int, default=5)
    return parser.parse_args()


def timed(read, repeats: int) -> tuple[float, float]:
    """Median (wall seconds, process CPU seconds) of ``repeats`` reads after one warm-up read."""
    read()
    walls, cpus = [], []
    for _ in range(repeats):
        cpu, wall = time.process_time(), time.perf_counter()
        read()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus)


def main() -> None:
    args = parse_args()
    size = parse_size(args.value_size)
    keys = [f"kvtier:bench:redis_read:{i}" for i in range(args.values)]
    gigabytes = args.values * size / 1e9
    writer = RedisStore(RedisConfig(url=args.redis_url, socket_timeout_s=30))
    for start in range(0, len(keys), 16):
        assert writer.put_many([(key, os.urandom(size)) for key in keys[start : start + 16]]), "writes failed"
    sink = Buffers(args.values, size)
    print(f"{args.values} values of {size:,} bytes per read ({gigabytes:.2f} GB), median of {args.repeats}\n")
    print("| connections | redis-py MGET GB/s | client CPU s/GB | streamed MGET GB/s | client CPU s/GB |")
    print("|---:|---:|---:|---:|---:|")
    try:
        for connections in [int(n) for n in args.connections.split(",")]:
            store = RedisStore(RedisConfig(url=args.redis_url, read_parallelism=connections, prefetch_threads=1,
                                           socket_timeout_s=30, max_connections=connections + 1))
            plain = timed(lambda: store.get_many(keys), args.repeats)
            streamed = timed(lambda: store.read_into(keys, sink), args.repeats)
            store.close()
            assert sink.missing == 0, "values missing: is another process flushing this Redis?"
            report(f"{connections} connections: redis-py {gigabytes / plain[0]:.2f} GB/s, "
                   f"streamed {gigabytes / streamed[0]:.2f} GB/s")
            print(f"| {connections} | {gigabytes / plain[0]:.2f} | {plain[1] / gigabytes:.3f} | "
                  f"{gigabytes / streamed[0]:.2f} | {streamed[1] / gigabytes:.3f} |", flush=True)
    finally:
        writer.delete(keys)
        writer.close()


if __name__ == "__main__":
    main()
