"""The Ray actor that hosts the router: its gRPC endpoint, health and reflection, and the worker supervisor.

On ``start`` it asks every worker (through Ray) where it listens, connects, and waits until each worker's KV
snapshot is indexed before it reports ready: a restarted router routes from a rebuilt index, never a cold
one. The supervisor then reconnects any worker that becomes unhealthy once Ray has restarted it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from cluster.config import KvtierConfig, TlsConfig, from_dict
from protos.kvtier.v1 import generation_pb2 as pb
from protos.kvtier.v1 import generation_pb2_grpc as pb_grpc
from router.auth import BearerTokenAuth
from router.metrics import RouterMetrics
from router.progress import ProgressWatch
from router.policies import CacheAware, CostRates, make_policy, measured_rates
from router.prefix_index import PrefixIndex
from router.servicer import ModelFacts, RouterServicer
from router.tenancy import load_token_table
from router.worker_pool import WorkerPool
from workers.validation import RequestLimits

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Generation"].full_name
_RECONNECT_EVERY_S = 0.5
_STATS_EVERY_S = 2.0


class RouterActor:
    def __init__(self, config_json: str, worker_actor_names: dict[str, str]) -> None:
        """``worker_actor_names``: worker id -> its named Ray actor. Names, not handles: Ray keeps actor handles
        among a restartable actor's constructor arguments in the object store, owned by the driver, and warns."""
        import ray

        logging.basicConfig(level=logging.INFO, format="kvtier router: %(message)s")
        self.config: KvtierConfig = from_dict(KvtierConfig, json.loads(config_json))
        self.handles = {worker_id: ray.get_actor(name) for worker_id, name in worker_actor_names.items()}
        self.address: str | None = None
        self._starting = asyncio.Lock()
        ray.get_runtime_context().current_actor.start.remote()  # also after Ray restarts this actor

    async def start(self) -> str:
        """Connect every worker, index their caches, then open the endpoint; returns host:port."""
        async with self._starting:
            if self.address is None:
                await self._start()
        return self.address

    async def _start(self) -> None:
        self.pool = WorkerPool(list(self.handles), PrefixIndex())
        await asyncio.gather(*(self._connect(worker_id) for worker_id in self.handles))
        facts, tokenizer = await self._model_facts()
        router = self.config.router
        self.configured_rates = CostRates(prefill_tokens_per_s=router.prefill_tokens_per_s,
                                          seconds_per_queued_request=router.seconds_per_queued_request)
        policy = make_policy(router.policy, self.pool.index, self.configured_rates)
        self.metrics = RouterMetrics(router.policy)
        self.servicer = RouterServicer(self.pool, policy, router.policy, facts, tokenizer, router.max_in_flight,
                                       self.metrics, min_priority=router.min_priority)
        self.address = await self._serve(facts)
        if router.metrics_port is not None:
            start_http_server(router.metrics_port, addr=router.host, registry=self.metrics.registry)
        self._supervisor = asyncio.get_running_loop().create_task(self._supervise())
        self.progress = ProgressWatch(router.stall_timeout_s)
        self._stats_task = asyncio.get_running_loop().create_task(self._poll_worker_stats(policy))

    async def _serve(self, facts: ModelFacts) -> str:
        max_bytes = 64 * 1024 + facts.limits.max_model_len * 16  # the largest valid request, with room
        options = [("grpc.max_receive_message_length", max_bytes)]
        router = self.config.router
        interceptors = []
        if router.auth.tokens_file is not None:
            rejected = self.metrics.requests.labels("rejected")
            interceptors.append(BearerTokenAuth(load_token_table(router.auth.tokens_file), on_refused=rejected.inc))
        self.server = grpc.aio.server(options=options, interceptors=interceptors)
        pb_grpc.add_GenerationServicer_to_server(self.servicer, self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        endpoint = f"{router.host}:{router.port}"
        if router.tls.enabled:
            port = self.server.add_secure_port(endpoint, server_credentials(router.tls))
        else:
            port = self.server.add_insecure_port(endpoint)
        await self.server.start()
        if router.health_port is not None:
            await self._serve_health_only(router.host, router.health_port)
        for service in ("", SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving on %s:%d (TLS %s, auth %s)", router.host, port, "on" if router.tls.enabled else "off",
                 "on" if interceptors else "off")
        return f"{router.host}:{port}"

    async def _serve_health_only(self, host: str, port: int) -> None:
        """The same health state on a plaintext port of its own, for probes that speak neither TLS nor tokens."""
        self.health_server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.health_server)
        self.health_server.add_insecure_port(f"{host}:{port}")
        await self.health_server.start()

    async def _connect(self, worker_id: str) -> None:
        address = await self.handles[worker_id].ensure_started.remote()
        await self.pool.connect(worker_id, address)

    async def _model_facts(self) -> tuple[ModelFacts, object]:
        from workers.presets import resolve_model_dir
        from workers.tokenizer import load_tokenizer

        worker = next(iter(self.pool.workers.values()))
        info = await worker.stub.GetClusterInfo(pb.GetClusterInfoRequest())
        tokenizer = load_tokenizer(resolve_model_dir(self.config.engine.model))
        limits = RequestLimits(vocab_size=info.vocab_size, max_model_len=info.max_model_len,
                               kv_capacity_tokens=2**62, has_tokenizer=tokenizer is not None)
        facts = ModelFacts(info.model, info.fingerprint, info.block_size, limits, info.workers[0].tensor_parallel_size)
        return facts, tokenizer

    async def _supervise(self) -> None:
        """Reconnect workers Ray restarted; readiness says whether any worker can take a request."""
        while True:
            await asyncio.sleep(_RECONNECT_EVERY_S)
            await self._set_readiness()
            for worker_id, worker in self.pool.workers.items():
                if not worker.healthy:
                    try:
                        await asyncio.wait_for(self._connect(worker_id), timeout=120)
                    except Exception as error:  # noqa: BLE001 - logged; the next round tries again
                        log.warning("worker %s not back yet: %s", worker_id, error)

    async def _poll_worker_stats(self, policy) -> None:
        """Every few seconds: the workers' counters for the metrics, their progress for readiness, and their
        measured rates for the cost model (not a per-request poll)."""
        while True:
            await asyncio.sleep(_STATS_EVERY_S)
            stats = await self.servicer.worker_stats(timeout_s=_STATS_EVERY_S)
            self.metrics.workers.update(stats)
            self._check_progress(stats)
            self.pool.move_streams_off_stalled()
            if isinstance(policy, CacheAware):
                policy.rates = measured_rates(self.configured_rates, [dict(w.engine) for w in stats.workers.values()])

    def _check_progress(self, stats) -> None:
        """Each worker's reading (or its silence) says whether it is stalled."""
        for worker in self.pool.workers.values():
            if worker.worker_id in stats.workers:
                self._check_steps(worker, stats.workers[worker.worker_id].engine)
            elif worker.healthy:  # connected, but it did not answer within the interval
                silent = self.progress.no_answer(worker.worker_id, time.monotonic())
                self.pool.set_stalled(worker.worker_id, silent, "stalled: answers no stats reading")
            else:
                self.progress.forget(worker.worker_id)

    def _check_steps(self, worker, engine: dict) -> None:
        stalled = self.progress.observe(worker.worker_id, engine.get("steps", 0.0),
                                        engine.get("running", 0.0) + engine.get("waiting", 0.0), time.monotonic())
        self.pool.set_stalled(worker.worker_id, stalled, "stalled: no engine step while requests wait")

    async def _set_readiness(self) -> None:
        """Ready: not draining, and some worker is connected and making progress."""
        serving = not self.servicer.draining and any(w.healthy and not w.stalled for w in self.pool.workers.values())
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        await self.health.set(SERVICE_NAME, status)

    async def drain(self) -> int:
        """Readiness off, new requests refused (UNAVAILABLE), open streams finish (up to router.drain_timeout_s);
        returns how many were still open at the deadline."""
        self.servicer.draining = True
        await self._set_readiness()
        deadline = time.monotonic() + self.config.router.drain_timeout_s
        while self.servicer.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        log.info("drained; %d streams still open", self.servicer.in_flight)
        return self.servicer.in_flight

    def pid(self) -> int:
        return os.getpid()


def server_credentials(tls: TlsConfig) -> grpc.ServerCredentials:
    """TLS (mutual when ``client_ca_file`` is set) from PEM files, read once at start."""
    key, cert = Path(tls.key_file).read_bytes(), Path(tls.cert_file).read_bytes()
    client_ca = Path(tls.client_ca_file).read_bytes() if tls.client_ca_file else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca,
                                       require_client_auth=client_ca is not None)
