"""Request priority over real gRPC, from a client to a worker's servicer and its engine: a more urgent request
takes the only running slot from a less urgent one, which is recomputed later with the same tokens."""

from __future__ import annotations

import asyncio

import grpc

from cluster.client import build_request
from cluster.worker_server import start_worker_server
from protos.kvtier.v1 import generation_pb2_grpc as pb_grpc
from workers.async_engine import AsyncEngine
from workers.engine import LLMEngine
from workers.engine_config import EngineConfig, SchedulerConfig
from workers.sampling_params import SamplingParams


def prompt(seed: int, length: int) -> list[int]:
    return [(seed * 7919 + i * 104729) % 250 + 3 for i in range(length)]


REQUESTS = {  # name: (prompt, max_tokens, priority)
    "background": (prompt(1, 40), 48, 5),
    "normal": (prompt(2, 30), 8, 5),
    "urgent": (prompt(3, 20), 8, -1),
}


def test_an_urgent_request_preempts_a_running_less_urgent_one_and_every_stream_is_exact():
    config = EngineConfig(model="tiny", scheduler=SchedulerConfig(max_num_seqs=1))
    offline = LLMEngine.from_config(EngineConfig(model="tiny"), progress=False)
    expected = {name: offline.generate([ids], SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))[0]
                .token_ids for name, (ids, n, _) in REQUESTS.items()}

    async def main():
        engine = AsyncEngine(LLMEngine.from_config(config, progress=False))
        server, address = await start_worker_server(engine, "w0", "tiny")
        finished: list[str] = []
        tokens: dict[str, list[int]] = {name: [] for name in REQUESTS}
        first_token = {name: asyncio.Event() for name in REQUESTS}

        async def stream(stub, name: str) -> None:
            ids, max_tokens, priority = REQUESTS[name]
            request = build_request(ids, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
                                    request_id=name, priority=priority)
            async for response in stub.Generate(request, timeout=120):
                if response.HasField("delta"):
                    tokens[name] += response.delta.token_ids
                    first_token[name].set()
            finished.append(name)

        try:
            async with grpc.aio.insecure_channel(address) as channel:
                stub = pb_grpc.GenerationStub(channel)
                background = asyncio.create_task(stream(stub, "background"))
                await asyncio.wait_for(first_token["background"].wait(), 60)
                engine.hold_steps_for_test(60.0)  # both arrive while the engine waits between two steps
                others = [asyncio.create_task(stream(stub, name)) for name in ("normal", "urgent")]
                while engine.load() < 3:
                    await asyncio.sleep(0.01)
                engine.hold_steps_for_test(0.0)
                await asyncio.wait_for(asyncio.gather(background, *others), 120)
            stats = engine.engine.stats
            return finished, tokens, (stats.preemptions, stats.priority_preemptions)
        finally:
            await server.stop(0)
            engine.engine.close()

    finished, tokens, preemptions = asyncio.run(main())
    assert finished == ["urgent", "background", "normal"]  # background resumed before normal: it came first
    assert preemptions == (1, 1)
    assert tokens == expected


def test_the_router_refuses_a_priority_more_urgent_than_its_floor_and_serves_the_rest():
    from router.policies import make_policy
    from router.prefix_index import PrefixIndex
    from router.servicer import ModelFacts, RouterServicer
    from router.worker_pool import WorkerPool
    from workers.validation import RequestLimits

    offline = LLMEngine.from_config(EngineConfig(model="tiny"), progress=False)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    expected = offline.generate([prompt(4, 12)], params)[0].token_ids

    async def main():
        engine = AsyncEngine(LLMEngine.from_config(EngineConfig(model="tiny"), progress=False))
        worker, worker_address = await start_worker_server(engine, "w0", "tiny")
        pool = WorkerPool(["w0"], PrefixIndex())
        await asyncio.wait_for(pool.connect("w0", worker_address), 20)
        limits = RequestLimits(vocab_size=259, max_model_len=4096, kv_capacity_tokens=2**40, has_tokenizer=True)
        servicer = RouterServicer(pool, make_policy("cache_aware", pool.index), "cache_aware",
                                  ModelFacts("tiny", "f" * 16, 16, limits), None, 8, min_priority=0)
        router = grpc.aio.server()
        pb_grpc.add_GenerationServicer_to_server(servicer, router)
        port = router.add_insecure_port("127.0.0.1:0")
        await router.start()
        outcomes = {}
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.GenerationStub(channel)
                for priority in (-1, 0, 2):
                    tokens = []
                    try:
                        async for response in stub.Generate(build_request(prompt(4, 12), params, priority=priority),
                                                            timeout=60):
                            tokens += response.delta.token_ids
                        outcomes[priority] = tokens
                    except grpc.aio.AioRpcError as error:
                        outcomes[priority] = (error.code(), error.details())
        finally:
            await router.stop(0)
            await pool.close()
            await worker.stop(0)
            engine.engine.close()
        return outcomes

    outcomes = asyncio.run(main())
    assert outcomes[-1] == (grpc.StatusCode.INVALID_ARGUMENT,
                            "priority: -1 is more urgent than this cluster allows (router.min_priority: 0)")
    assert outcomes[0] == outcomes[2] == expected
