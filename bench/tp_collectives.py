"""What a vocab-parallel embedding and LM head would add to every step, on this machine's backend.

    python bench/tp_collectives.py [--world-size 2] [--hidden 4096] [--vocab 128256]

Vocab-parallel embedding: one all-reduce of the step's hidden states [T, hidden]. Vocab-parallel LM head: an
all-gather of the sampled rows' logits [S, vocab / tp] from every rank. Replicated (what kvtier does) costs
neither, only memory: vocab x hidden per copy on every rank. Prints a Markdown table of median microseconds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def timed(operation, repeats: int = 30) -> float:
    for _ in range(3):
        operation()
    samples = []
    for _ in range(repeats):
        began = time.perf_counter()
        operation()
        samples.append(time.perf_counter() - began)
    return statistics.median(samples) * 1e6


def rank_main(rank: int, args: argparse.Namespace, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=args.world_size)
    rows = []
    for tokens in (1, 32, 512):
        hidden = torch.randn(tokens, args.hidden)
        reduce_us = timed(lambda: dist.all_reduce(hidden))
        logits = torch.randn(min(tokens, 128), args.vocab // args.world_size)
        parts = [torch.empty_like(logits) for _ in range(args.world_size)]
        gather_us = timed(lambda: dist.all_gather(parts, logits))
        rows.append((tokens, reduce_us, gather_us))
    if rank == 0:
        print(f"gloo, {args.world_size} ranks, hidden {args.hidden}, vocab {args.vocab}, fp32, torch {torch.__version__}")
        print("| tokens in step | embedding all-reduce us | LM-head logits all-gather us |")
        print("|---:|---:|---:|")
        for tokens, reduce_us, gather_us in rows:
            print(f"| {tokens} | {reduce_us:,.0f} | {gather_us:,.0f} |")
        mib = args.vocab * args.hidden * 2 / 2**20
        print(f"\nreplication instead costs {mib:,.0f} MiB per bf16 copy (embedding; the same again for an untied head)")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=128256)
    args = parser.parse_args()
    torch.set_num_threads(1)
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(rank_main, args=(args, port), nprocs=args.world_size)


if __name__ == "__main__":
    main()
