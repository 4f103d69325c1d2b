"""Requests sharing a prefix nothing caches yet: a waiting one trails the running one computing it and finds
its blocks cached (``workers.blocks_in_flight``). Tiny pool, block_size 4: exact chunks and block ids."""

from kvstore.block_pool import BlockPool
from kvstore.hashing import BlockHasher
from workers.engine_config import SchedulerConfig
from workers.sampling_params import SamplingParams
from workers.scheduler import Scheduler
from workers.sequence import FinishReason, Sequence

BLOCK = 4
PREFIX = list(range(100, 112))  # three blocks


def make(num_blocks=32, budget=64, max_num_seqs=8) -> Scheduler:
    return Scheduler(SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget),
                     BlockPool(num_blocks), BLOCK)


def hashed(name: str, tokens: list[int], priority: int = 0, salt: str | None = None) -> Sequence:
    seq = Sequence(name, list(tokens), len(tokens), SamplingParams(), priority)
    seq.hasher = BlockHasher(BLOCK, salt=salt)
    return seq


def step(scheduler: Scheduler) -> list[tuple[str, int, int]]:
    """One step as the engine runs it: schedule, mark computed, cache full blocks, sample token 7."""
    out = scheduler.schedule()
    scheduler.mark_computed(out)
    scheduler.cache_full_blocks(out)
    for chunk in out.chunks:
        if chunk.samples:
            chunk.seq.token_ids.append(7)
    return [(chunk.seq.request_id, chunk.start, chunk.num_tokens) for chunk in out.chunks]


def test_requests_arriving_together_compute_their_shared_prefix_once():
    """b and c share a's 3-block prefix: in step 1 only a (and d, which shares nothing) runs; in step 2 b and c
    take a's three cached blocks and compute their 2-token tails."""
    scheduler = make()
    a, b, c = (hashed(name, PREFIX + [i, i + 1]) for i, name in enumerate("abc"))
    d = hashed("d", [1, 2, 3, 4, 5, 6])
    for seq in (a, b, c, d):
        scheduler.add(seq)
    assert step(scheduler) == [("a", 0, 14), ("d", 0, 6)]
    assert [seq.request_id for seq in scheduler.waiting] == ["b", "c"]
    assert step(scheduler) == [("a", 14, 1), ("d", 6, 1), ("b", 12, 2), ("c", 12, 2)]
    assert b.block_ids[:3] == c.block_ids[:3] == a.block_ids[:3] == [0, 1, 2]
    assert b.cached_tokens["gpu"] == c.cached_tokens["gpu"] == 12


def test_a_request_trails_a_chunked_prefill_and_one_that_diverges_is_admitted_where_it_does():
    """a's 28-token prompt runs in 8-token chunks. b (a's prompt and two tokens more) would be admitted beside
    a's last chunk, which computes the block b needs next: it trails, and c, which shares only a's first block,
    is admitted in its place from where it diverges; at the next step b finds a's seven blocks cached."""
    scheduler = make(budget=8)
    prompt = list(range(200, 228))
    a, b = hashed("a", prompt), hashed("b", prompt + [1, 2])
    c = hashed("c", prompt[:4] + list(range(300, 306)))
    for seq in (a, b, c):
        scheduler.add(seq)
    assert [step(scheduler) for _ in range(3)] == [[("a", 0, 8)], [("a", 8, 8)], [("a", 16, 8)]]
    assert step(scheduler) == [("a", 24, 4), ("c", 4, 4)]
    assert step(scheduler) == [("a", 28, 1), ("c", 8, 2), ("b", 28, 2)]
    assert b.block_ids[:7] == a.block_ids[:7] and b.cached_tokens["gpu"] == 28
    assert c.block_ids[0] == a.block_ids[0] and c.cached_tokens["gpu"] == 4


def test_a_more_urgent_request_or_another_tenant_does_not_wait_for_the_computation():
    """a (priority 1) is prefilling the prefix in 8-token chunks. An urgent request sharing it computes beside
    a (and takes its budget share), as does another tenant's with the same tokens; one as urgent as a trails."""
    scheduler = make(budget=8)
    a = hashed("a", PREFIX + [1, 2], priority=1)
    scheduler.add(a)
    assert step(scheduler) == [("a", 0, 8)]
    for seq in (hashed("urgent", PREFIX + [3, 4], priority=0), hashed("same", PREFIX + [5, 6], priority=1),
                hashed("tenant", PREFIX + [5, 6], priority=1, salt="other")):
        scheduler.add(seq)
    assert step(scheduler) == [("a", 8, 1), ("urgent", 8, 6), ("tenant", 0, 1)]
    assert [seq.request_id for seq in scheduler.waiting] == ["same"]


def test_a_trailing_request_is_admitted_once_the_one_it_trails_is_gone():
    scheduler = make(budget=8)
    a, b = hashed("a", PREFIX + [1, 2]), hashed("b", PREFIX + [3, 4])
    scheduler.add(a)
    assert step(scheduler) == [("a", 0, 8)]
    scheduler.add(b)
    assert step(scheduler) == [("a", 8, 6)]  # (b trails: a's last chunk computes b's third block)
    scheduler.finish(a, FinishReason.ABORT)
    c, d = hashed("c", list(range(400, 414))), hashed("d", list(range(400, 414)) + [5])
    scheduler.add(c)
    scheduler.add(d)
    assert step(scheduler) == [("b", 12, 2), ("c", 0, 6)]  # a's blocks cached: b computes its tail
    scheduler.finish(c, FinishReason.ABORT)  # c aborted while d trailed it: d computes what c had not
    assert step(scheduler) == [("b", 14, 1), ("d", 4, 7)]
