"""One rank's tier copies (``BlockMover``) on real tensors: exact blocks land where the ops say, runs of
consecutive blocks and single ones alike, and a block spilled and loaded into in the same ops keeps the order
(spill first). On CUDA the same checks run on the side stream (tests/gpu)."""

from __future__ import annotations

import torch

from workers.block_mover import BlockMover, TierOps
from workers.parallel import ParallelContext, Span

DIMS = (2, 2, 4, 2, 8)  # [L, 2, block_size, Hkv, D]


def numbered_cache(num_blocks: int, device: str = "cpu") -> torch.Tensor:
    """Block b holds the value b everywhere: [num_blocks, L, 2, bs, Hkv, D]."""
    return torch.arange(num_blocks, dtype=torch.float32).view(-1, 1, 1, 1, 1, 1).expand(-1, *DIMS).contiguous() \
        .to(device)


def mover_for(cache: torch.Tensor, num_cpu_slots: int) -> BlockMover:
    return BlockMover(cache, num_cpu_slots, Span(0, 2), 2, ParallelContext(), cache.device)


def block_values(blocks: torch.Tensor | list[torch.Tensor]) -> list[float]:
    """Each block's value (every element of a block is the same); ``blocks`` [n, ...] or a list of blocks."""
    flat = (torch.stack(blocks) if isinstance(blocks, list) else blocks).flatten(1).cpu()
    assert torch.equal(flat.min(dim=1).values, flat.max(dim=1).values)
    return flat[:, 0].tolist()


def run_ops_and_read(device: str = "cpu") -> tuple[list[float], list[float]]:
    cache = numbered_cache(8, device)
    mover = mover_for(cache, num_cpu_slots=6)
    mover.host.fill_(-1)
    mover.apply(TierOps(spills=[(2, 0), (3, 1), (4, 2), (7, 5)]))  # one run of 3, one single block
    staged = [torch.full(DIMS, 100.0 + i, pin_memory=device == "cuda") for i in range(2)]
    # block 6 is spilled to slot 3, then loaded from slot 0; blocks 0 and 1 come from Redis's staged blocks
    mover.apply(TierOps(spills=[(6, 3)], cpu_loads=[(0, 6), (5, 5), (1, 4)], full_loads=[0, 1]), staged)
    return block_values(cache), block_values(mover.host)


def test_spills_and_loads_copy_exact_blocks_in_order():
    cache, host = run_ops_and_read()
    assert host == [2, 3, 4, 6, -1, 7]
    assert cache == [100, 101, 2, 3, 3, 7, 2, 7]


def test_gathered_blocks_come_back_with_every_head():
    cache = numbered_cache(5)
    gathered = mover_for(cache, 0).apply(TierOps(gather_blocks=[4, 1, 2, 3])).wait()
    assert block_values(gathered) == [4, 1, 2, 3] and [block.shape for block in gathered] == [DIMS] * 4


def test_a_block_is_gathered_as_it_was_before_a_load_into_it_in_the_same_ops():
    cache = numbered_cache(6)
    mover = mover_for(cache, num_cpu_slots=2)
    mover.host.fill_(-1)
    gathered = mover.apply(TierOps(gather_blocks=[3, 5], cpu_loads=[(0, 3)]))
    assert block_values(gathered.wait()) == [3, 5] and block_values(cache)[3] == -1


def test_loads_wait_for_the_pieces_that_read_their_block_and_no_other():
    """The grouping behind loads beside spills and gathers (events stand in as plain markers here; on CUDA they
    are CUDA events, tests/gpu/test_tier_transfers.py): a block's load waits for its spill piece and its gather."""
    from workers.block_mover import _in_read_order, _ReadsInFlight

    spills, gathers = _ReadsInFlight(), _ReadsInFlight()
    early, first, second, gather = object(), object(), object(), object()
    spills.add([7], early)
    spills.add([1, 2], first)
    spills.add([3, 7], second)  # block 7 read again, later
    gathers.add([2, 5], gather)
    assert _in_read_order([9, 2, 3, 1, 8, 5], spills, gathers) == [
        ([], {8, 9}), ([gather], {5}), ([first], {1}), ([first, gather], {2}), ([second], {3})]
    assert _in_read_order([7], spills, gathers) == [([second], {7})]
    assert spills.last_reading([1, 9]) is first and spills.last_reading([9]) is None
    spills.add([4], None)  # on the CPU a copy is done when enqueued: nothing to wait for
    assert _in_read_order([4], spills, gathers) == [([], {4})]


def test_a_gather_copies_whole_pieces_then_the_rest_in_powers_of_two():
    """135 blocks: two pieces of 64, then 4, 2 and 1 (one copy each); every block as it was, in order."""
    from workers.block_mover import GATHER_PIECE_BLOCKS, _pieces

    assert GATHER_PIECE_BLOCKS == 64
    assert _pieces(135) == [(0, 64), (64, 64), (128, 4), (132, 2), (134, 1)]
    assert _pieces(32) == [(0, 32)] and _pieces(3) == [(0, 2), (2, 1)] and _pieces(0) == []
    cache = numbered_cache(140)
    order = [139 - i if i % 3 else i for i in range(135)]  # no runs: each piece is an index_select
    gathered = mover_for(cache, 0).apply(TierOps(gather_blocks=order))
    assert [piece.shape[0] for piece in gathered.pieces] == [64, 64, 4, 2, 1]
    assert block_values(gathered.wait()) == order
