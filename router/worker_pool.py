"""The workers the router routes to: their gRPC channels, health, load, and the KV events that feed the index.

A worker is healthy once its channel is up and its first KV snapshot is in the index. Any failure of its event
stream or of a request to it marks it unhealthy at once (no more routing there) and drops its local tiers from
the index; ``reconnect`` (from the supervisor, which asks Ray where the worker now listens) takes it back.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from dataclasses import dataclass, field

import grpc

from kvstore.events import KVEvent
from protos.kvtier.v1 import generation_pb2 as pb
from protos.kvtier.v1 import generation_pb2_grpc as pb_grpc
from router.policies import WorkerLoad
from router.prefix_index import PrefixIndex

log = logging.getLogger(__name__)


@dataclass
class Worker:
    worker_id: str
    address: str = ""
    healthy: bool = False
    stalled: bool = False  # healthy, but its engine takes no step while it has requests (router.progress)
    move_off: asyncio.Event = field(default_factory=asyncio.Event)  # set: its streams move to another worker
    # priority -> requests the router has routed here and not seen finish
    priorities: collections.Counter[int] = field(default_factory=collections.Counter)
    channel: grpc.aio.Channel | None = None
    stub: pb_grpc.GenerationStub | None = None
    watcher: asyncio.Task | None = None
    snapshot_loaded: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def in_flight(self) -> int:
        return self.priorities.total()

    def started(self, priority: int) -> None:
        self.priorities[priority] += 1

    def ended(self, priority: int) -> None:
        self.priorities[priority] -= 1
        if not self.priorities[priority]:
            del self.priorities[priority]

    def load_ahead_of(self, priority: int) -> int:
        """Requests here that a request of ``priority`` waits for: those as urgent or more (a worker preempts
        less urgent ones for it: ``workers.scheduler``)."""
        return sum(count for queued, count in self.priorities.items() if queued <= priority)


class WorkerPool:
    def __init__(self, worker_ids: list[str], index: PrefixIndex) -> None:
        self.index = index
        self.workers = {worker_id: Worker(worker_id) for worker_id in worker_ids}

    def healthy_loads(self, priority: int = 0) -> list[WorkerLoad]:
        """The workers taking requests, each with its load as a request of ``priority`` sees it."""
        return [WorkerLoad(w.worker_id, w.load_ahead_of(priority)) for w in self.workers.values()
                if w.healthy and not w.stalled]

    async def connect(self, worker_id: str, address: str) -> None:
        """(Re)connect and start following the worker's KV events; healthy once its snapshot is indexed."""
        worker = self.workers[worker_id]
        await self._close(worker)
        worker.address = address
        worker.channel = grpc.aio.insecure_channel(address)
        worker.stub = pb_grpc.GenerationStub(worker.channel)
        worker.snapshot_loaded = asyncio.Event()
        worker.watcher = asyncio.get_running_loop().create_task(self._watch(worker))
        await asyncio.wait_for(worker.snapshot_loaded.wait(), timeout=30)
        worker.healthy, worker.stalled = True, False  # a new process (Ray restarted it): its readings start afresh
        worker.move_off.clear()
        log.info("worker %s at %s is serving", worker_id, address)

    def set_stalled(self, worker_id: str, stalled: bool, why: str) -> None:
        """A stalled worker takes no new request; one that makes progress again takes them again."""
        worker = self.workers[worker_id]
        if stalled != worker.stalled:
            log.warning("worker %s %s", worker_id, why if stalled else "makes progress again")
        worker.stalled = stalled
        if not stalled:
            worker.move_off.clear()

    def move_streams_off_stalled(self) -> None:
        """The streams on a stalled worker move to another worker, once one takes requests; while none does,
        they wait where they are (the stall may end: a request is not failed for want of a better place)."""
        if not self.healthy_loads():
            return
        for worker in self.workers.values():
            if worker.healthy and worker.stalled and not worker.move_off.is_set():
                log.warning("moving the streams of stalled worker %s (%d) to other workers", worker.worker_id,
                            worker.in_flight)
                worker.move_off.set()

    def mark_unhealthy(self, worker_id: str, reason: str) -> None:
        worker = self.workers[worker_id]
        if worker.healthy:
            log.warning("worker %s is unhealthy: %s", worker_id, reason)
        worker.healthy = False
        self.index.remove_worker(worker_id)

    async def _watch(self, worker: Worker) -> None:
        stub = pb_grpc.WorkerControlStub(worker.channel)
        try:
            async for batch in stub.WatchKVEvents(pb.WatchKVEventsRequest()):
                events = [KVEvent(e.tier, e.stored, tuple(e.block_hashes)) for e in batch.events]
                if batch.snapshot:
                    self.index.replace(worker.worker_id, {e.tier: list(e.block_hashes) for e in events})
                else:  # changes, or the later parts of a snapshot
                    self.index.apply(worker.worker_id, events)
                if not batch.snapshot_continues:
                    worker.snapshot_loaded.set()
        except grpc.aio.AioRpcError as error:
            if not worker.healthy:  # (mark_unhealthy says nothing of a worker that was not healthy yet)
                log.warning("worker %s: its KV event stream ended: %s %s", worker.worker_id, error.code().name,
                            error.details())
            self.mark_unhealthy(worker.worker_id, f"event stream ended: {error.code().name}")

    async def _close(self, worker: Worker) -> None:
        if worker.watcher is not None:
            worker.watcher.cancel()
        if worker.channel is not None:
            await worker.channel.close()

    async def close(self) -> None:
        for worker in self.workers.values():
            await self._close(worker)
