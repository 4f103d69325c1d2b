"""The prefix index's one-pass match of every worker against the per-worker walk it replaced, after random
events, snapshots, removals and evictions from small bounded sets: exact counts per worker and tier."""

import random

from kvstore.events import KVEvent
from router.prefix_index import PrefixIndex

H = [bytes([i]) * 32 for i in range(24)]
WORKERS = ["w0", "w1", "w2", "w3", "w4"]


def walked(index: PrefixIndex, worker_id: str, block_hashes: list[bytes]) -> dict[str, int]:
    """The leading GPU run, then the CPU run, then the Redis run, walked for one worker (the old ``match``)."""
    local = index._local.get(worker_id) or {}
    counts, position = {"gpu": 0, "cpu": 0, "redis": 0}, 0
    for tier, held in (("gpu", local.get("gpu")), ("cpu", local.get("cpu")), ("redis", index.redis)):
        while held is not None and position < len(block_hashes) and block_hashes[position] in held:
            counts[tier] += 1
            position += 1
    return counts


def random_change(rng: random.Random, index: PrefixIndex) -> None:
    worker, tier = rng.choice(WORKERS[:4]), rng.choice(["gpu", "gpu", "cpu", "redis"])
    start = rng.randrange(len(H))
    hashes = tuple(H[start : start + rng.randrange(1, 10)])
    draw = rng.random()
    if draw < 0.55:
        index.apply(worker, [KVEvent(tier, True, hashes)])
    elif draw < 0.85:
        index.apply(worker, [KVEvent(tier, False, hashes)])
    elif draw < 0.95:
        index.replace(worker, {"gpu": list(hashes[:4]), "cpu": list(hashes[4:])})
    else:
        index.remove_worker(worker)


def test_one_pass_matches_what_walking_each_worker_finds_and_the_holder_masks_stay_exact():
    rng = random.Random(3)
    index = PrefixIndex(max_blocks_per_set=12)
    for _ in range(3000):
        random_change(rng, index)
        start = rng.choice([0, 0, rng.randrange(len(H))])
        request = H[start : start + rng.randrange(0, 16)]
        assert index.match_all(WORKERS, request) == {w: walked(index, w, request) for w in WORKERS}
    for tier in ("gpu", "cpu"):
        expected = {}
        for worker, sets in index._local.items():
            for block_hash in sets[tier]:
                expected[block_hash] = expected.get(block_hash, 0) | index._bits[worker]
        assert index._holders[tier] == expected


def test_each_worker_gets_its_own_runs_in_one_pass():
    index = PrefixIndex()
    index.replace("a", {"gpu": H[:3], "cpu": H[3:5]})
    index.replace("b", {"gpu": H[:1], "cpu": [H[1]]})
    index.replace("c", {})
    index.apply("a", [KVEvent("redis", True, tuple(H[:8]))])
    assert index.match_all(["a", "b", "c", "new"], H[:10]) == {
        "a": {"gpu": 3, "cpu": 2, "redis": 3},
        "b": {"gpu": 1, "cpu": 1, "redis": 6},
        "c": {"gpu": 0, "cpu": 0, "redis": 8},
        "new": {"gpu": 0, "cpu": 0, "redis": 8},
    }
    assert index.match_all(["a"], H[:3]) == {"a": {"gpu": 3, "cpu": 0, "redis": 0}}
    assert index.match_all(["a", "b"], []) == {"a": {"gpu": 0, "cpu": 0, "redis": 0},
                                                "b": {"gpu": 0, "cpu": 0, "redis": 0}}
