"""The scheduler on a tiny pool (block_size 4): exact block ids, chunk sizes and preemption order."""

from kvstore.block_pool import BlockPool
from workers.engine_config import SchedulerConfig
from workers.sampling_params import SamplingParams
from workers.scheduler import Scheduler
from workers.sequence import FinishReason, Sequence, SequenceStatus

BLOCK = 4


def make(num_blocks=8, max_num_seqs=8, budget=64):
    pool = BlockPool(num_blocks)
    return Scheduler(SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget), pool, BLOCK), pool


def seq(name, prompt_len):
    return Sequence(name, list(range(prompt_len)), prompt_len, SamplingParams())


def run_step(scheduler, sampled_token=7):
    """Schedule, mark computed, and append a token to every sampling chunk (as the engine does)."""
    out = scheduler.schedule()
    scheduler.mark_computed(out)
    for chunk in out.chunks:
        if chunk.samples:
            chunk.seq.token_ids.append(sampled_token)
    return out


def test_prefill_then_decode_allocates_blocks_as_tokens_arrive():
    scheduler, pool = make()
    a = seq("a", 6)
    scheduler.add(a)
    out = run_step(scheduler)
    assert [(c.seq.request_id, c.start, c.num_tokens, c.samples) for c in out.chunks] == [("a", 0, 6, True)]
    assert a.block_ids == [0, 1]
    run_step(scheduler)  # token 7 of 8 fits block 1
    assert a.block_ids == [0, 1]
    run_step(scheduler)  # position 7
    run_step(scheduler)  # position 8 needs a third block
    assert a.block_ids == [0, 1, 2] and a.num_computed_tokens == 9


def test_chunked_prefill_splits_a_long_prompt_under_the_token_budget():
    scheduler, _ = make(num_blocks=16, budget=8)
    a, b = seq("a", 20), seq("b", 3)
    scheduler.add(a)
    scheduler.add(b)
    chunks = [[(c.seq.request_id, c.start, c.num_tokens) for c in run_step(scheduler).chunks] for _ in range(4)]
    assert chunks == [
        [("a", 0, 8)],
        [("a", 8, 8)],
        [("a", 16, 4), ("b", 0, 3)],  # a's last chunk samples; b joins with the rest of the budget
        [("a", 20, 1), ("b", 3, 1)],
    ]
    assert a.block_ids == [0, 1, 2, 3, 4, 6] and b.block_ids == [5]


def test_newest_running_sequence_is_preempted_and_recomputed_first():
    scheduler, pool = make(num_blocks=4)
    a, b = seq("a", 8), seq("b", 8)
    scheduler.add(a)
    scheduler.add(b)
    run_step(scheduler)
    assert a.block_ids == [0, 1] and b.block_ids == [2, 3] and pool.num_free == 0
    out = run_step(scheduler)  # a's token 9 needs a block: b (newest) is preempted
    assert [s.request_id for s in out.preempted] == ["b"]
    assert [(c.seq.request_id, c.start) for c in out.chunks] == [("a", 8)]
    assert a.block_ids == [0, 1, 3] and b.block_ids == [] and b.num_computed_tokens == 0  # b freed tail first
    assert b.status is SequenceStatus.WAITING and list(scheduler.waiting) == [b] and b.num_preemptions == 1
    scheduler.finish(a, FinishReason.LENGTH)
    assert pool.free_ids() == [2, 3, 1, 0]
    out = run_step(scheduler)  # b recomputes its prompt and its generated token
    assert [(c.seq.request_id, c.start, c.num_tokens) for c in out.chunks] == [("b", 0, 9)]
    assert b.block_ids == [2, 3, 1]


def test_a_sequence_that_cannot_grow_preempts_itself_when_it_is_the_newest():
    scheduler, pool = make(num_blocks=2)
    a = seq("a", 8)
    scheduler.add(a)
    run_step(scheduler)
    out = run_step(scheduler)
    assert out.chunks == [] and out.preempted == [a] and pool.num_free == 2


def test_max_num_seqs_caps_running_sequences():
    scheduler, _ = make(max_num_seqs=2)
    for i in range(3):
        scheduler.add(seq(f"s{i}", 2))
    out = run_step(scheduler)
    assert [c.seq.request_id for c in out.chunks] == ["s0", "s1"]
    assert [s.request_id for s in scheduler.waiting] == ["s2"]


def test_finish_returns_every_block_of_running_and_waiting_sequences():
    scheduler, pool = make(num_blocks=3)
    a, b = seq("a", 8), seq("b", 8)
    scheduler.add(a)
    scheduler.add(b)
    run_step(scheduler)  # a takes 2 blocks; b does not fit and waits
    assert b.status is SequenceStatus.WAITING
    scheduler.finish(b, FinishReason.ABORT)
    scheduler.finish(a, FinishReason.ABORT)
    assert pool.num_free == 3 and not scheduler.has_unfinished()
    assert a.finish_reason is FinishReason.ABORT
