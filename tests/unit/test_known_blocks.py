import pytest

from kvstore.known_blocks import KnownBlocks
from kvstore.redis_keys import SaltSelection

A, B, C, D = (bytes([i]) * 32 for i in range(1, 5))


def test_a_block_is_due_once_per_refresh_interval_whatever_the_hits_meanwhile():
    known = KnownBlocks(capacity=8, refresh_s=10.0)
    known.confirm([A, B], None, now=100.0)
    assert known.due([A, B], now=109.9) == []
    assert known.due([B, A, B], now=110.0) == [B, A]  # in hit order, each once
    assert known.due([A, B], now=119.9) == []  # the check started at 110 counts as a confirmation
    assert known.due([A], now=120.0) == [A]


def test_unknown_blocks_are_never_due_and_a_forgotten_block_is_unknown():
    known = KnownBlocks(capacity=8, refresh_s=1.0)
    known.confirm([A, B], None, now=0.0)
    known.forget([A, C])
    assert A not in known and B in known
    assert known.due([A, B, C], now=5.0) == [B]


def test_the_least_recently_confirmed_block_goes_first_past_capacity():
    known = KnownBlocks(capacity=3, refresh_s=1.0)
    known.confirm([A, B, C], None, now=0.0)
    known.confirm([A], None, now=1.0)  # A is now the most recent
    known.confirm([D], None, now=2.0)
    assert [block for block in (A, B, C, D) if block in known] == [A, C, D]
    assert known.due([C], now=3.0) == [C]  # a refresh confirms it too
    known.confirm([B], None, now=4.0)
    assert [block for block in (A, B, C, D) if block in known] == [B, C, D]


def test_refresh_s_zero_never_checks():
    known = KnownBlocks(capacity=2, refresh_s=0)
    known.confirm([A], None, now=0.0)
    assert known.due([A], now=1e9) == [] and A in known


def test_bad_arguments_are_errors():
    with pytest.raises(ValueError, match="capacity"):
        KnownBlocks(capacity=0, refresh_s=1.0)
    with pytest.raises(ValueError, match="refresh_s"):
        KnownBlocks(capacity=1, refresh_s=-1.0)



def test_a_salts_flush_forgets_that_salts_blocks_only_and_a_refresh_keeps_each_blocks_salt():
    known = KnownBlocks(capacity=8, refresh_s=1.0)
    known.confirm([A, B], "a", now=0.0)
    known.confirm([C], "b", now=0.0)
    known.confirm([D], None, now=0.0)
    assert known.due([A, C], now=2.0) == [A, C]  # re-confirmed, with their salts
    assert known.forget_salts(SaltSelection.one_salt("a")) == 2
    assert [block for block in (A, B, C, D) if block in known] == [C, D]
    assert known.forget_salts(SaltSelection.one_salt(None)) == 1  # no salt's blocks are a flush target of their own
    assert known.forget_salts(SaltSelection()) == 1  # every salt's
    assert [block for block in (A, B, C, D) if block in known] == []
    assert known.forget_salts(SaltSelection.one_salt("a")) == 0
