"""Starting a kvtier cluster on Ray: one placement group and actor per worker, then the router actor.

``start_cluster`` joins ``ray.address`` (or starts a local Ray), places the workers, starts the router and
returns when it serves. ``run_serve`` is ``kvtier serve``: start, print the endpoint, wait for SIGINT/SIGTERM.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
from dataclasses import asdict, dataclass

from cluster.config import KvtierConfig

log = logging.getLogger("kvtier")


@dataclass
class Cluster:
    address: str
    router: object  # ray ActorHandle
    workers: dict  # worker id -> ray ActorHandle
    placement_groups: list  # one per worker, removed with the cluster


def start_cluster(config: KvtierConfig, timeout_s: float = 600) -> Cluster:
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from cluster.router_actor import RouterActor
    from cluster.worker_actor import WorkerActor

    if not ray.is_initialized():
        ray.init(address=config.ray.address, namespace=config.ray.namespace, include_dashboard=False,
                 log_to_driver=True)
    config_json = json.dumps(asdict(config))
    worker_cls = ray.remote(WorkerActor)
    workers, groups = {}, []
    for index in range(config.workers.count):
        group = placement_group([{"CPU": config.workers.num_cpus}], strategy="STRICT_PACK")
        groups.append(group)
        ray.get(group.ready(), timeout=timeout_s)
        worker_id = f"worker-{index}"
        workers[worker_id] = worker_cls.options(
            name=f"kvtier-{worker_id}", max_restarts=config.workers.max_restarts, max_task_retries=0,
            num_cpus=config.workers.num_cpus, max_concurrency=1000,
            scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=group),
        ).remote(worker_id, config_json)
    router = ray.remote(RouterActor).options(
        name="kvtier-router", max_restarts=-1, num_cpus=0, max_concurrency=1000,
    ).remote(config_json, workers)
    address = ray.get(router.start.remote(), timeout=timeout_s)
    return Cluster(address, router, workers, groups)


def stop_cluster(cluster: Cluster) -> None:
    """Kill the actors and give their placement groups' resources back to Ray."""
    import ray
    from ray.util.placement_group import remove_placement_group

    for handle in [cluster.router, *cluster.workers.values()]:
        ray.kill(handle, no_restart=True)
    for group in cluster.placement_groups:
        remove_placement_group(group)


def run_serve(config: KvtierConfig) -> int:
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    cluster = start_cluster(config)
    print(f"kvtier: serving {config.engine.model} on {cluster.address} with {len(cluster.workers)} workers "
          f"(policy {config.router.policy})", flush=True)
    stop.wait()
    log.info("stopping")
    stop_cluster(cluster)
    return 0
