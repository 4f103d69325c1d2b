import pytest

from kvstore.circuit_breaker import CircuitBreaker
from kvstore.cost_model import FetchCostModel, PrefillWork
from kvstore.redis_keys import PrefixRef, SaltSelection, block_key, flush_pattern


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_breaker_opens_after_consecutive_failures_and_half_opens_after_the_reset_time():
    clock = Clock()
    breaker = CircuitBreaker(failure_threshold=2, reset_after_s=5.0, clock=clock)
    breaker.record_failure()
    assert breaker.state == "closed" and breaker.allow()
    breaker.record_failure()
    assert breaker.state == "open" and not breaker.allow()
    clock.now = 5.0
    assert breaker.allow()  # the one trial
    assert not breaker.allow()  # others wait for it
    breaker.record_failure()
    assert breaker.state == "open" and not breaker.allow()
    clock.now = 10.0
    assert breaker.allow()
    breaker.record_success()
    assert breaker.state == "closed" and breaker.allow() and breaker.times_opened == 2


def test_a_success_resets_the_failure_count():
    breaker = CircuitBreaker(failure_threshold=2, reset_after_s=1.0, clock=Clock())
    breaker.record_failure()
    breaker.record_success()
    breaker.record_failure()
    assert breaker.state == "closed"


def test_cost_model_fetches_until_it_has_measurements_then_compares():
    model = FetchCostModel()
    assert model.should_fetch("redis", 10, block_bytes=1_000_000, block_tokens=16)
    model.observe_prefill(tokens=16_000, seconds=1.0)  # 16k tokens/s: a block recomputes in 1 ms
    model.observe_fetch("redis", num_bytes=500_000_000, seconds=1.0)  # 0.5 GB/s: a 1 MB block loads in 2 ms
    assert not model.should_fetch("redis", 10, block_bytes=1_000_000, block_tokens=16)
    assert model.should_fetch("redis", 10, block_bytes=100_000, block_tokens=16)  # 0.2 ms per block
    assert FetchCostModel(enabled=False).should_fetch("redis", 10, 10**9, 1)


def test_prefill_work_counts_each_token_once_and_each_query_key_pair():
    work = PrefillWork(per_token=10.0, per_attended=1.0)
    assert work.flops(0, 4) == 40 + (1 + 2 + 3 + 4)  # token p attends to p + 1 keys
    assert work.flops(4, 2) == 20 + (5 + 6)  # after 4 cached tokens
    assert work.flops(0, 6) == work.flops(0, 4) + work.flops(4, 2)


def test_blocks_deep_in_a_prompt_cost_more_to_recompute_so_a_fetch_of_them_can_win():
    work = PrefillWork(per_token=1000.0, per_attended=1.0)
    model = FetchCostModel(work=work)
    model.observe_prefill(tokens=100, seconds=1.0, flops=1e6)  # 1 MFLOP/s, measured on any mix of positions
    model.observe_fetch("redis", num_bytes=1_000_000, seconds=1.0)  # 1 MB/s
    # 4 blocks of 16 tokens, 100 kB each: fetching takes 0.4 s wherever they are
    assert model.recompute_seconds(0, 64) == (64_000 + 64 * 65 // 2) / 1e6  # 0.066 s: recompute
    assert not model.should_fetch("redis", 4, block_bytes=100_000, block_tokens=16, start_token=0)
    assert model.recompute_seconds(10_000, 64) == (64_000 + 64 * 10_000 + 64 * 65 // 2) / 1e6  # 0.706 s: fetch
    assert model.should_fetch("redis", 4, block_bytes=100_000, block_tokens=16, start_token=10_000)


def test_without_the_models_work_recomputing_costs_the_same_per_token_anywhere():
    model = FetchCostModel()
    model.observe_prefill(tokens=1000, seconds=1.0, flops=5e9)
    assert model.recompute_seconds(0, 64) == model.recompute_seconds(30_000, 64) == 0.064
    assert FetchCostModel(work=PrefillWork(1.0, 1.0)).recompute_seconds(0, 64) is None  # nothing measured yet


def test_keys_put_a_prefix_in_one_cluster_slot_and_scope_flushes():
    fingerprint = "ab" * 32
    prefix = PrefixRef(salt="acme", root_hash=b"\x11" * 32)
    first = block_key(fingerprint, prefix, b"\x11" * 32, (0, 8))
    later = block_key(fingerprint, prefix, b"\x22" * 32, (0, 8))
    tag = first[first.index("{") : first.index("}") + 1]
    assert tag == later[later.index("{") : later.index("}") + 1]
    assert first.endswith(":h0-8") and ("22" * 32) in later
    import fnmatch

    assert fnmatch.fnmatchcase(first, flush_pattern(fingerprint))
    assert fnmatch.fnmatchcase(first, flush_pattern(fingerprint, SaltSelection.one_salt("acme")))
    assert not fnmatch.fnmatchcase(first, flush_pattern(fingerprint, SaltSelection.one_salt("other")))
    assert not fnmatch.fnmatchcase(first, flush_pattern("cd" * 32))
    unsalted = block_key(fingerprint, PrefixRef(None, b"\x11" * 32), b"\x11" * 32, (0, 8))
    assert not fnmatch.fnmatchcase(unsalted, flush_pattern(fingerprint, SaltSelection.one_salt("acme")))
    assert fnmatch.fnmatchcase(unsalted, flush_pattern(fingerprint, SaltSelection.one_salt(None)))


def test_a_scope_flush_finds_every_salt_in_the_scope_and_no_other():
    import fnmatch

    fingerprint, root = "ab" * 32, b"\x11" * 32

    def key(salt):
        return block_key(fingerprint, PrefixRef(salt, root), root, (0, 8))

    acme = flush_pattern(fingerprint, SaltSelection.in_scope("acme"))
    assert [fnmatch.fnmatchcase(key(salt), acme) for salt in ("acme/1", "acme/x/y", "acme/", "acme", "acmex/1",
                                                              "other/1", None)] == \
        [True, True, True, False, False, False, False]
    one = flush_pattern(fingerprint, SaltSelection.one_salt("acme/1"))
    assert [fnmatch.fnmatchcase(key(salt), one) for salt in ("acme/1", "acme/2")] == [True, False]
    selection = SaltSelection.in_scope("acme")
    assert [selection.covers(s) for s in ("acme/1", "acme", None, "b/acme")] == [True, False, False, False]
    for bad in ("", "a/b"):
        with pytest.raises(ValueError, match="salt scope"):
            SaltSelection.in_scope(bad)


def test_a_tier_has_a_rate_once_a_fetch_moved_bytes():
    model = FetchCostModel()
    assert not model.has_rate("redis")
    model.observe_fetch("redis", num_bytes=0, seconds=1.0)  # a miss measures nothing
    assert not model.has_rate("redis")
    model.observe_fetch("redis", num_bytes=10**6, seconds=1.0)
    assert model.has_rate("redis") and not model.has_rate("cpu")


def test_a_tally_taken_elsewhere_adds_to_the_tiers_counts():
    from kvstore.stats import TierStats

    tier = TierStats(hit_blocks=2, errors=1, transfer_seconds=0.5)
    tier.add(TierStats(errors=2, skipped_fetches=1, transfer_seconds=0.25))
    assert (tier.hit_blocks, tier.errors, tier.skipped_fetches, tier.transfer_seconds) == (2, 3, 1, 0.75)


def test_compute_and_fetch_meet_where_both_take_as_long():
    model = FetchCostModel()
    assert model.tokens_to_compute_first("redis", 0, 100, block_bytes=1_000_000, block_tokens=16) == 0  # no rates
    model.observe_prefill(tokens=16_000, seconds=1.0)  # a block recomputes in 1 ms
    model.observe_fetch("redis", num_bytes=1_000_000_000, seconds=1.0)  # a 1 MB block loads in 1 ms
    # 50 blocks computed (50 ms) while the other 50 load (50 ms)
    assert model.tokens_to_compute_first("redis", 0, 100, block_bytes=1_000_000, block_tokens=16) == 50 * 16
    # a 3 MB block loads in 3 ms: compute 75 blocks (75 ms) while 25 load (75 ms)
    assert model.tokens_to_compute_first("redis", 0, 100, block_bytes=3_000_000, block_tokens=16) == 75 * 16
    # loading is 10x faster: 10 blocks (10 ms, the other 90 load in 9 ms) or 9 (the other 91 in 9.1 ms): 9
    assert model.tokens_to_compute_first("redis", 0, 100, block_bytes=100_000, block_tokens=16) == 9 * 16
    # loading is 1000x faster: computing even one block (1 ms) ends later than loading all 100 (0.1 ms)
    assert model.tokens_to_compute_first("redis", 0, 100, block_bytes=1_000, block_tokens=16) == 0
    assert model.tokens_to_compute_first("redis", 0, 0, block_bytes=100_000, block_tokens=16) == 0
    assert FetchCostModel(enabled=False).tokens_to_compute_first("redis", 0, 100, 1, 16) == 0
