"""Host -> Redis write rate of kvtier's write-behind, the way it writes now against redis-py's pipeline; prints a
Markdown table.

    redis-server --port 6399 --save "" --daemonize yes [--io-threads 4]
    python bench/redis_write.py --redis-url redis://127.0.0.1:6399/0 [--value-size 2MiB] [--values 256]

Each value is a KV unit as the writer thread makes it: a header with the XXH3 of the payload (``kvstore.codec``)
and the payload, read in place from a host block (pinned on CUDA, like a gathered piece). Writes go out in the
writer's batches (``--batch-bytes``, 8 MiB by default, at most 64 values) on one connection:
- redis-py: the header and payload joined into one ``bytes`` (``codec.encode``), then ``pipeline().set`` per
  value and ``execute`` (redis-py packs every command, with hiredis into new bytes again);
- parts: ``RedisStore.put_many`` with ``codec.encode_parts``: the framing and header joined, the payload handed
  to ``sendall`` as it lies (``kvstore.resp.encode_set_commands``).
Client CPU is this process's CPU time per GB written (redis-server's is not in it). Values default to the
Llama-3-8B shape's block, 2 MiB; ``--value-size 512KiB`` is the Llama-3.2-1B shape's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import report  # noqa: E402
from redis_read import timed  # noqa: E402
from kvstore import codec  # noqa: E402
from kvstore.config import RedisConfig, parse_size  # noqa: E402
from kvstore.redis_store import RedisStore  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis-url", required=True, help="a loopback Redis this benchmark may write to")
    parser.add_argument("--value-size", default="2MiB,512KiB", help="one or more sizes, comma-separated")
    parser.add_argument("--values", type=int, default=256, help="values per timed write")
    parser.add_argument("--batch-bytes", default="8MiB", help="bytes per pipelined batch (the writer's default)")
    parser.add_argument("--repeats", type=int, default=5)
    return parser.parse_args()


def payloads(count: int, size: int) -> list[memoryview]:
    import torch

    pinned = torch.cuda.is_available()
    blocks = torch.randint(0, 256, (count, size), dtype=torch.uint8).pin_memory() if pinned else \
        torch.randint(0, 256, (count, size), dtype=torch.uint8)
    return [memoryview(block.numpy()) for block in blocks]


def unit_for(index: int, size: int) -> codec.BlockUnit:
    return codec.BlockUnit(fingerprint=bytes(32), block_hash=index.to_bytes(32, "big"), dtype="bfloat16",
                           shape=(1, 2, 1, 1, size // 4), head_start=0, head_end=1, total_heads=1)


def batches(count: int, size: int, batch_bytes: int) -> list[range]:
    per_batch = max(1, min(64, batch_bytes // size))
    return [range(start, min(count, start + per_batch)) for start in range(0, count, per_batch)]


def write_joined(store: RedisStore, keys: list[str], data: list[memoryview], groups: list[range]) -> None:
    for group in groups:
        pipe = store.client.pipeline(transaction=False)
        for i in group:
            pipe.set(keys[i], codec.encode(unit_for(i, data[i].nbytes), data[i]))
        pipe.execute()


def write_parts(store: RedisStore, keys: list[str], data: list[memoryview], groups: list[range]) -> None:
    for group in groups:
        assert store.put_many([(keys[i], codec.encode_parts(unit_for(i, data[i].nbytes), data[i])) for i in group])


def main() -> None:
    args = parse_args()
    store = RedisStore(RedisConfig(url=args.redis_url, socket_timeout_s=30))
    print(f"{args.values} values per write, batches of at most {args.batch_bytes} or 64 values, one connection, "
          f"median of {args.repeats}\n")
    print("| value size | redis-py GB/s | client CPU s/GB | parts GB/s | client CPU s/GB |")
    print("|---:|---:|---:|---:|---:|")
    try:
        for size in [parse_size(s) for s in args.value_size.split(",")]:
            keys = [f"kvtier:bench:redis_write:{size}:{i}" for i in range(args.values)]
            data, groups = payloads(args.values, size), batches(args.values, size, parse_size(args.batch_bytes))
            gigabytes = args.values * size / 1e9
            joined = timed(lambda: write_joined(store, keys, data, groups), args.repeats)
            parts = timed(lambda: write_parts(store, keys, data, groups), args.repeats)
            stored = store.get_many(keys[-1:])[0]
            assert codec.decode(stored, unit_for(args.values - 1, size)) == data[-1], "read back differs"
            store.delete(keys)
            report(f"{size:,} bytes: redis-py {gigabytes / joined[0]:.2f} GB/s, parts {gigabytes / parts[0]:.2f}")
            print(f"| {size:,} | {gigabytes / joined[0]:.2f} | {joined[1] / gigabytes:.3f} | "
                  f"{gigabytes / parts[0]:.2f} | {parts[1] / gigabytes:.3f} |", flush=True)
    finally:
        store.close()


if __name__ == "__main__":
    main()
