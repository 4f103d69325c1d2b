"""The worker pool's stall bookkeeping: which workers take requests, and when a stalled one's streams move."""

from router.prefix_index import PrefixIndex
from router.worker_pool import WorkerPool


def pool_of(*worker_ids: str) -> WorkerPool:
    pool = WorkerPool(list(worker_ids), PrefixIndex())
    for worker in pool.workers.values():
        worker.healthy = True
    return pool


def moving(pool: WorkerPool) -> list[str]:
    return [w.worker_id for w in pool.workers.values() if w.move_off.is_set()]


def test_a_stalled_workers_streams_move_only_while_another_worker_takes_requests():
    pool = pool_of("w0", "w1")
    pool.set_stalled("w0", True, "stalled (test)")
    assert [load.worker_id for load in pool.healthy_loads()] == ["w1"]
    pool.set_stalled("w1", True, "stalled (test)")
    pool.move_streams_off_stalled()
    assert moving(pool) == []  # nowhere better to go: they wait where they are
    pool.set_stalled("w1", False, "")
    pool.move_streams_off_stalled()
    assert moving(pool) == ["w0"]
    pool.set_stalled("w0", False, "")  # it makes progress again: new streams stay on it
    assert moving(pool) == []
    assert [load.worker_id for load in pool.healthy_loads()] == ["w0", "w1"]


def test_an_unhealthy_stalled_worker_is_not_asked_to_move_streams_its_failed_calls_already_moved():
    pool = pool_of("w0", "w1")
    pool.set_stalled("w0", True, "stalled (test)")
    pool.mark_unhealthy("w0", "event stream ended (test)")
    pool.move_streams_off_stalled()
    assert moving(pool) == []
