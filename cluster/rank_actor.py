"""Tensor-parallel ranks 1..N-1 of a cluster worker as Ray actors, one per bundle of the worker's STRICT_PACK
placement group (one GPU each on GPU nodes), so Ray reserves a worker's GPUs together and on one node.

Rank 0 is the worker actor itself; it launches the others (``ray_rank_launcher``) when its engine starts. They
are owned by the worker actor, so when it dies Ray ends them too, and a restarted worker starts a new group:
the group is restarted as a unit. A rank whose actor dies (or whose ``run`` ends) is reported by ``ended``,
which rank 0 checks before every step.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict

from workers.engine_config import EngineConfig, engine_config_from_dict
from workers.tp_group import RankLauncher


class RankActor:
    """One rank: ``run`` loads its slice of the model and serves rank 0's steps until told to stop."""

    def run(self, config_json: str, rank: int, world_size: int, port: int) -> int:
        from workers.tp_worker import serve

        serve(engine_config_from_dict(json.loads(config_json)), rank, world_size, port)
        return 0

    def describe(self) -> dict:
        """Where this rank runs (answered while ``run`` blocks: the actor has a second thread)."""
        import ray

        context = ray.get_runtime_context()
        return {"pid": os.getpid(), "node_id": context.get_node_id(),
                "placement_group_id": context.get_placement_group_id()}


class RayRanks:
    """``workers.tp_group.RankProcesses`` over rank actors and their ``run`` calls."""

    def __init__(self, actors: list, runs: list, check_every_s: float = 0.2) -> None:
        self.actors = actors  # rank r is actors[r - 1]
        self.runs = runs
        self.check_every_s = check_every_s  # a Ray call per engine step would cost more than the step
        self._checked_at = float("-inf")

    def ended(self) -> str | None:
        import ray

        if time.monotonic() - self._checked_at < self.check_every_s:
            return None
        self._checked_at = time.monotonic()
        done, _ = ray.wait(self.runs, num_returns=len(self.runs), timeout=0)
        for ref in done:
            rank = self.runs.index(ref) + 1
            try:
                ray.get(ref)
            except ray.exceptions.RayError as error:
                return f"rank {rank} (Ray actor) failed: {type(error).__name__}: {str(error).splitlines()[0]}"
            return f"rank {rank} (Ray actor) stopped"
        return None

    def wait(self, timeout_s: float) -> bool:
        import ray

        done, _ = ray.wait(self.runs, num_returns=len(self.runs), timeout=timeout_s)
        return len(done) == len(self.runs)

    def kill(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor, no_restart=True)

    def describe(self) -> list[dict]:
        import ray

        return [{"rank": rank, **info} for rank, info in
                enumerate(ray.get([actor.describe.remote() for actor in self.actors], timeout=30), start=1)]


def ray_rank_launcher(placement_group, cpus_per_rank: float, gpus_per_rank: float) -> RankLauncher:
    """Launch rank r into bundle r of ``placement_group`` (bundle 0 holds rank 0, the worker actor)."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    def launch(world_size: int, port: int, config: EngineConfig) -> RayRanks:
        config_json = json.dumps(asdict(config))
        actors = [
            ray.remote(RankActor).options(
                num_cpus=cpus_per_rank, num_gpus=gpus_per_rank, max_restarts=0, max_concurrency=2,
                scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group, placement_group_bundle_index=r),
            ).remote()
            for r in range(1, world_size)
        ]
        runs = [actor.run.remote(config_json, r, world_size, port) for r, actor in enumerate(actors, start=1)]
        return RayRanks(actors, runs)

    return launch
