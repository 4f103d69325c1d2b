"""A worker's own gRPC endpoint: the Generation service over its engine, and its KV event stream.

The router is this endpoint's client: token streams go router -> worker over gRPC (protobuf, never pickle);
Ray only places and restarts the process that hosts it (``cluster.worker_actor``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import asdict

import grpc

from protos.kvtier.v1 import generation_pb2 as pb
from protos.kvtier.v1 import generation_pb2_grpc as pb_grpc
from router.errors import WorkerUnavailable, map_errors
from router.requests import FINISH_REASONS, prompt_of, salt_of, salts_of, sampling_of
from workers.async_engine import AsyncEngine, EngineFailed
from workers.engine import RequestOutput
from workers.parallel import TensorParallelError
from workers.sampler import TokenLogprobs
from workers.validation import InvalidRequestError, in_a_thread_if_long

log = logging.getLogger(__name__)
_HASHES_PER_MESSAGE = 32_768  # a KV event message's hashes: 1.1 MB, well under gRPC's 4 MiB default
PROMPT_LOGPROBS_PER_MESSAGE = 1024  # with 20 alternatives each: about 250 KB


class WorkerServicer(pb_grpc.GenerationServicer, pb_grpc.WorkerControlServicer):
    def __init__(self, engine: AsyncEngine, worker_id: str, model_name: str) -> None:
        self.engine = engine
        self.worker_id = worker_id
        self.model_name = model_name

    @map_errors
    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        arrived = time.monotonic()
        request_id = request.request_id or uuid.uuid4().hex
        stream = self.engine.generate(request_id, prompt_of(request), sampling_of(request), salt_of(request),
                                      priority=request.priority)
        first_token_at, broken_before = None, self.engine.failed is not None
        try:
            async for output in stream:
                if first_token_at is None and output.new_token_ids:
                    first_token_at = time.monotonic()
                for piece in _prompt_logprobs_pieces(output):
                    yield pb.GenerateResponse(prompt_logprobs=piece)
                if output.new_token_ids or output.new_text:
                    yield pb.GenerateResponse(delta=_delta(output))
                if output.finished:
                    yield pb.GenerateResponse(final=self._final(output, request_id, arrived, first_token_at))
        except EngineFailed as error:
            # this worker's fault (a rank died, or it broke before the request came): the router moves it on; a
            # step error of no known cause may be the request's, so it is not tried on every worker in turn
            if broken_before or isinstance(error.__cause__, TensorParallelError):
                raise WorkerUnavailable(f"worker {self.worker_id}: {error}") from error
            raise

    def _final(self, output: RequestOutput, request_id: str, arrived: float, first: float | None) -> pb.Final:
        now = time.monotonic()
        cached = output.usage.cached_tokens
        usage = pb.Usage(
            prompt_tokens=output.usage.prompt_tokens, completion_tokens=output.usage.completion_tokens,
            cached_tokens=pb.CachedTokens(gpu=cached.gpu, cpu=cached.cpu, redis=cached.redis),
        )
        timings = pb.Timings(ttft_s=(first or now) - arrived, total_s=now - arrived)
        return pb.Final(finish_reason=FINISH_REASONS[output.finish_reason.value], usage=usage, timings=timings,
                        worker_id=self.worker_id, request_id=request_id, seed=output.seed)

    @map_errors
    async def Abort(self, request: pb.AbortRequest, context: grpc.aio.ServicerContext) -> pb.AbortResponse:
        found = self.engine.is_running(request.request_id)
        self.engine.abort(request.request_id)
        return pb.AbortResponse(aborted=found)

    @map_errors
    async def Tokenize(self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext):
        tokenizer = self.engine.engine.tokenizer
        if tokenizer is None:
            raise InvalidRequestError("text", "this model has no tokenizer")
        encode = functools.partial(tokenizer.encode, request.text)
        return pb.TokenizeResponse(token_ids=await in_a_thread_if_long(len(request.text), encode))

    @map_errors
    async def GetClusterInfo(self, request, context) -> pb.ClusterInfo:
        engine = self.engine.engine
        worker = pb.WorkerInfo(worker_id=self.worker_id, healthy=True, load=self.engine.load(),
                               tensor_parallel_size=engine.config.tensor_parallel_size)
        return pb.ClusterInfo(
            model=self.model_name, fingerprint=engine.fingerprint, max_model_len=engine.limits.max_model_len,
            block_size=engine.cache_shape.block_size, vocab_size=engine.model_config.vocab_size, workers=[worker],
            ready=True,
        )

    @map_errors
    async def GetStats(self, request, context) -> pb.Stats:
        engine = self.engine.engine
        counters = {key: float(value) for key, value in asdict(engine.stats).items()}
        counters.update(running=float(len(engine.scheduler.running)), waiting=float(len(engine.scheduler.waiting)))
        counters.update(_measured_rates(engine))
        tiers = {tier: {k: float(v) for k, v in values.items()} for tier, values in engine.kv_store_stats().items()}
        for tier, gauges in engine.tier_usage().items():
            tiers[tier].update(gauges)
        redis_health = await asyncio.to_thread(engine.redis_health)  # a blocking probe, off the event loop
        if redis_health is not None:
            tiers["redis"].update(redis_health.as_gauges())
        tier_stats = {tier: pb.TierStats(counters=values) for tier, values in tiers.items()}
        return pb.Stats(workers={self.worker_id: pb.WorkerStats(engine=counters, tiers=tier_stats)})

    @map_errors
    async def FlushCache(self, request: pb.FlushCacheRequest, context) -> pb.FlushCacheResponse:
        dropped = await self.engine.flush_cache(salts=salts_of(request), redis=not request.local_tiers_only)
        flushed = pb.FlushedBlocks(gpu_blocks=dropped["gpu"], cpu_blocks=dropped["cpu"])
        response = pb.FlushCacheResponse(workers={self.worker_id: flushed}, redis_keys=dropped["redis"] or 0)
        if dropped["redis"] is None:
            response.redis_error = f"Redis did not answer worker {self.worker_id}'s flush"
        return response

    async def WatchKVEvents(self, request, context: grpc.aio.ServicerContext):
        queue = self.engine.subscribe_kv_events()
        try:
            while True:
                kind, payload = await queue.get()
                for batch in _event_batches(kind, payload):
                    yield batch
        finally:
            self.engine.unsubscribe_kv_events(queue)


def _delta(output: RequestOutput) -> pb.Delta:
    return pb.Delta(token_ids=output.new_token_ids, text=output.new_text, logprobs=_token_logprobs(output.logprobs))


def _prompt_logprobs_pieces(output: RequestOutput) -> Iterator[pb.PromptLogprobs]:
    scores = output.prompt_logprobs
    for start in range(0, len(scores), PROMPT_LOGPROBS_PER_MESSAGE):
        piece = scores[start : start + PROMPT_LOGPROBS_PER_MESSAGE]
        yield pb.PromptLogprobs(start=1 + start, logprobs=_token_logprobs(piece))


def _token_logprobs(found: Iterable[TokenLogprobs]) -> list[pb.TokenLogprobs]:
    return [pb.TokenLogprobs(token_id=one.token_id, logprob=one.logprob,
                             top=[pb.TopLogprob(token_id=token, logprob=value) for token, value in one.top])
            for one in found]


def _measured_rates(engine) -> dict[str, float]:
    """What this worker has measured, for the router's cost model (absent until measured)."""
    shape = engine.cache_shape
    rates = {"kv_bytes_per_token": float(shape.bytes_per_block * engine.parallel.world_size // shape.block_size)}
    prefill = engine.cost_model.prefill_tokens_per_s.value
    if prefill:
        rates["prefill_tokens_per_s"] = prefill
    for tier in ("cpu", "redis"):
        rate = engine.kv_stats[tier].load_bytes_per_s
        if rate:
            rates[f"{tier}_load_bytes_per_s"] = rate
    return rates


def _event_batches(kind: str, payload) -> Iterator[pb.KVEventBatch]:
    """A snapshot as one message or several (``KVEventBatch.snapshot_continues``); changes as one message (the
    engine's event log turns into a snapshot past 65,536 hashes, so that stays under 2.3 MB)."""
    if kind != "snapshot":
        events = [pb.KVEvent(tier=e.tier, stored=e.stored, block_hashes=e.block_hashes) for e in payload]
        yield pb.KVEventBatch(snapshot=False, events=events)
        return
    parts = _snapshot_parts(payload)
    for index, events in enumerate(parts):
        yield pb.KVEventBatch(snapshot=index == 0, snapshot_continues=index < len(parts) - 1, events=events)


def _snapshot_parts(snapshot: dict[str, list[bytes]]) -> list[list[pb.KVEvent]]:
    """The snapshot's tiers and hashes cut into messages of at most ``_HASHES_PER_MESSAGE`` hashes (at least
    one message), each naming a tier at most once."""
    parts, part, room = [], [], _HASHES_PER_MESSAGE
    for tier, hashes in snapshot.items():
        start = 0
        while start < len(hashes):
            piece = hashes[start : start + room]
            part.append(pb.KVEvent(tier=tier, stored=True, block_hashes=piece))
            start, room = start + len(piece), room - len(piece)
            if room == 0:
                parts.append(part)
                part, room = [], _HASHES_PER_MESSAGE
    if part or not parts:
        parts.append(part)
    return parts


async def start_worker_server(engine: AsyncEngine, worker_id: str, model_name: str, host: str = "127.0.0.1",
                              max_message_bytes: int = 64 * 2**20) -> tuple[grpc.aio.Server, str]:
    options = [("grpc.max_receive_message_length", max_message_bytes),
               ("grpc.max_send_message_length", max_message_bytes)]
    server = grpc.aio.server(options=options)
    servicer = WorkerServicer(engine, worker_id, model_name)
    pb_grpc.add_GenerationServicer_to_server(servicer, server)
    pb_grpc.add_WorkerControlServicer_to_server(servicer, server)
    port = server.add_insecure_port(f"{host}:0")
    await server.start()
    return server, f"{host}:{port}"
