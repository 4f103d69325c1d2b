"""Tier copies on CUDA (skipped without it): exact blocks on the side stream, and the host never waits."""

from __future__ import annotations

import pytest
import torch

from tests.gpu.sync import no_host_sync
from tests.integration.test_block_mover import DIMS, block_values, mover_for, numbered_cache, run_ops_and_read
from workers.block_mover import BlockMover, TierOps

pytestmark = pytest.mark.gpu


def test_side_stream_copies_land_exact_blocks_in_order():
    cache, host = run_ops_and_read("cuda")
    assert host == [2, 3, 4, 6, -1, 7]
    assert cache == [100, 101, 2, 3, 3, 7, 2, 7]


def test_spills_and_loads_do_not_synchronise_the_host():
    cache = numbered_cache(64, "cuda")
    mover = mover_for(cache, num_cpu_slots=64)
    staged = [torch.full(DIMS, 5.0, pin_memory=True) for _ in range(4)]
    ops = TierOps(gather_blocks=[33, 50, 51, 52], spills=[(b, b) for b in range(32)],
                  cpu_loads=[(s, 32 + s) for s in range(8)], full_loads=[60, 61, 62, 63])
    gathered = []

    def move_then_compute():
        gathered.append(mover.apply(ops, staged))
        cache.add_(0)  # compute-stream work after the moves waits for them on the GPU, not on the host

    no_host_sync(move_then_compute)
    assert block_values(gathered[0].wait()) == [33, 50, 51, 52]  # block 33 as it was before the load into it
    assert all(block.is_pinned() for block in gathered[0].pieces)
    torch.cuda.synchronize()
    assert block_values(mover.host)[:32] == list(range(32))
    assert block_values(cache)[32:40] == list(range(8)) and block_values(cache)[60:] == [5.0] * 4


def test_loads_into_blocks_being_spilled_wait_for_the_piece_that_read_them():
    """Three spill pieces (64 + 64 + 2 blocks) on the device-to-host stream, and loads into those very blocks on
    the host-to-device stream: every block is spilled as it was, then holds what was loaded."""
    cache = numbered_cache(130, "cuda")
    mover = mover_for(cache, num_cpu_slots=260)
    mover.host[130:].copy_(torch.arange(1000, 1130, dtype=torch.float32).view(-1, 1, 1, 1, 1, 1).expand(-1, *DIMS))
    ops = TierOps(spills=[(block, block) for block in range(130)],
                  cpu_loads=[(130 + block, block) for block in reversed(range(130))])
    mover.apply(ops)
    torch.cuda.synchronize()
    assert block_values(mover.host[:130]) == list(range(130))
    assert block_values(cache) == list(range(1000, 1130))


def test_an_engine_on_cuda_reuses_a_spilled_prefix_and_times_its_load_on_the_gpu():
    """A prefix evicted to the CPU tier comes back with the same tokens; its load time comes from CUDA events
    (the copies are asynchronous), so the stats give a load rate."""
    from kvstore.config import CpuTierConfig, KVStoreConfig
    from workers.engine import LLMEngine
    from workers.engine_config import CacheConfig, EngineConfig
    from workers.sampling_params import SamplingParams

    prefix, other = [5 + i % 200 for i in range(160)], [7 + i % 190 for i in range(160)]
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    config = EngineConfig(device="cuda", cache=CacheConfig(num_blocks=14))  # room for one prompt at a time
    uncached = LLMEngine.from_config(config, KVStoreConfig(prefix_caching=False), progress=False)
    expected = uncached.generate([prefix + [9]], params)[0].token_ids
    engine = LLMEngine.from_config(config, KVStoreConfig(cpu=CpuTierConfig(capacity="16MiB")), progress=False)
    engine.generate([prefix + [1]], params)
    engine.generate([other], params)  # evicts the prefix into the CPU tier
    (done,) = engine.generate([prefix + [9]], params)
    cached = done.usage.cached_tokens
    assert done.token_ids == expected and cached.cpu > 0 and cached.total >= 144
    cpu = engine.kv_store_stats()["cpu"]
    assert cpu["bytes_out"] > 0 and cpu["transfer_seconds"] > 0


def test_a_redis_hit_lands_in_staging_memory_pinned_at_start(redis_server):
    """The reader's staging blocks were pinned when it started: its Redis hit does not call cudaHostAlloc for
    them (the caching host allocator's own count), and the prefix comes back with the tokens of a run without
    caches."""
    from kvstore.config import CpuTierConfig, KVStoreConfig, RedisConfig
    from workers.engine import LLMEngine
    from workers.engine_config import CacheConfig, EngineConfig
    from workers.sampling_params import SamplingParams

    prefix, question = [5 + i % 200 for i in range(160)], [9, 8, 7]  # 10 full blocks; the tail fills none
    params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    config = EngineConfig(device="cuda", cache=CacheConfig(num_blocks=32))
    expected = LLMEngine.from_config(config, KVStoreConfig(prefix_caching=False), progress=False).generate(
        [prefix + question], params)[0].token_ids

    def redis_engine(staging: str) -> LLMEngine:
        redis = RedisConfig(url=redis_server.url, staging_memory=staging, compute_while_reading="off")  # all read
        return LLMEngine.from_config(config, KVStoreConfig(cpu=CpuTierConfig(enabled=False), redis=redis),
                                     progress=False)

    writer = redis_engine("0")
    writer.generate([prefix + [1]], params)
    writer.close()  # every block written
    reader = redis_engine("1MiB")  # 32 of the tiny model's 32 KiB blocks
    reader.generate([[3, 4, 5]], params)  # the step loop's own pinned buffers, if any, exist from here on
    allocations = torch.cuda.host_memory_stats()["num_host_alloc"]
    (done,) = reader.generate([prefix + question], params)
    assert done.usage.cached_tokens.redis == 160 and done.token_ids == expected
    # each of the 10 staged blocks pinned anew would add 10; the step's small input buffers may add a size or two
    assert torch.cuda.host_memory_stats()["num_host_alloc"] - allocations < 10


def _large_cache(num_blocks: int) -> tuple[torch.Tensor, BlockMover]:
    """Blocks of 512 KiB, block b holding b: a gather of hundreds of them takes milliseconds to copy off."""
    from workers.parallel import ParallelContext, Span

    dims = (4, 2, 16, 8, 128)  # [L, 2, bs, Hkv, D]
    cache = torch.arange(num_blocks, dtype=torch.float32, device="cuda").view(-1, 1, 1, 1, 1, 1) \
        .expand(-1, *dims).contiguous()
    return cache, BlockMover(cache, 0, Span(0, 8), 8, ParallelContext(), cache.device)


def test_the_forward_after_a_gather_does_not_wait_for_it():
    """A gather of 512 MiB of blocks the step does not reuse: work queued on the compute stream next runs
    while the gather is still copying (it used to wait for the whole gather)."""
    cache, mover = _large_cache(1024)
    mover.apply(TierOps(gather_blocks=list(range(1024)))).wait()  # pins the host pieces; the next reuses them
    gathered = mover.apply(TierOps(gather_blocks=list(range(1024))))
    after = torch.cuda.Event()
    cache[0, 0, 0, 0, 0, :1].add_(0)  # a stand-in for the next forward
    after.record()
    after.synchronize()
    assert not gathered.copied.query(), "the compute stream waited for the gather"
    assert block_values(gathered.wait()) == list(range(1024))


def test_a_gathered_block_reused_then_overwritten_is_gathered_as_it_was():
    """Blocks the pool hands out again, in the same ops as their gather or in later ones while it still runs:
    the forward that overwrites them waits for the gather's read of them."""
    cache, mover = _large_cache(1024)
    same_step = mover.apply(TierOps(gather_blocks=list(range(512)), reused=[7, 300]))
    cache[[7, 300]] = -1.0  # the forward writes into the reused blocks
    later = mover.apply(TierOps(gather_blocks=list(range(512, 1024))))
    mover.apply(TierOps(reused=[600, 1000]))  # a later step reuses blocks of the gather still running
    cache[[600, 1000]] = -2.0
    assert block_values(same_step.wait()) == list(range(512))
    assert block_values(later.wait()) == list(range(512, 1024))
    torch.cuda.synchronize()
    assert block_values(cache)[7] == -1.0 and block_values(cache)[1000] == -2.0


def test_a_flush_waits_for_the_gathers_still_running():
    cache, mover = _large_cache(512)
    gathered = mover.apply(TierOps(gather_blocks=list(range(512))))
    mover.settle_gathers()
    assert gathered.copied.query()
