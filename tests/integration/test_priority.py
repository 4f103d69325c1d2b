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
            return finished, tokens, engine.engine.stats.preemptions
        finally:
            await server.stop(0)
            engine.engine.close()

    finished, tokens, preemptions = asyncio.run(main())
    assert finished == ["urgent", "background", "normal"]  # background resumed before normal: it came first
    assert preemptions == 1
    assert tokens == expected
