from router.progress import ProgressWatch


def test_a_worker_is_stalled_only_with_pending_requests_and_no_step_for_longer_than_the_timeout():
    watch = ProgressWatch(stall_timeout_s=5)
    assert not watch.observe("w0", steps=10, pending=2, now=0)
    assert not watch.observe("w0", steps=10, pending=2, now=5)  # exactly the timeout: not yet
    assert watch.observe("w0", steps=10, pending=2, now=5.1)
    assert not watch.observe("w0", steps=11, pending=2, now=6)  # a step: progress again
    assert not watch.observe("w0", steps=11, pending=0, now=20)  # idle is not stalled
    assert not watch.observe("w0", steps=11, pending=1, now=24)  # first seen waiting: the clock starts here
    assert not watch.observe("w0", steps=11, pending=1, now=29)  # 5 s since 24, not since the idle reading
    assert watch.observe("w0", steps=11, pending=1, now=29.1)
    assert not watch.observe("w1", steps=11, pending=1, now=29.1)  # per worker
    watch.forget("w0")
    assert not watch.observe("w0", steps=11, pending=1, now=40)
