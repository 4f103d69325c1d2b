"""Priority order in the scheduler (a lower value first; arrival order within one priority), on a tiny pool
(block_size 4): exact queue orders, block ids and which sequence is preempted for which."""

from kvstore.block_pool import BlockPool
from tests.unit.test_scheduler import BLOCK, HoldingBelow, hashed_seq, make, run_step, seq
from workers.engine_config import SchedulerConfig
from workers.scheduler import Scheduler
from workers.sequence import FinishReason, SequenceStatus


def with_priority(sequence, priority):
    sequence.priority = priority
    return sequence


def names(sequences):
    return [s.request_id for s in sequences]


def test_waiting_sequences_are_ordered_by_priority_then_arrival():
    scheduler, _ = make(max_num_seqs=1)
    for name, priority in [("a", 0), ("b", 0), ("urgent", -1), ("lazy", 1), ("c", 0), ("urgent2", -1)]:
        scheduler.add(with_priority(seq(name, 2), priority))
    assert names(scheduler.waiting) == ["urgent", "urgent2", "a", "b", "c", "lazy"]
    served = []
    while scheduler.has_unfinished():
        out = run_step(scheduler)
        served += [c.seq.request_id for c in out.chunks]
        scheduler.finish(out.chunks[0].seq, FinishReason.LENGTH)
    assert served == ["urgent", "urgent2", "a", "b", "c", "lazy"]


def test_a_sequence_preempted_for_blocks_goes_back_to_the_head_of_its_priority():
    scheduler, pool = make(num_blocks=4)
    a, b = seq("a", 8), seq("b", 8)
    scheduler.add(a)
    scheduler.add(b)
    run_step(scheduler)
    scheduler.add(with_priority(seq("lazy", 4), 1))
    scheduler.add(seq("c", 4))
    out = run_step(scheduler)  # a's ninth token needs a block: b, the last running, is preempted
    assert names(out.preempted) == ["b"] and names(scheduler.waiting) == ["b", "c", "lazy"] and out.yielded == 0


def test_a_more_urgent_request_preempts_the_least_urgent_running_one_and_runs_in_the_same_step():
    scheduler, pool = make(num_blocks=4)
    low, lower = with_priority(seq("low", 8), 1), with_priority(seq("lower", 8), 2)
    scheduler.add(low)
    scheduler.add(lower)
    run_step(scheduler)
    assert low.block_ids == [0, 1] and lower.block_ids == [2, 3] and pool.num_free == 0
    urgent = seq("urgent", 4)
    scheduler.add(urgent)
    out = run_step(scheduler)  # low's ninth token and urgent's 4 tokens need a block each: lower's 2 free them
    assert names(out.preempted) == ["lower"] and lower.status is SequenceStatus.WAITING and lower.block_ids == []
    assert out.yielded == 1
    assert [(c.seq.request_id, c.start, c.num_tokens) for c in out.chunks] == [("low", 8, 1), ("urgent", 0, 4)]
    assert low.block_ids == [0, 1, 3] and urgent.block_ids == [2] and pool.num_free == 0
    assert names(scheduler.running) == ["urgent", "low"] and names(scheduler.waiting) == ["lower"]


def test_a_more_urgent_request_takes_the_running_slot_of_a_less_urgent_one():
    scheduler, _ = make(max_num_seqs=2)
    scheduler.add(with_priority(seq("a", 2), 3))
    scheduler.add(with_priority(seq("b", 2), 5))
    run_step(scheduler)
    scheduler.add(with_priority(seq("c", 2), 3))  # as urgent as a, more than b
    out = run_step(scheduler)
    assert names(out.preempted) == ["b"] and names(scheduler.running) == ["a", "c"]
    scheduler.add(with_priority(seq("d", 2), 3))  # as urgent as both running: it waits its turn
    out = run_step(scheduler)
    assert out.preempted == [] and names(scheduler.waiting) == ["d", "b"]


def test_running_sequences_of_the_same_or_a_more_urgent_priority_are_never_preempted_for_one():
    scheduler, pool = make(num_blocks=4)
    a, b = seq("a", 8), with_priority(seq("b", 8), -1)
    scheduler.add(a)
    scheduler.add(b)
    run_step(scheduler)
    scheduler.add(seq("c", 4))
    out = run_step(scheduler)  # b's ninth token: a (now the last running) is preempted, not for c
    assert names(out.preempted) == ["a"] and names(scheduler.running) == ["b"]
    assert names(scheduler.waiting) == ["a", "c"]


def test_only_as_many_are_preempted_as_the_urgent_request_and_the_rest_need_this_step():
    scheduler, pool = make(num_blocks=6)
    for name in "abc":
        scheduler.add(with_priority(seq(name, 4), 1))
    run_step(scheduler)  # each holds 1 block; its fifth token needs a second
    urgent = seq("urgent", 9)  # 3 blocks: as many are free, but a, b and c take one each this step
    scheduler.add(urgent)
    out = run_step(scheduler)
    assert names(out.preempted) == ["c", "b"] and names(scheduler.running) == ["urgent", "a"]
    assert urgent.block_ids == [4, 5, 2] and pool.num_free == 1 and names(scheduler.waiting) == ["b", "c"]


class HoldingAndCancelling(HoldingBelow):
    def __init__(self, held):
        super().__init__(held)
        self.cancelled = []

    def cancel(self, block_hashes, tiers):
        self.cancelled.append(list(tiers))


def test_a_request_refused_though_its_first_chunk_seemed_to_fit_makes_room_at_the_next_step():
    """The estimate counts the first chunk's blocks, not those its CPU-tier hits load before it: 'urgent' (3
    blocks in the CPU tier, then 2 for an 8-token chunk) is refused once, then 'low' is preempted for it."""
    urgent = hashed_seq("urgent", 25)
    tiers = HoldingAndCancelling(set(urgent.hasher.update(urgent.token_ids)[:3]))
    pool = BlockPool(6)
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=8), pool, BLOCK, tiers)
    low = with_priority(seq("low", 8), 1)
    scheduler.add(low)
    run_step(scheduler)
    scheduler.add(urgent)
    out = run_step(scheduler)  # low's ninth token takes block 2; urgent's 3 loads leave no room for its chunk
    assert out.preempted == [] and tiers.cancelled == [["cpu"] * 3] and names(scheduler.waiting) == ["urgent"]
    out = run_step(scheduler)
    assert names(out.preempted) == ["low"] and names(scheduler.running) == ["urgent"]
    assert [(load.block_id, load.tier) for load in out.loads] == [(5, "cpu"), (4, "cpu"), (3, "cpu")]
    assert [(c.start, c.num_tokens) for c in out.chunks] == [(12, 8)] and urgent.block_ids == [5, 4, 3, 2, 1]


def test_a_less_urgent_prefill_leaves_the_token_budget_an_urgent_request_needs():
    scheduler, _ = make(num_blocks=32, budget=8)
    low, decoding = with_priority(seq("low", 40), 1), with_priority(seq("decoding", 3), 1)
    scheduler.add(decoding)
    run_step(scheduler)  # decoding's prompt is in; it decodes from now on
    scheduler.add(low)
    run_step(scheduler)  # low prefills 7 of its 40 tokens (decoding took one)
    urgent = seq("urgent", 5)
    scheduler.add(urgent)
    out = run_step(scheduler)
    assert [(c.seq.request_id, c.start, c.num_tokens) for c in out.chunks] == [
        ("decoding", 4, 1), ("low", 7, 2), ("urgent", 0, 5)]
    assert out.preempted == []  # room enough: nothing preempted, only the budget shared
    out = run_step(scheduler)  # the urgent request decodes; low takes the rest
    assert [(c.seq.request_id, c.start, c.num_tokens) for c in out.chunks] == [
        ("urgent", 5, 1), ("decoding", 5, 1), ("low", 9, 6)]
