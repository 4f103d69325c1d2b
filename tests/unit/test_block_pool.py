import subprocess
import sys

import pytest

from kvstore.block_pool import BlockPool, BlockPoolError


def test_allocates_from_the_head_in_id_order():
    pool = BlockPool(6)
    assert pool.allocate(2) == [0, 1]
    assert pool.allocate(3) == [2, 3, 4]
    assert pool.num_free == 1
    assert pool.free_ids() == [5]


def test_freed_blocks_go_to_the_tail_and_are_reused_oldest_freed_first():
    pool = BlockPool(5)
    pool.allocate(4)  # 0 1 2 3
    pool.free([2, 0])
    assert pool.free_ids() == [4, 2, 0]
    assert pool.allocate(3) == [4, 2, 0]
    pool.free([3])
    pool.free([1])
    assert pool.allocate(2) == [3, 1]


def test_shared_block_returns_only_when_every_reference_is_dropped():
    pool = BlockPool(3)
    assert pool.allocate(1) == [0]
    pool.share([0])
    assert pool.ref_count(0) == 2
    pool.free([0])
    assert pool.ref_count(0) == 1 and pool.free_ids() == [1, 2]
    pool.free([0])
    assert pool.ref_count(0) == 0 and pool.free_ids() == [1, 2, 0]


def test_exhaustion_raises_and_leaves_the_pool_unchanged():
    pool = BlockPool(2)
    pool.allocate(1)
    assert not pool.can_allocate(2)
    with pytest.raises(BlockPoolError, match="asked for 2 blocks, 1 free"):
        pool.allocate(2)
    assert pool.free_ids() == [1]


@pytest.mark.parametrize(
    "action, message",
    [
        (lambda pool: pool.free([1]), "already free"),
        (lambda pool: pool.share([2]), "holds nothing to share"),
        (lambda pool: pool.free([7]), "outside the pool"),
    ],
)
def test_misuse_is_an_error(action, message):
    pool = BlockPool(3)
    pool.allocate(1)
    with pytest.raises(BlockPoolError, match=message):
        action(pool)


def test_zero_blocks_is_rejected():
    with pytest.raises(ValueError):
        BlockPool(0)


def test_pure_modules_import_without_torch():
    pure = ["kvstore.block_pool", "kvstore.copy_runs", "kvstore.tier_policy", "kvstore.salt_index", "kvstore.known_blocks",
            "kvstore.write_behind", "kvstore.codec", "kvstore.resp",
            "workers.scheduler", "workers.sequence", "workers.table_rows", "workers.validation", "workers.model_config"]
    code = f"import sys\nfor m in {pure!r}: __import__(m)\nprint(sorted(k for k in sys.modules if k.split('.')[0] == 'torch'))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_uncaching_some_hashes_leaves_free_blocks_plain_and_used_ones_with_their_holder():
    pool = BlockPool(4)
    a, b, c = pool.allocate(3)
    for block_id, block_hash in ((a, b"ha"), (b, b"hb"), (c, b"hc")):
        pool.cache(block_id, block_hash)
    pool.free([a, b])  # c stays in use
    assert pool.uncache([b"ha", b"hc", b"absent"]) == 2
    assert pool.cached_block(b"ha") is None and pool.cached_block(b"hc") is None and pool.cached_block(b"hb") == b
    assert pool.ref_count(c) == 1 and pool.free_ids() == [3, a, b]
    assert pool.allocate(2) == [3, a] and pool.take_evicted() == []  # a held nothing any more: no eviction
