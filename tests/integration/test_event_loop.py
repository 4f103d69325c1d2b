"""A long prompt is tokenized, checked and hashed off the event loop, in the router and in a worker: the loop
that streams every other request's tokens does not stop while it is (a 1.5 MB text takes about a second)."""

from __future__ import annotations

import asyncio
import time

import pytest

from protos.kvtier.v1 import generation_pb2 as pb
from router.errors import NoHealthyWorker
from router.prefix_index import PrefixIndex
from router.servicer import ModelFacts, RouterServicer
from router.worker_pool import WorkerPool
from workers.async_engine import AsyncEngine
from workers.engine import LLMEngine
from workers.engine_config import CacheConfig, EngineConfig
from workers.presets import resolve_model_dir
from workers.sampling_params import SamplingParams
from workers.tokenizer import load_tokenizer
from workers.validation import InvalidRequestError, RequestLimits

LONG_TEXT = "kvtier keeps the event loop free. " * 45_000  # 1.5 MB; one token per byte in the tiny tokenizer


async def longest_pause_during(work) -> tuple[float, float]:
    """(seconds ``work`` took, the longest the event loop went without running a 1-ms ticker meanwhile)."""
    pauses, done = [], asyncio.Event()

    async def ticker() -> None:
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            pauses.append(now - last)
            last = now

    ticking = asyncio.get_running_loop().create_task(ticker())
    await asyncio.sleep(0.02)
    began = time.perf_counter()
    try:
        await work()
    finally:
        took = time.perf_counter() - began
        done.set()
        await ticking
    return took, max(pauses)


def test_the_router_tokenizes_checks_and_hashes_a_long_prompt_off_the_event_loop():
    tokenizer = load_tokenizer(resolve_model_dir("tiny"))
    limits = RequestLimits(vocab_size=259, max_model_len=2_000_000, kv_capacity_tokens=2_000_000, has_tokenizer=True)
    servicer = RouterServicer(WorkerPool([], PrefixIndex()), None, "cache_aware",
                              ModelFacts("tiny", "f" * 16, 16, limits), tokenizer, max_in_flight=8)
    request = pb.GenerateRequest(text=LONG_TEXT, max_tokens=4)
    result = {}

    async def validate_and_hash() -> None:
        result["validated"] = await servicer.validated(request)
        with pytest.raises(NoHealthyWorker):  # hashed first, then no worker to take it
            await servicer._choose(result["validated"][0], None, 0)

    took, pause = asyncio.run(longest_pause_during(validate_and_hash))
    assert result["validated"][0] == tokenizer.encode(LONG_TEXT)
    assert took > 0.2 and pause < took / 4, (took, pause)


def test_a_worker_tokenizes_and_checks_a_long_prompt_off_the_event_loop():
    engine = AsyncEngine(LLMEngine.from_config(EngineConfig(model="tiny", cache=CacheConfig(num_blocks=64)),
                                               progress=False))

    async def generate() -> None:
        with pytest.raises(InvalidRequestError, match="max_model_len"):  # tokenized and checked, then refused
            async for _ in engine.generate("long", LONG_TEXT, SamplingParams(max_tokens=4)):
                pass

    took, pause = asyncio.run(longest_pause_during(generate))
    assert took > 0.2 and pause < took / 4, (took, pause)
