"""The router's Generation service: validate, admit, route, and proxy the worker's stream. Thin by design."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from dataclasses import dataclass, field

import grpc

from kvstore.events import KVEvent
from kvstore.hashing import block_hashes
from protos.kvtier.v1 import generation_pb2 as pb
from protos.kvtier.v1 import generation_pb2_grpc as pb_grpc
from router.metrics import RouterMetrics
from router.errors import NoHealthyWorker, Overloaded, map_errors
from router.requests import drawn_seed, prompt_of, salt_of, salts_of, sampling_of, with_token_ids
from router.worker_pool import Worker, WorkerPool
from workers.tokenizer import Tokenizer
from workers.validation import (InvalidRequestError, RequestLimits, in_a_thread_if_long, validate_request,
                                validate_text_prompt)

log = logging.getLogger(__name__)
_STATS_TIMEOUT_S = 5.0  # a worker slower than this to report its stats is left out of GetStats


class MovedOff(Exception):
    """The worker's call was cancelled because the worker stalled: the stream moves on to another worker."""


async def responses_until_moved_off(worker: Worker, call):
    """``call``'s responses, until the pool moves streams off ``worker`` (``Worker.move_off``): then the call is
    cancelled (the worker, once it runs again, aborts the request) and MovedOff is raised. A cancellation of the
    caller itself (the client went away) goes through as it is."""
    moved_off = False

    async def cancel_when_moved_off() -> None:
        nonlocal moved_off
        await worker.move_off.wait()
        moved_off = True
        call.cancel()

    watchdog = asyncio.get_running_loop().create_task(cancel_when_moved_off())
    try:
        async for response in call:
            yield response
    except asyncio.CancelledError:
        if not moved_off or asyncio.current_task().cancelling():
            raise
        raise MovedOff(worker.worker_id) from None
    finally:
        watchdog.cancel()


@dataclass
class Relayed:
    """What one client's stream was sent, over every worker it went through."""

    streamed: list[int] = field(default_factory=list)  # the generated tokens
    first_token_at: float | None = None
    prompt_logprobs_sent: bool = False  # with the first Delta: a migrated request does not ask for them again
    held: list[pb.GenerateResponse] = field(default_factory=list)  # this worker's PromptLogprobs, until its Delta

    def new_worker(self) -> None:
        """Another worker takes the stream: what the last one sent and was held back is dropped (this one sends
        it all again)."""
        self.held = []

    def take(self, response: pb.GenerateResponse) -> list[pb.GenerateResponse]:
        """What to send on now for ``response``: the prompt's log-probabilities are held back until the first
        Delta, so a worker failing while it sends them leaves the client none (the next worker sends all)."""
        kind = response.WhichOneof("event")
        if kind == "prompt_logprobs":
            self.held.append(response)
            return []
        if kind == "delta":
            self.first_token_at = self.first_token_at or time.monotonic()
            self.streamed += response.delta.token_ids
            self.prompt_logprobs_sent = True
        sent, self.held = self.held + [response], []
        return sent


@dataclass(frozen=True)
class ModelFacts:
    """What the router must know of the model to validate and hash requests (from a worker's ClusterInfo)."""

    name: str
    fingerprint: str
    block_size: int
    limits: RequestLimits
    tensor_parallel_size: int = 1  # every worker's (they share one config)


class RouterServicer(pb_grpc.GenerationServicer):
    def __init__(self, pool: WorkerPool, policy, policy_name: str, facts: ModelFacts, tokenizer: Tokenizer | None,
                 max_in_flight: int, metrics: RouterMetrics | None = None, min_priority: int | None = None) -> None:
        self.pool = pool
        self.policy = policy
        self.policy_name = policy_name
        self.facts = facts
        self.tokenizer = tokenizer
        self.max_in_flight = max_in_flight
        self.min_priority = min_priority  # the most urgent priority clients may ask for (None: any)
        self.in_flight = 0
        self.draining = False  # set on SIGTERM: open streams finish, new requests are refused
        self.metrics = metrics or RouterMetrics(policy_name)

    @map_errors
    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        arrived = time.monotonic()
        token_ids, max_tokens, salt = await self.validated(request)
        if self.draining:
            self.metrics.requests.labels("rejected").inc()
            raise NoHealthyWorker("the router is draining (shutting down); retry on another replica")
        if self.in_flight >= self.max_in_flight:
            self.metrics.requests.labels("rejected").inc()
            raise Overloaded(f"{self.in_flight} requests in flight, the limit is {self.max_in_flight}")
        request_id = request.request_id or uuid.uuid4().hex
        self.in_flight += 1
        self.metrics.running.inc()
        try:
            async for response in self._stream(request, request_id, token_ids, max_tokens, salt, context, arrived):
                yield response
        except Exception:
            self.metrics.requests.labels("failed").inc()
            raise
        finally:
            self.in_flight -= 1
            self.metrics.running.dec()

    async def _stream(self, request, request_id, token_ids, max_tokens, salt, context, arrived):
        """Proxy the worker's stream. If the worker fails, or stalls while another worker takes requests, migrate:
        resubmit the prompt plus every token already streamed to another worker, as resumed tokens, so the
        client's stream goes on with nothing repeated or missing: the same tokens (a seeded draw included), the
        same text and stop strings."""
        relayed, failure = Relayed(), ""
        seed = drawn_seed(request)
        for _ in range(len(self.pool.workers) + 1):
            streamed = list(relayed.streamed)  # before this worker's tokens
            try:
                worker = await self._choose(token_ids + streamed, salt, request.priority)
            except NoHealthyWorker as error:
                raise NoHealthyWorker(f"{error}{failure}") from None
            forwarded = with_token_ids(request, request_id, token_ids + streamed)
            forwarded.max_tokens = max_tokens - len(streamed)
            forwarded.resumed_tokens = request.resumed_tokens + len(streamed)
            if seed is not None:
                forwarded.sampling.seed = seed
            if relayed.prompt_logprobs_sent:
                forwarded.sampling.ClearField("prompt_logprobs")
            relayed.new_worker()
            worker.started(request.priority)
            try:
                call = worker.stub.Generate(forwarded, timeout=context.time_remaining())
                async for response in responses_until_moved_off(worker, call):
                    if response.HasField("final"):
                        _client_view(response.final, len(token_ids), len(relayed.streamed), arrived,
                                     relayed.first_token_at)
                        self.metrics.finished(response.final)
                    for sent in relayed.take(response):
                        yield sent
                return
            except grpc.aio.AioRpcError as error:
                if error.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                    raise
                self.pool.mark_unhealthy(worker.worker_id, f"request failed: {error.code().name}")
                failure, reason = f" (the last one to fail: {error.details() or error.code().name})", "failed"
            except MovedOff:
                failure, reason = f" (the last one stalled: {worker.worker_id})", "stalled"
            finally:
                worker.ended(request.priority)
            self.metrics.migrations.labels(reason).inc()
            log.warning("migrating %s after %d tokens: worker %s %s", request_id, len(relayed.streamed),
                        worker.worker_id, reason)
        raise NoHealthyWorker(f"request {request_id}: every worker failed{failure}")

    async def validated(self, request: pb.GenerateRequest) -> tuple[list[int], int, str | None]:
        """(prompt token ids, max_tokens with its default applied, cache salt), or InvalidRequestError; a long
        prompt's tokenizing and checks run in a worker thread (``in_a_thread_if_long``)."""
        kind = request.WhichOneof("prompt")
        size = len(request.text) if kind == "text" else len(request.token_ids.ids) if kind else 0
        return await in_a_thread_if_long(size, functools.partial(self._validated, request))

    def _validated(self, request: pb.GenerateRequest) -> tuple[list[int], int, str | None]:
        prompt, params, salt = prompt_of(request), sampling_of(request), salt_of(request)
        limits = self.facts.limits
        if isinstance(prompt, str):
            validate_text_prompt(prompt, limits, params.resumed_tokens)
            prompt = self.tokenizer.encode(prompt)
        validate_request(prompt, params, limits, salt)
        if self.min_priority is not None and request.priority < self.min_priority:
            raise InvalidRequestError("priority", f"{request.priority} is more urgent than this cluster allows "
                                                  f"(router.min_priority: {self.min_priority})")
        return prompt, params.max_tokens, salt

    async def _choose(self, token_ids: list[int], salt: str | None, priority: int):
        hash_blocks = functools.partial(block_hashes, token_ids[:-1], self.facts.block_size, salt=salt)
        hashes = await in_a_thread_if_long(len(token_ids), hash_blocks)
        candidates = self.pool.healthy_loads(priority)
        if not candidates:
            raise NoHealthyWorker("no healthy worker")
        choice = self.policy.choose(candidates, hashes, self.facts.block_size)
        self.metrics.routed_to(choice.worker_id, choice.predicted, self.facts.block_size)
        # The chosen worker will hold this prefix in a moment: index it now, so requests for the same prefix
        # that arrive before the worker's events follow it there. Its events confirm or correct this guess.
        self.pool.index.apply(choice.worker_id, [KVEvent("gpu", True, tuple(hashes))])
        return self.pool.workers[choice.worker_id]

    @map_errors
    async def Abort(self, request: pb.AbortRequest, context) -> pb.AbortResponse:
        aborted = False
        for worker in self.pool.workers.values():
            if worker.healthy:
                aborted |= (await worker.stub.Abort(request)).aborted
        return pb.AbortResponse(aborted=aborted)

    @map_errors
    async def Tokenize(self, request: pb.TokenizeRequest, context) -> pb.TokenizeResponse:
        if self.tokenizer is None:
            raise InvalidRequestError("text", "this model has no tokenizer")
        encode = functools.partial(self.tokenizer.encode, request.text)
        return pb.TokenizeResponse(token_ids=await in_a_thread_if_long(len(request.text), encode))

    @map_errors
    async def GetClusterInfo(self, request, context) -> pb.ClusterInfo:
        workers = [
            pb.WorkerInfo(worker_id=w.worker_id, address=w.address, healthy=w.healthy, load=w.in_flight,
                          tensor_parallel_size=self.facts.tensor_parallel_size)
            for w in self.pool.workers.values()
        ]
        facts = self.facts
        return pb.ClusterInfo(
            model=facts.name, fingerprint=facts.fingerprint, routing_policy=self.policy_name, workers=workers,
            max_model_len=facts.limits.max_model_len, block_size=facts.block_size,
            vocab_size=facts.limits.vocab_size, ready=all(w.healthy for w in self.pool.workers.values()),
        )

    @map_errors
    async def FlushCache(self, request: pb.FlushCacheRequest, context) -> pb.FlushCacheResponse:
        """Every healthy worker drops the blocks (or the salt's) from its GPU and CPU tiers and writes what its
        queue holds; then one of them deletes from Redis, so no write queued before the flush lands after it.
        An unhealthy worker is named in ``not_flushed`` (restarted, it starts empty)."""
        salts_of(request)  # a request no worker would take fails here, once
        response = pb.FlushCacheResponse()
        healthy = [worker for worker in self.pool.workers.values() if worker.healthy]
        for worker in self.pool.workers.values():
            if not worker.healthy:
                response.not_flushed[worker.worker_id] = "unhealthy"
        flushed = await self._flush_on(healthy, _flush_request(request, local_tiers_only=True), response, context)
        if not flushed:
            raise NoHealthyWorker(f"no worker could flush its tiers: {dict(response.not_flushed)}")
        if not request.local_tiers_only:
            await self._flush_redis(flushed[0], _flush_request(request, local_tiers_only=False), response, context)
        return response

    @staticmethod
    async def _flush_redis(worker, request: pb.FlushCacheRequest, response: pb.FlushCacheResponse, context) -> None:
        try:
            redis = await worker.stub.FlushCache(request, timeout=context.time_remaining())
        except grpc.RpcError as error:
            response.redis_error = f"worker {worker.worker_id} failed to flush Redis: {error.code().name}: " \
                f"{error.details()}"
            return
        response.redis_keys, response.redis_error = redis.redis_keys, redis.redis_error

    async def _flush_on(self, workers: list, request: pb.FlushCacheRequest, response: pb.FlushCacheResponse,
                        context) -> list:
        """``request`` on every one of ``workers`` at once; their counts go into ``response``; those that answered."""
        answers = await asyncio.gather(*(w.stub.FlushCache(request, timeout=context.time_remaining())
                                         for w in workers), return_exceptions=True)
        flushed = []
        for worker, answer in zip(workers, answers):
            if isinstance(answer, grpc.RpcError):
                response.not_flushed[worker.worker_id] = f"{answer.code().name}: {answer.details()}"
            elif isinstance(answer, BaseException):
                raise answer
            else:
                response.workers.MergeFrom(answer.workers)
                flushed.append(worker)
        return flushed

    @map_errors
    async def GetStats(self, request, context) -> pb.Stats:
        return await self.worker_stats(_STATS_TIMEOUT_S)

    async def worker_stats(self, timeout_s: float) -> pb.Stats:
        """Every healthy worker's stats, asked concurrently; a worker that does not answer in time is left out."""
        healthy = [worker for worker in self.pool.workers.values() if worker.healthy]
        answers = await asyncio.gather(*(w.stub.GetStats(pb.GetStatsRequest(), timeout=timeout_s) for w in healthy),
                                       return_exceptions=True)
        stats = pb.Stats()
        for worker, answer in zip(healthy, answers):
            if isinstance(answer, grpc.RpcError):
                log.warning("worker %s gave no stats: %s", worker.worker_id, answer.code().name)
            elif isinstance(answer, BaseException):
                raise answer
            else:
                stats.workers.MergeFrom(answer.workers)
        return stats


def _flush_request(request: pb.FlushCacheRequest, local_tiers_only: bool) -> pb.FlushCacheRequest:
    forwarded = pb.FlushCacheRequest()
    forwarded.CopyFrom(request)
    forwarded.local_tiers_only = local_tiers_only
    return forwarded


def _client_view(final: pb.Final, prompt_tokens: int, streamed: int, arrived: float, first: float | None) -> None:
    """The final message as the client sees it: its own prompt, every token streamed, the router's timings."""
    now = time.monotonic()
    final.usage.prompt_tokens = prompt_tokens
    final.usage.completion_tokens = streamed
    final.timings.ttft_s = (first or now) - arrived
    final.timings.total_s = now - arrived
