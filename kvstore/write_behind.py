"""Write-behind to Redis: a bounded queue of write jobs, drained by one daemon thread in pipelined batches.

A job is a callable that yields, block by block, each block's (key, value) items (its units, then its
manifest). It runs on the writer's thread, so encoding a block, and waiting for its bytes to be copied off
the GPU, cost the caller nothing. Invariants:
- a job holds ``blocks`` places of the queue's ``max_blocks`` from ``submit`` until it is written or failed;
  one that does not fit is dropped whole (and counted), never queued in part;
- items go out in the order the jobs yield them, on one connection at a time, so a manifest is never
  written before the units it lists;
- a block counts as written only when every one of its items was.
No torch and no model: the items are opaque bytes (``kvstore.codec`` gives them meaning).
"""

from __future__ import annotations

import atexit
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator

from kvstore.redis_store import RedisStore
from kvstore.resp import Value, value_size

log = logging.getLogger(__name__)
Item = tuple[str, Value]  # a key and its value (one buffer, or its parts in order)
WriteJob = Callable[[], Iterable[list[Item]]]  # yields each block's items


class WriteBehind:
    def __init__(self, store: RedisStore, max_blocks: int, batch_blocks: int, batch_bytes: int = 8 * 2**20) -> None:
        self.store = store
        self.max_blocks = max_blocks
        self.batch_blocks = batch_blocks
        self.batch_bytes = batch_bytes
        self._jobs: queue.SimpleQueue[tuple[WriteJob, int] | None] = queue.SimpleQueue()
        self._changed = threading.Condition()
        self._queued_blocks = 0  # of jobs submitted and not yet written or failed
        self.dropped = 0  # blocks
        self.written = 0  # blocks
        self.failed = 0  # blocks
        self.bytes_written = 0
        self._thread = threading.Thread(target=self._drain, name="kvtier-redis-write-behind", daemon=True)
        self._thread.start()
        atexit.register(self.close)  # a process that exits unclosed still writes what is queued, then stops the
        # thread: left running, it would encode torch tensors while the interpreter tears down (seen: SIGABRT)

    def room(self) -> int:
        """Blocks a job may hold now and still be queued."""
        with self._changed:
            return max(0, self.max_blocks - self._queued_blocks)

    def submit(self, job: WriteJob, blocks: int) -> int:
        """Queue ``job`` (``blocks`` blocks) if it fits; returns the blocks dropped: all of them, or none."""
        with self._changed:
            if self._queued_blocks + blocks > self.max_blocks:
                self.dropped += blocks
                return blocks
            self._queued_blocks += blocks
        self._jobs.put((job, blocks))
        return 0

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until every job queued so far is written (or has failed); False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while self._queued_blocks and time.monotonic() < deadline:
                self._changed.wait(max(0.0, deadline - time.monotonic()))
            return self._queued_blocks == 0

    def close(self, timeout_s: float = 60.0) -> None:
        """Write what is queued (for at most ``timeout_s``: a 32k-token prefix of an 8B model is 4 GiB), then stop."""
        atexit.unregister(self.close)
        if not self.flush(timeout_s):
            log.warning("closing with %d blocks not yet written to Redis after %.0f s", self._queued_blocks,
                        timeout_s)
        self._jobs.put(None)
        self._thread.join(1.0)

    def _drain(self) -> None:
        while (entry := self._jobs.get()) is not None:
            job, blocks = entry
            written_before = self.written
            try:
                for batch, size in _batches(job(), self.batch_blocks, self.batch_bytes):
                    self._write(batch, size)
            except Exception:  # a job that cannot produce its bytes: its blocks are misses later, not an outage
                log.exception("a Redis write job failed; its blocks are not stored")
                self.failed += blocks - (self.written - written_before)
            finally:
                with self._changed:
                    self._queued_blocks -= blocks
                    self._changed.notify_all()

    def _write(self, batch: list[list[Item]], size: int) -> None:
        if self.store.put_many([item for block in batch for item in block]):
            self.written += len(batch)
            self.bytes_written += size
        else:
            self.failed += len(batch)


def _batches(blocks: Iterable[list[Item]], max_blocks: int, max_bytes: int) -> Iterator[tuple[list[list[Item]], int]]:
    """Consecutive blocks, at most ``max_blocks`` and (past the first) ``max_bytes`` per batch, each batch with
    its bytes."""
    batch: list[list[Item]] = []
    size = 0
    for block in blocks:
        block_size = sum(value_size(value) for _, value in block)
        if batch and (len(batch) >= max_blocks or size + block_size > max_bytes):
            yield batch, size
            batch, size = [], 0
        batch.append(block)
        size += block_size
    if batch:
        yield batch, size
