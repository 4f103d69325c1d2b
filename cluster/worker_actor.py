"""The Ray actor that hosts one worker: its engine and its gRPC endpoint (``cluster.worker_server``).

Ray places it (one STRICT_PACK placement group per worker, a bundle per tensor-parallel rank; this actor is rank
0 and launches the others as ``cluster.rank_actor`` actors) and restarts it when its process dies; a restarted
actor loads the model again when the router's supervisor asks where it listens (``ensure_started``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os

from cluster.config import KvtierConfig, from_dict


class WorkerActor:
    def __init__(self, worker_id: str, config_json: str) -> None:
        logging.basicConfig(level=logging.INFO, format=f"kvtier {worker_id}: %(message)s")
        self.worker_id = worker_id
        self.config: KvtierConfig = from_dict(KvtierConfig, json.loads(config_json))
        self._address: str | None = None
        self._server = None
        self._starting = asyncio.Lock()

    async def ensure_started(self) -> str:
        """Load the engine and open the gRPC endpoint, once per process; returns host:port."""
        async with self._starting:
            if self._address is None:
                await self._start()
        return self._address

    async def _start(self) -> None:
        from cluster.worker_server import start_worker_server
        from workers.async_engine import AsyncEngine
        from workers.engine import LLMEngine

        config = self.config
        engine = await asyncio.to_thread(LLMEngine.from_config, config.engine, config.kvstore, False,
                                         launch_ranks=self._rank_launcher())
        self._engine = AsyncEngine(engine, on_fatal=self._exit_for_restart)
        self._server, self._address = await start_worker_server(self._engine, self.worker_id, config.engine.model,
                                                                host=self._host())

    def _rank_launcher(self):
        """Tensor-parallel ranks 1..N-1 as Ray actors in this worker's placement group (None at tp=1)."""
        if self.config.engine.tensor_parallel_size == 1:
            return None
        import ray

        from cluster.rank_actor import ray_rank_launcher
        from cluster.serve import rank_resources

        rank = rank_resources(self.config)
        return ray_rank_launcher(ray.util.get_current_placement_group(), rank.get("CPU", 0), rank.get("GPU", 0))

    def rank_info(self) -> list[dict]:
        """Where ranks 1..N-1 run: pid, node and placement group of each."""
        group = self._engine.engine.tp_group
        return group.ranks.describe() if group is not None else []

    def _host(self) -> str:
        """Where the endpoint listens: the configured address, or this Ray node's (multi-node clusters)."""
        if self.config.workers.host != "node_ip":
            return self.config.workers.host
        import ray

        return ray.util.get_node_ip_address()

    def _exit_for_restart(self, error: Exception) -> None:
        """A broken engine (a dead tensor-parallel rank, ...) is restarted as a unit: leave, Ray starts us again.
        The short delay lets the failed streams' statuses reach the router first."""
        logging.getLogger(__name__).error("engine failed (%s); exiting so that Ray restarts this worker", error)
        asyncio.get_running_loop().call_later(0.5, os._exit, 1)

    def hold_steps_for_test(self, seconds: float) -> None:
        """Test hook: stall this worker's step loop for ``seconds``."""
        self._engine.hold_steps_for_test(seconds)

    def fail_next_step_for_test(self, message: str, rank_died: bool) -> None:
        """Test hook: this worker's next engine step fails, as if a tensor-parallel rank died or with an error
        of no known cause (then it exits, and Ray restarts it)."""
        from workers.parallel import TensorParallelError

        self._engine.fail_next_step_for_test(TensorParallelError(message) if rank_died else RuntimeError(message))

    def pid(self) -> int:
        return os.getpid()
