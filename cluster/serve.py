"""Starting a kvtier cluster on Ray: one placement group and actor per worker, then the router actor.

``start_cluster`` joins ``ray.address`` (or starts a local Ray), places the workers, starts the router and
returns when it serves. ``run_serve`` is ``kvtier serve``: start, print the endpoint, wait for SIGINT/SIGTERM.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from cluster.config import ConfigError, KvtierConfig, RayConfig

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
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

    from cluster.router_actor import RouterActor
    from cluster.worker_actor import WorkerActor

    check_files(config)
    if not ray.is_initialized():
        join_ray(config)
    config_json = json.dumps(asdict(config))
    worker_cls = ray.remote(WorkerActor)
    workers, groups = {}, []
    rank = rank_resources(config)
    for index in range(config.workers.count):
        group = placement_group([rank] * config.engine.tensor_parallel_size, strategy="STRICT_PACK")
        groups.append(group)
        ray.get(group.ready(), timeout=timeout_s)
        worker_id = f"worker-{index}"
        workers[worker_id] = worker_cls.options(  # rank 0, in bundle 0; it launches the other ranks
            name=worker_actor_name(worker_id), max_restarts=config.workers.max_restarts, max_task_retries=0,
            num_cpus=rank.get("CPU", 0), num_gpus=rank.get("GPU", 0), max_concurrency=1000,
            scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=group, placement_group_bundle_index=0),
        ).remote(worker_id, config_json)
    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    router = ray.remote(RouterActor).options(  # on this node, so the endpoint is where `kvtier serve` runs
        name="kvtier-router", max_restarts=-1, num_cpus=0, max_concurrency=1000, scheduling_strategy=here,
    ).remote(config_json, {worker_id: worker_actor_name(worker_id) for worker_id in workers})
    address = ray.get(router.start.remote(), timeout=timeout_s)
    return Cluster(address, router, workers, groups)


def worker_actor_name(worker_id: str) -> str:
    return f"kvtier-{worker_id}"


def rank_resources(config: KvtierConfig) -> dict[str, float]:
    """One bundle per tensor-parallel rank: the worker's CPUs and GPUs split evenly (one GPU each on GPU nodes)."""
    tp = config.engine.tensor_parallel_size
    bundle = {"CPU": config.workers.num_cpus / tp, "GPU": config.workers.num_gpus / tp}
    return {resource: amount for resource, amount in bundle.items() if amount} or {"CPU": 0.01}


def check_files(config: KvtierConfig) -> None:
    """Fail at once, naming the key, when a file the router or the Redis tier will read is missing or bad."""
    from router.tenancy import TokensFileError, load_token_table

    router, redis = config.router, config.kvstore.redis
    files = {"router.tls.cert_file": router.tls.cert_file, "router.tls.key_file": router.tls.key_file,
             "router.tls.client_ca_file": router.tls.client_ca_file, "router.auth.tokens_file": router.auth.tokens_file,
             "kvstore.redis.password_file": redis.password_file, "kvstore.redis.ca_file": redis.ca_file,
             "ray.auth_token_file": config.ray.auth_token_file}
    for key, path in files.items():
        if path is not None and not os.access(path, os.R_OK):
            raise ConfigError(f"{key}: {path} is not a readable file")
    if router.auth.tokens_file is not None:
        try:
            load_token_table(router.auth.tokens_file)
        except TokensFileError as error:
            raise ConfigError(f"router.auth.tokens_file: {error}") from None


def join_ray(config: KvtierConfig) -> None:
    """Join ``ray.address`` (waiting up to ``ray.connect_timeout_s`` for its head to come up) or start Ray, with
    Ray's token auth as ``ray.auth`` says (Ray reads its auth settings from the environment, so they go there).
    A host:port where nothing listens yet is waited for here: one ``ray.init`` there takes minutes to give up."""
    from ray.exceptions import AuthenticationError

    _apply_ray_auth(config.ray)
    address, deadline = config.ray.address, time.monotonic() + config.ray.connect_timeout_s
    while True:
        listening = _listens(address)
        if listening is False:
            _wait_or_give_up(address, "nothing listens there", deadline)
            continue
        if listening:
            _refuse_a_wrong_token(config.ray)
        try:
            _ray_init_holding_interrupts(address=address, namespace=config.ray.namespace, include_dashboard=False,
                                         log_to_driver=True)
            return
        except AuthenticationError as error:
            raise ConfigError(f"ray.auth_token_file: {error}") from None
        except ConnectionError as error:
            if address is None:
                raise ConfigError(f"ray: cannot start a local Ray: {error}") from None
            hint = " (is ray.auth_token_file the cluster's token?)" if config.ray.auth == "token" else ""
            _wait_or_give_up(address, f"{error}{hint}", deadline)


def _ray_init_holding_interrupts(**options) -> None:
    """``ray.init(**options)``, with a Ctrl-C that comes meanwhile held until it returns (then raised): Ray's
    driver interrupted halfway through connecting crashes the process on its way out (SIGSEGV). A second Ctrl-C
    goes through at once. Held only in the main thread, where Python runs signal handlers."""
    import ray

    if threading.current_thread() is not threading.main_thread():
        ray.init(**options)
        return
    interrupted = False
    previous = signal.getsignal(signal.SIGINT)

    def hold(signum, frame) -> None:
        nonlocal interrupted
        interrupted = True
        signal.signal(signal.SIGINT, previous)
        print("kvtier: interrupted; stopping once Ray has started (Ctrl-C again to stop now)", file=sys.stderr,
              flush=True)

    signal.signal(signal.SIGINT, hold)
    try:
        ray.init(**options)
    finally:
        if signal.getsignal(signal.SIGINT) is hold:
            signal.signal(signal.SIGINT, previous)
    if interrupted:
        raise KeyboardInterrupt


def _wait_or_give_up(address: str, reason: str, deadline: float) -> None:
    if time.monotonic() > deadline:
        raise ConfigError(f"ray.address: cannot join {address!r} within ray.connect_timeout_s: {reason}")
    log.info("waiting for the Ray cluster at %s: %s", address, reason)
    time.sleep(1)


def _listens(address: str | None, timeout_s: float = 2.0) -> bool | None:
    """Whether something accepts TCP at ``address``; None where it is not host:port ("auto", "ray://...")."""
    host, _, port = (address or "").rpartition(":")
    if not host or not port.isdigit() or "/" in host:
        return None
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return True
    except OSError:
        return False


def _refuse_a_wrong_token(ray_config: RayConfig) -> None:
    """Fail at once where the head at ``ray.address``, which listens, refuses the token: ``ray.init`` tries a
    refused token for 20 s and then says only that it could not connect. Ray's GCS client (Ray internals:
    ``ray._raylet``) says it in a round trip (asked where nothing listens, it waits some 40 s). Only with a
    token at hand: without one, ``ray.init`` says so at once."""
    from ray._raylet import AuthenticationTokenLoader, GcsClient
    from ray.exceptions import AuthenticationError, RayError

    address = ray_config.address
    if ray_config.auth != "token" or not AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True):
        return
    try:
        GcsClient(address=address)
    except AuthenticationError as error:
        raise ConfigError(f"ray.auth_token_file: the Ray cluster at {address!r} refused the token: {error}") from None
    except RayError as error:  # (not a refusal: ``ray.init`` tries, and says what is wrong)
        log.info("Ray's GCS at %s did not answer the token check: %s", address, error)


def _apply_ray_auth(ray_config: RayConfig) -> None:
    """Ray reads its auth mode and token from the environment, and caches both when it is imported: set them,
    then have Ray read them again (what Ray's own ``ray.init`` does when it turns token auth on)."""
    from ray._raylet import AuthenticationTokenLoader, Config

    os.environ.update(ray_auth_environment(ray_config))
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def ray_auth_environment(ray_config: RayConfig) -> dict[str, str]:
    """RAY_AUTH_MODE (and RAY_AUTH_TOKEN, read from ``ray.auth_token_file`` without its trailing newline, which
    Ray would take as part of the token) for ``ray.init``: token auth stays on unless turned off."""
    environment = {"RAY_AUTH_MODE": ray_config.auth}
    if ray_config.auth_token_file is not None:
        environment["RAY_AUTH_TOKEN"] = Path(ray_config.auth_token_file).read_text().strip()
    return environment


def stop_cluster(cluster: Cluster) -> None:
    """Kill the actors and give their placement groups' resources back to Ray."""
    import ray
    from ray.util.placement_group import remove_placement_group

    for handle in [cluster.router, *cluster.workers.values()]:
        ray.kill(handle, no_restart=True)
    for group in cluster.placement_groups:
        remove_placement_group(group)


def run_serve(config: KvtierConfig) -> int:
    """Serve until SIGINT or SIGTERM, then drain (open streams finish, up to router.drain_timeout_s) and exit 0.
    A failure to start raises (a non-zero exit)."""
    import ray

    cluster = start_cluster(config)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs handlers of its own
        signal.signal(signum, lambda *_: stop.set())
    print(f"kvtier: serving {config.engine.model} on {cluster.address} with {len(cluster.workers)} workers "
          f"(policy {config.router.policy})", flush=True)
    stop.wait()
    log.info("draining: open streams finish, new requests are refused")
    still_open = ray.get(cluster.router.drain.remote(), timeout=config.router.drain_timeout_s + 30)
    log.info("stopping (%d streams cut at the drain deadline)", still_open)
    stop_cluster(cluster)
    return 0
