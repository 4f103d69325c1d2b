"""A tensor-parallel rank other than 0: load this rank's slice, then run every step rank 0 broadcasts.

    python -m workers.tp_worker --rank R --world-size N --port P --config-json '{...}'

Started by ``workers.tp_group.spawn_local_ranks`` (Ray rank actors call ``serve``: ``cluster.rank_actor``).
Exits 0 when rank 0 says stop, non-zero (with the reason on stderr) when rank 0 disappears or a collective
times out.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

import torch
import torch.distributed as dist

from workers.attention import make_backend
from workers.block_mover import BlockMover, TierOps
from workers.decode_graphs import decode_graph_batch
from workers.engine import max_model_len, resolve_device
from workers.engine_config import EngineConfig, engine_config_from_dict
from workers.kv_cache import KVCacheShape, allocate_kv_cache
from workers.model_config import load_model_config
from workers.model_loader import load_model, resolve_dtype
from workers.parallel import ParallelContext
from workers.presets import resolve_model_dir
from workers.runner import ModelRunner
from workers.tp_group import announce_joining, init_group, rank_device, rendezvous

log = logging.getLogger("kvtier.rank")


def serve(config: EngineConfig, rank: int, world_size: int, port: int) -> None:
    device = rank_device(resolve_device(config.device), rank)
    store = rendezvous(rank, world_size, port, config.collective_timeout_s)
    announce_joining(store, rank)
    collectives = init_group(rank, world_size, store, device, config.collective_timeout_s)
    parallel = ParallelContext(rank, world_size)
    model_dir = resolve_model_dir(config.model)
    model_config = load_model_config(model_dir)
    dtype = resolve_dtype(config.dtype, model_config)
    model = load_model(model_dir, dtype, str(device), make_backend(config.attention_backend, str(device)), False,
                       parallel)
    num_blocks, num_cpu_slots = collectives.receive_header(2).tolist()
    kv_heads = parallel.kv_heads(model_config)
    shape = KVCacheShape(num_blocks, model_config.num_layers, config.cache.block_size, kv_heads.size,
                         model_config.head_dim, dtype)
    kv_cache = allocate_kv_cache(shape, device)
    model_len = max_model_len(config, model_config)
    runner = ModelRunner(model, kv_cache, config.cache.block_size, device, config.scheduler.max_num_seqs, model_len)
    mover = BlockMover(kv_cache, num_cpu_slots, kv_heads, model_config.num_kv_heads, parallel, collectives.device)
    if max_batch := decode_graph_batch(config, device):  # rank 0 captures at this point too
        runner.enable_decode_graphs(max_batch, model_len, with_logits=False, capture=True)
    while (message := collectives.receive_message()) is not None:
        if isinstance(message, TierOps):
            mover.apply(message)
        else:
            runner.run(message, with_logits=False)
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--config-json", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format=f"kvtier rank {args.rank}: %(message)s")
    torch.set_num_threads(max(1, torch.get_num_threads() // args.world_size))
    try:
        serve(engine_config_from_dict(json.loads(args.config_json)), args.rank, args.world_size, args.port)
    except RuntimeError as error:  # rank 0 went away or a collective timed out: the group is over
        log.error("stopping: %s", error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
