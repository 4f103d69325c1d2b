"""The scheduler on a tiny pool (block_size 4): exact block ids, chunk sizes and preemption order, and how it
meets a read from the end (scripted lower tiers)."""

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


class ReadFromTheEnd:
    """Lower tiers holding nothing to look up, whose requests read from the end with scripted answers: each
    ``resume`` returns the next (blocks met, tokens to compute) of ``answers``; a meet ends the read."""

    def __init__(self, reading: set[str], answers: list[tuple[int, int]]) -> None:
        self.reading, self.answers = reading, list(answers)
        self.resumed: list[tuple[str, int, int, bool]] = []
        self.cancelled: list[list[str]] = []

    def lookup(self, block_hashes, prefix, first_block=0, request_id=None):
        return []

    def cancel(self, block_hashes, tiers):
        self.cancelled.append(list(tiers))

    def prefetching(self, request_id):
        return False

    def forget(self, request_id):
        self.reading.discard(request_id)

    def reading_from_end(self, request_id):
        return request_id in self.reading

    def resume(self, request_id, block_hashes, first_block, max_tokens, wait_for_it):
        self.resumed.append((request_id, first_block, max_tokens, wait_for_it))
        met, tokens = self.answers.pop(0)
        if met:
            self.reading.discard(request_id)
        return ["redis"] * met, max_tokens if met else tokens

    def wait_for_reads(self, request_ids, timeout_s):
        raise AssertionError("no request waits for a read here")


def hashed_seq(name, prompt_len, first_token=0):
    """With ``first_token``, its prompt counts up from there (two sequences share no prefix)."""
    from kvstore.hashing import BlockHasher

    s = seq(name, prompt_len)
    s.token_ids = list(range(first_token, first_token + prompt_len))
    s.hasher = BlockHasher(BLOCK)
    return s


def test_a_prefix_computed_while_read_from_the_end_loads_the_rest_where_they_meet():
    """23 tokens: 5 reusable blocks. Step 1 computes 2 blocks (the read's answer); step 2 the read has met
    them: blocks 2-4 load into fresh GPU blocks and only the 3 tokens after them are computed."""
    tiers = ReadFromTheEnd({"a"}, [(0, 8), (3, 0)])
    pool = BlockPool(16)
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64), pool, BLOCK, tiers)
    a = hashed_seq("a", 23)
    scheduler.add(a)
    first = run_step(scheduler)
    assert [(c.start, c.num_tokens) for c in first.chunks] == [(0, 8)] and not first.loads
    assert a.block_ids == [0, 1] and a.cached_tokens["redis"] == 0
    second = run_step(scheduler)
    hashes = a.hasher.update(a.token_ids)
    assert [(load.block_hash, load.block_id, load.tier) for load in second.loads] == [
        (hashes[2], 2, "redis"), (hashes[3], 3, "redis"), (hashes[4], 4, "redis")]
    assert [(c.start, c.num_tokens, c.samples) for c in second.chunks] == [(20, 3, True)]
    assert a.block_ids == [0, 1, 2, 3, 4, 5] and a.cached_tokens["redis"] == 12
    assert tiers.resumed == [("a", 0, 23, True), ("a", 2, 15, True)]  # alone both times: it may wait


def test_the_computation_meets_the_read_only_at_a_block_boundary():
    tiers = ReadFromTheEnd({"a"}, [(0, 6), (0, 4)])
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64), BlockPool(16), BLOCK, tiers)
    a = hashed_seq("a", 23)
    scheduler.add(a)
    chunks = [[(c.start, c.num_tokens) for c in run_step(scheduler).chunks] for _ in range(3)]
    assert chunks == [[(0, 6)], [(6, 2)], [(8, 4)]]  # step 2 completes block 1 without asking the read
    assert [first for _, first, _, _ in tiers.resumed] == [0, 2]


def test_a_request_waiting_for_its_read_lets_the_others_run_and_does_not_wait_in_their_step():
    tiers = ReadFromTheEnd({"a"}, [(0, 0), (2, 0)])
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64), BlockPool(16), BLOCK, tiers)
    b, a = seq("b", 5), hashed_seq("a", 13)
    scheduler.add(b)
    run_step(scheduler)  # b is running
    scheduler.add(a)
    step = run_step(scheduler)
    assert [c.seq.request_id for c in step.chunks] == ["b"] and a in scheduler.running  # admitted, no chunk
    assert tiers.resumed == [("a", 0, 13, False)]  # b ran this step: a must not make it wait
    step = run_step(scheduler)
    assert [(c.seq.request_id, c.start) for c in step.chunks] == [("b", 6), ("a", 8)]
    assert [load.block_id for load in step.loads] == [2, 3]  # (block 1 went to b's sixth token)


def test_a_meet_the_pool_cannot_hold_is_cancelled_and_the_request_computes_on():
    tiers = ReadFromTheEnd({"a"}, [(0, 4), (4, 0)])
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=4), BlockPool(3), BLOCK, tiers)
    a = hashed_seq("a", 23)
    scheduler.add(a)
    run_step(scheduler)
    out = scheduler.schedule()  # 4 blocks met, 2 free: cancelled; the request computes on from block 1
    assert tiers.cancelled == [["redis"] * 4] and not out.loads
    assert [(c.start, c.num_tokens) for c in out.chunks] == [(4, 4)] and a.block_ids == [0, 1]
    assert not tiers.reading_from_end("a")


class HoldingBelow:
    """Lower tiers whose CPU tier holds the given hashes; records each lookup's hashes."""

    def __init__(self, held: set[bytes]) -> None:
        self.held, self.looked_up = held, []

    def lookup(self, block_hashes, prefix, first_block=0, request_id=None):
        self.looked_up.append(list(block_hashes))
        run = 0
        while run < len(block_hashes) and block_hashes[run] in self.held:
            run += 1
        return ["cpu"] * run

    def cancel(self, block_hashes, tiers):
        raise AssertionError("nothing is cancelled here")

    def prefetching(self, request_id):
        return False

    def forget(self, request_id):
        pass

    def reading_from_end(self, request_id):
        return False

    def wait_for_reads(self, request_ids, timeout_s):
        raise AssertionError("no request waits for a read here")


def test_sequences_admitted_together_share_the_blocks_one_of_them_loads():
    """a and b share 3 blocks the CPU tier holds; b's fourth block is its own. a loads the 3 into blocks 0-2;
    b, admitted in the same step, shares them (one load per hash) and looks up only what follows. c, admitted
    later, finds them cached: the step's ``pool_hits``."""
    a, b = hashed_seq("a", 13), hashed_seq("b", 18)
    b.token_ids[12:] = [90 + i for i in range(6)]  # b: a's first 12 tokens, then its own
    shared = a.hasher.update(a.token_ids)[:3]
    tiers = HoldingBelow(set(shared))
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64), BlockPool(16), BLOCK, tiers)
    scheduler.add(a)
    scheduler.add(b)
    out = run_step(scheduler)
    assert [(load.block_hash, load.block_id, load.tier) for load in out.loads] == [
        (shared[0], 0, "cpu"), (shared[1], 1, "cpu"), (shared[2], 2, "cpu")]
    assert a.block_ids == [0, 1, 2, 3] and b.block_ids == [0, 1, 2, 4, 5]
    assert [(c.seq.request_id, c.start, c.num_tokens) for c in out.chunks] == [("a", 12, 1), ("b", 12, 6)]
    assert tiers.looked_up == [shared, b.hasher.update(b.token_ids)[3:4]]
    assert (a.cached_tokens["cpu"], b.cached_tokens["gpu"], b.cached_tokens["cpu"]) == (12, 12, 0)
    scheduler.mark_loaded(out.loads)
    assert [scheduler.block_pool.ref_count(block) for block in range(6)] == [2, 2, 2, 1, 1, 1]
    assert out.pool_hits == []  # b's shared blocks were loaded this step, not found cached
    c = hashed_seq("c", 14)  # a's first 12 tokens again: the blocks are cached now
    scheduler.add(c)
    out = run_step(scheduler)
    assert out.pool_hits == [(shared[0], 0, c.prefix_ref), (shared[1], 1, c.prefix_ref), (shared[2], 2, c.prefix_ref)]
    assert c.block_ids == [0, 1, 2, 6] and out.loads == []


class ReadingInTheBackground(HoldingBelow):
    """Lower tiers holding nothing, whose requests in ``reading`` are still being read; records the waits."""

    def __init__(self, reading: set[str]) -> None:
        super().__init__(set())
        self.reading, self.waits = reading, []

    def prefetching(self, request_id):
        return request_id in self.reading

    def wait_for_reads(self, request_ids, timeout_s):
        self.waits.append(list(request_ids))


def test_requests_still_being_read_keep_their_places_while_the_others_are_admitted():
    tiers = ReadingInTheBackground({"a", "c"})
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64), BlockPool(16), BLOCK, tiers)
    a, b, c, d = (hashed_seq(name, 5, first_token=10 * i) for i, name in enumerate("abcd"))
    for s in (a, b, c, d):
        scheduler.add(s)
    out = run_step(scheduler)
    assert [chunk.seq.request_id for chunk in out.chunks] == ["b", "d"] and not tiers.waits
    assert [s.request_id for s in scheduler.waiting] == ["a", "c"]
    tiers.reading = {"c"}
    out = run_step(scheduler)  # b and d decode; a's read is done
    assert [chunk.seq.request_id for chunk in out.chunks] == ["b", "d", "a"]


def test_with_nothing_else_to_run_the_step_waits_for_any_read_and_runs_nothing():
    tiers = ReadingInTheBackground({"a", "b"})
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64), BlockPool(16), BLOCK, tiers)
    a, b = hashed_seq("a", 5), hashed_seq("b", 5)
    scheduler.add(a)
    scheduler.add(b)
    out = scheduler.schedule()
    assert not out.chunks and tiers.waits == [["a", "b"]]
    assert [s.request_id for s in scheduler.waiting] == ["a", "b"]
    tiers.reading = {"a"}
    out = run_step(scheduler)
    assert [chunk.seq.request_id for chunk in out.chunks] == ["b"] and len(tiers.waits) == 1
