"""The worker pool's stall bookkeeping: which workers take requests, and when a stalled one's streams move;
the load a request of some priority sees on each worker, and the route that gives it."""

from router.policies import CacheAware
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


def test_a_request_sees_as_load_only_the_requests_as_urgent_as_it_or_more():
    pool = pool_of("w0", "w1")
    for priority in (5, 5, 5, 5, 0, -1):
        pool.workers["w0"].started(priority)
    for priority in (0, 0):
        pool.workers["w1"].started(priority)
    assert [(w.worker_id, w.load) for w in pool.healthy_loads(0)] == [("w0", 2), ("w1", 2)]
    assert [(w.worker_id, w.load) for w in pool.healthy_loads(-1)] == [("w0", 1), ("w1", 0)]
    assert [(w.worker_id, w.load) for w in pool.healthy_loads(5)] == [("w0", 6), ("w1", 2)]
    policy = CacheAware(pool.index)
    assert policy.choose(pool.healthy_loads(-1), [], 16).worker_id == "w1"
    pool.workers["w1"].ended(0)
    pool.workers["w1"].ended(0)
    pool.workers["w0"].ended(-1)
    assert policy.choose(pool.healthy_loads(-2), [], 16).worker_id == "w0"  # nothing ahead anywhere: in order
    assert pool.workers["w1"].in_flight == 0 and dict(pool.workers["w1"].priorities) == {}
    assert pool.workers["w0"].in_flight == 5
