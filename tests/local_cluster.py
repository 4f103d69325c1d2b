"""A kvtier cluster on a Ray of the test module's own (two CPUs, no dashboard), stopped however the tests end."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from cluster.config import load_config


@contextmanager
def local_cluster(overrides: dict, namespace: str) -> Iterator:
    """Start Ray and the cluster the config ``overrides`` describe; yield its ``cluster.serve.Cluster``."""
    import ray

    from cluster.serve import start_cluster, stop_cluster

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace=namespace)
    try:
        handle = start_cluster(load_config(overrides=overrides))
        try:
            yield handle
        finally:
            stop_cluster(handle)
    finally:
        ray.shutdown()
