"""The write-behind queue against a real redis-server: jobs run on the writer's thread, blocks go out in order,
a job that does not fit is dropped whole, and only blocks whose every item was written count as written."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

from kvstore.config import RedisConfig
from kvstore.redis_store import RedisStore
from kvstore.write_behind import WriteBehind, _batches


def blocks_of(names: list[str]) -> list[list[tuple[str, bytes]]]:
    """Each block: two units, then its manifest."""
    return [[(f"kvtier:t:{n}:u0", n.encode() * 100), (f"kvtier:t:{n}:u1", n.encode() * 50),
             (f"kvtier:t:{n}:m", b"m")] for n in names]


def test_jobs_are_produced_on_the_writers_thread_and_every_item_lands(redis_server):
    store = RedisStore(RedisConfig(url=redis_server.url))
    writer = WriteBehind(store, max_blocks=10, batch_blocks=2)
    threads = []

    def job():
        threads.append(threading.current_thread().name)
        yield from blocks_of(["a", "b", "c"])

    assert writer.submit(job, 3) == 0
    assert writer.flush()
    writer.close()
    store.close()
    client = redis_server.client()
    assert threads == ["kvtier-redis-write-behind"]
    assert client.get("kvtier:t:b:u1") == b"b" * 50 and client.get("kvtier:t:c:m") == b"m"
    assert (writer.written, writer.failed, writer.dropped) == (3, 0, 0)
    assert writer.bytes_written == 3 * (100 + 50 + 1)


def test_a_job_that_does_not_fit_is_dropped_whole_and_room_comes_back_once_written(redis_server):
    store = RedisStore(RedisConfig(url=redis_server.url, socket_timeout_s=2.0))
    writer = WriteBehind(store, max_blocks=4, batch_blocks=8)
    release = threading.Event()

    def held_job():  # holds its 3 places until released
        release.wait(5)
        yield from blocks_of(["x", "y", "z"])

    assert writer.submit(held_job, 3) == 0
    assert writer.room() == 1
    assert writer.submit(lambda: iter(blocks_of(["p", "q"])), 2) == 2  # dropped whole, never half queued
    assert writer.submit(lambda: iter(blocks_of(["r"])), 1) == 0
    assert writer.room() == 0
    release.set()
    assert writer.flush()
    assert writer.room() == 4 and (writer.written, writer.dropped) == (4, 2)
    writer.close()
    store.close()
    assert redis_server.client().get("kvtier:t:p:m") is None and redis_server.client().get("kvtier:t:r:m") == b"m"


def test_blocks_redis_did_not_take_count_as_failed_and_a_broken_job_does_not_stop_the_writer(redis_server):
    store = RedisStore(RedisConfig(url=redis_server.url, socket_timeout_s=0.2, max_retries=0))
    writer = WriteBehind(store, max_blocks=10, batch_blocks=1)

    def broken_job():
        yield from blocks_of(["ok"])
        raise RuntimeError("the bytes never came")

    writer.submit(broken_job, 2)  # raises before its batch is full: neither block is written
    writer.submit(lambda: iter(blocks_of(["next"])), 1)
    assert writer.flush()
    assert (writer.written, writer.failed) == (1, 2)
    redis_server.kill()
    writer.submit(lambda: iter(blocks_of(["lost"])), 1)
    assert writer.flush()
    assert (writer.written, writer.failed) == (1, 3)
    writer.close()
    store.close()


def test_batches_hold_whole_blocks_within_the_limits():
    blocks = blocks_of(list("abcde"))  # 151 bytes each
    assert [(len(b), size) for b, size in _batches(blocks, max_blocks=2, max_bytes=10**6)] == [(2, 302), (2, 302),
                                                                                               (1, 151)]
    assert [len(b) for b, _ in _batches(blocks, max_blocks=8, max_bytes=400)] == [2, 2, 1]
    assert [len(b) for b, _ in _batches(blocks, max_blocks=8, max_bytes=10)] == [1, 1, 1, 1, 1]  # one block always goes
    assert list(_batches([], 2, 10)) == []


def test_a_process_that_exits_without_closing_still_writes_what_it_queued(redis_server):
    """The writer is a daemon thread; left running at exit it was killed mid-job (with torch in the job: SIGABRT).
    An exit hook closes it: the queued job finishes, the process exits 0."""
    program = f"""
import sys, time
sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})
from kvstore.config import RedisConfig
from kvstore.redis_store import RedisStore
from kvstore.write_behind import WriteBehind
writer = WriteBehind(RedisStore(RedisConfig(url={redis_server.url!r})), max_blocks=4, batch_blocks=4)
def slow_job():
    time.sleep(0.5)  # still running when the main thread ends
    yield [("kvtier:t:exit:m", b"written at exit")]
writer.submit(slow_job, 1)
"""
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert redis_server.client().get("kvtier:t:exit:m") == b"written at exit"
