"""A cluster whose worker is tensor-parallel (tp=2): rank 1 is a Ray actor in the worker's STRICT_PACK placement
group; the worker serves, and when a rank dies it is restarted as a unit by Ray and serves again; no request
hangs."""

from __future__ import annotations

import os
import signal
import time

import grpc
import pytest

from cluster.client import KvtierClient, build_request
from kvstore.config import KVStoreConfig
from tests.local_cluster import local_cluster
from workers.engine import LLMEngine
from workers.engine_config import EngineConfig
from workers.sampling_params import SamplingParams

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def tp_cluster():
    overrides = {
        # a dead rank is usually seen at once (its sockets close); at worst a collective waits out this timeout
        "engine": {"tensor_parallel_size": 2, "cache": {"num_blocks": 256}, "collective_timeout_s": 10},
        "kvstore": {"prefix_caching": False},
        "workers": {"count": 1, "num_cpus": 0.5},
        "router": {"port": 0},
    }
    with local_cluster(overrides, "kvtier-tp-test") as handle:
        client = KvtierClient(handle.address)
        yield handle, client
        client.close()


def test_a_tp2_worker_serves_and_restarts_as_a_unit_when_a_rank_dies(tp_cluster):
    import ray

    handle, client = tp_cluster
    prompt = [(i * 7) % 250 + 3 for i in range(100)]
    offline = LLMEngine.from_config(EngineConfig(), KVStoreConfig(prefix_caching=False), progress=False)
    expected = offline.generate([prompt], GREEDY)[0].token_ids
    assert client.complete(prompt, GREEDY).token_ids == expected

    assert client.cluster_info().workers[0].tensor_parallel_size == 2
    (worker,) = handle.workers.values()
    (group,) = handle.placement_groups
    old_pid = ray.get(worker.pid.remote())
    (rank,) = ray.get(worker.rank_info.remote())
    assert rank["rank"] == 1 and rank["pid"] != old_pid
    assert rank["placement_group_id"] == group.id.hex()
    assert ray.util.placement_group_table(group)["strategy"] == "STRICT_PACK"
    assert len(ray.util.placement_group_table(group)["bundles"]) == 2  # one bundle per rank
    os.kill(rank["pid"], signal.SIGKILL)
    long_request = build_request(prompt, SamplingParams(max_tokens=500, temperature=0, ignore_eos=True))
    began = time.monotonic()
    with pytest.raises(grpc.RpcError) as failure:  # the only worker is down: it fails fast, it does not hang
        list(client.stream(long_request, timeout_s=60))
    assert time.monotonic() - began < 30
    assert "tensor-parallel" in failure.value.details()  # the reason, not a bare "worker failed"

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if ray.get(worker.pid.remote(), timeout=5) != old_pid and client.cluster_info().workers[0].healthy:
                break
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            pass
        time.sleep(0.5)
    assert client.complete(prompt, GREEDY, timeout_s=60).token_ids == expected


def test_a_tp2_worker_left_idle_past_its_collective_timeout_still_serves(tp_cluster):
    """Idle for longer than ``collective_timeout_s`` (10 s here), the same worker process answers (its ranks
    used to give up waiting for the next step, and the worker restarted)."""
    import ray

    handle, client = tp_cluster
    (worker,) = handle.workers.values()
    prompt = [(i * 11) % 250 + 3 for i in range(40)]
    first = client.complete(prompt, GREEDY, timeout_s=60).token_ids
    pid = ray.get(worker.pid.remote())
    time.sleep(12)
    assert client.complete(prompt, GREEDY, timeout_s=60).token_ids == first
    assert ray.get(worker.pid.remote()) == pid
