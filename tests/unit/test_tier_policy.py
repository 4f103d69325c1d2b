import pytest

from kvstore.tier_policy import LRUTierPolicy, TierPolicyError

A, B, C, D, E = (bytes([i]) * 32 for i in range(1, 6))


def stored(policy, *hashes):
    planned = policy.prepare_store(list(hashes))
    policy.complete_store([h for h, _ in planned], ok=True)
    return planned


def test_slots_are_given_in_order_and_entries_hidden_until_stored():
    policy = LRUTierPolicy(3)
    planned = policy.prepare_store([A, B])
    assert planned == [(A, 0), (B, 1)]
    assert policy.lookup([A]) == 0  # in flight: not visible
    policy.complete_store([A, B], ok=True)
    assert policy.lookup([A, B, C]) == 2


def test_least_recently_used_is_evicted_and_a_load_refreshes():
    policy = LRUTierPolicy(3)
    stored(policy, A, B, C)
    policy.prepare_load([A])
    policy.complete_load([A])
    assert policy.lru_order() == [B, C, A]
    assert stored(policy, D) == [(D, 1)]  # B's slot
    assert policy.take_evicted() == [B]
    assert policy.lru_order() == [C, A, D]


def test_pinned_entries_are_never_evicted():
    policy = LRUTierPolicy(2)
    stored(policy, A, B)
    policy.prepare_load([A, B])
    assert policy.prepare_store([C]) == []  # everything pinned: nothing stored
    policy.complete_load([A])
    assert stored(policy, C) == [(C, 0)]
    assert policy.take_evicted() == [A]


def test_a_failed_store_returns_its_slot():
    policy = LRUTierPolicy(1)
    planned = policy.prepare_store([A])
    policy.complete_store([A], ok=False)
    assert A not in policy and stored(policy, B) == [(B, planned[0][1])]


def test_duplicates_and_present_hashes_are_not_stored_twice():
    policy = LRUTierPolicy(4)
    stored(policy, A)
    assert policy.prepare_store([A, B, B]) == [(B, 1)]


def test_protocol_misuse_is_an_error():
    policy = LRUTierPolicy(2)
    with pytest.raises(TierPolicyError):
        policy.prepare_load([A])
    with pytest.raises(TierPolicyError):
        policy.complete_store([A], ok=True)
    stored(policy, A)
    with pytest.raises(TierPolicyError):
        policy.complete_load([A])


def test_clear_keeps_pinned_entries():
    policy = LRUTierPolicy(3)
    stored(policy, A, B, C)
    policy.prepare_load([B])
    assert policy.clear() == 2 and policy.lru_order() == [B]


def test_dropping_some_hashes_frees_their_slots_but_keeps_pinned_and_incoming_ones():
    policy = LRUTierPolicy(4)
    policy.complete_store([h for h, _ in policy.prepare_store([b"a", b"b", b"c"])], ok=True)
    policy.prepare_load([b"b"])  # pinned
    incoming = policy.prepare_store([b"d"])
    assert policy.drop([b"a", b"b", b"d", b"x"]) == 1  # only a: b is pinned, d not stored yet
    assert policy.lru_order() == [b"c", b"b"] and policy.holds(b"d") and not policy.holds(b"a")
    assert incoming == [(b"d", 3)] and policy.prepare_store([b"e"]) == [(b"e", 0)]  # a's slot is free again
