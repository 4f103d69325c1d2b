"""Streaming on asyncio over the synchronous engine.

The engine is only ever touched by one step loop: ``generate`` validates in the caller (raising
``InvalidRequestError`` at once), then hands the request to the loop, which adds queued requests and aborts
between steps and runs each ``step`` in a worker thread so the event loop stays free.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence as Seq

from workers.engine import LLMEngine, PreparedRequest, RequestOutput
from workers.output_stream import OutputStream
from workers.sampling_params import SamplingParams
from workers.validation import InvalidRequestError, in_a_thread_if_long

log = logging.getLogger(__name__)


class EngineFailed(RuntimeError):
    """The engine is broken (a step failed) and its host restarts it; ``__cause__`` is what the step raised."""


class AsyncEngine:
    def __init__(self, engine: LLMEngine, on_fatal: Callable[[Exception], None] | None = None) -> None:
        """``on_fatal`` is called once a step has failed (after every open stream got the error): the engine is
        broken, and whoever hosts it should restart it as a unit."""
        self.engine = engine
        self.on_fatal = on_fatal
        self.failed: Exception | None = None
        self._streams: dict[str, OutputStream] = {}
        self._to_add: list[PreparedRequest] = []
        self._to_abort: list[str] = []
        self._loop_task: asyncio.Task | None = None
        self._kv_subscribers: list[asyncio.Queue] = []
        self._new_kv_subscribers: list[asyncio.Queue] = []
        self._flushes: list[tuple[asyncio.Future, dict]] = []  # flush_cache calls, run between steps
        self._held_until = 0.0  # test hook: no step before this time.monotonic()
        self._failure_for_test: Exception | None = None  # test hook: the next step raises this

    def subscribe_kv_events(self) -> asyncio.Queue:
        """A queue of ("snapshot", {tier: hashes}) first, then ("events", [KVEvent, ...]) as blocks move."""
        queue: asyncio.Queue = asyncio.Queue()
        self._new_kv_subscribers.append(queue)
        self._wake()
        return queue

    def unsubscribe_kv_events(self, queue: asyncio.Queue) -> None:
        for subscribers in (self._kv_subscribers, self._new_kv_subscribers):
            if queue in subscribers:
                subscribers.remove(queue)

    def load(self) -> int:
        return len(self._streams)

    def is_running(self, request_id: str) -> bool:
        return request_id in self._streams

    async def generate(
        self,
        request_id: str,
        prompt: str | Seq[int],
        params: SamplingParams | None = None,
        cache_salt: str | None = None,
        *,
        priority: int = 0,
    ) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs as they come (those of several steps as one, when the caller fell behind:
        ``OutputStream``); leaving early (or cancellation) aborts it."""
        prepare = functools.partial(self.engine.prepare_request, request_id, prompt, params, cache_salt,
                                    priority=priority)
        request = await in_a_thread_if_long(len(prompt), prepare)  # (prepare_request touches no engine state)
        if self.failed is not None:  # (checked after the await: nothing can come between them and the add)
            raise EngineFailed(f"the engine failed and is being restarted: {self.failed}") from self.failed
        if request_id in self._streams:
            raise InvalidRequestError("request_id", f"{request_id!r} is already running")
        stream = self._streams[request_id] = OutputStream()
        self._to_add.append(request)
        self._wake()
        finished = False
        try:
            while not finished:
                output = await stream.get()
                finished = output.finished
                yield output
        finally:
            if not finished:
                self.abort(request_id)

    async def flush_cache(self, **options) -> dict[str, int | None]:
        """``LLMEngine.flush_cache(**options)``, run by the step loop between two steps (in a thread: a Redis
        flush waits for the writes queued before it and scans the keyspace)."""
        if self.failed is not None:
            raise EngineFailed(f"the engine failed and is being restarted: {self.failed}") from self.failed
        done = asyncio.get_running_loop().create_future()
        self._flushes.append((done, options))
        self._wake()
        return await done

    def abort(self, request_id: str) -> None:
        if self._streams.pop(request_id, None) is not None:
            self._to_abort.append(request_id)
            self._wake()

    def hold_steps_for_test(self, seconds: float) -> None:
        """Test hook: the step loop takes no step for ``seconds`` (a stalled engine, as the router sees it)."""
        self._held_until = time.monotonic() + seconds

    def fail_next_step_for_test(self, failure: Exception) -> None:
        """Test hook: the next step raises ``failure`` instead of running (a broken engine, as its streams see
        it)."""
        self._failure_for_test = failure

    def _step(self) -> list[RequestOutput]:
        if self._failure_for_test is not None:
            raise self._failure_for_test
        return self.engine.step()

    def _wake(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        """Owns the engine: between steps it applies queued requests, aborts and subscriptions."""
        while True:
            self._apply_queued()
            await self._run_flushes()
            if not self.engine.has_unfinished():
                return
            while time.monotonic() < self._held_until:
                await asyncio.sleep(0.05)
            try:
                outputs = await asyncio.to_thread(self._step)
            except Exception as error:  # the engine is broken: every open stream gets the error
                log.exception("engine step failed; failing %d open streams", len(self._streams))
                self.failed = error
                self._fail_all(error)
                if self.on_fatal is not None:
                    self.on_fatal(error)
                return
            for output in outputs:
                stream = self._streams.get(output.request_id)
                if stream is not None:
                    stream.put(output)
                    if output.finished:
                        del self._streams[output.request_id]
            self._publish_kv_events()

    async def _run_flushes(self) -> None:
        flushes, self._flushes = self._flushes, []
        for done, options in flushes:
            try:
                dropped = await asyncio.to_thread(self.engine.flush_cache, **options)
            except Exception as error:  # (a flush that failed is its caller's error; the engine serves on)
                if not done.cancelled():
                    done.set_exception(error)
            else:
                if not done.cancelled():
                    done.set_result(dropped)
        if flushes:
            self._publish_kv_events()  # the router's index drops what the tiers dropped

    def _publish_kv_events(self) -> None:
        events, overflowed = self.engine.kv_events.drain()
        if overflowed:
            snapshot = self.engine.kv_snapshot()
            for queue in self._kv_subscribers:
                queue.put_nowait(("snapshot", snapshot))
        elif events:
            for queue in self._kv_subscribers:
                queue.put_nowait(("events", events))

    def _apply_queued(self) -> None:
        self._publish_kv_events()
        if self._new_kv_subscribers:
            snapshot = self.engine.kv_snapshot()
            for queue in self._new_kv_subscribers:
                queue.put_nowait(("snapshot", snapshot))
            self._kv_subscribers += self._new_kv_subscribers
            self._new_kv_subscribers = []
        adds, self._to_add = self._to_add, []
        aborts, self._to_abort = self._to_abort, []
        for request in adds:
            self.engine.submit(request)
        for request_id in aborts:
            self.engine.abort(request_id)

    def _fail_all(self, error: Exception) -> None:
        for stream in self._streams.values():
            failed = EngineFailed(f"the engine failed: {type(error).__name__}: {error}")
            failed.__cause__ = error
            stream.fail(failed)
        self._streams.clear()
