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


def test_a_worker_that_answers_no_reading_for_longer_than_the_timeout_is_stalled_idle_or_not():
    watch = ProgressWatch(stall_timeout_s=5)
    assert not watch.observe("w0", steps=10, pending=0, now=0)
    assert not watch.no_answer("w0", now=2)
    assert not watch.no_answer("w0", now=5)  # 5 s since its last answer: not yet
    assert watch.no_answer("w0", now=5.1)
    assert not watch.observe("w0", steps=10, pending=0, now=6)  # it answers again, idle: not stalled
    assert not watch.no_answer("w0", now=11)
    assert watch.no_answer("w0", now=11.1)
    assert not watch.no_answer("w1", now=0)  # never answered: the clock starts at the first silence
    assert not watch.no_answer("w1", now=5)
    assert watch.no_answer("w1", now=5.1)
    assert not watch.observe("w1", steps=3, pending=1, now=6)  # its first answer starts afresh
