"""The ``kvstore`` section of the kvtier config: tier capacities and the Redis connection. Pure data."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_HOST_PORT = re.compile(r"^[^\s:/]+:[0-9]{1,5}$")  # host:port of a Redis Cluster node
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")
_UNITS = {"": 1, "b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "kb": 10**3, "mb": 10**6,
          "gb": 10**9, "tb": 10**12}


def parse_size(text: str) -> int:
    """``4GiB``, ``512 MiB``, ``1.5GB``, ``1000000`` -> bytes."""
    match = _SIZE.match(str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"{text!r} is not a size like 4GiB, 512MiB or 1000000")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


@dataclass(frozen=True)
class CpuTierConfig:
    enabled: bool = True
    capacity: str = "2GiB"  # host RAM for spilled blocks (pinned when CUDA is present)

    def __post_init__(self) -> None:
        try:
            if parse_size(self.capacity) < 1:
                raise ValueError("must be at least 1 byte")
        except ValueError as error:
            raise ValueError(f"capacity: {error}") from None


@dataclass(frozen=True)
class RedisConfig:
    url: str | None = None  # redis://[user:password@]host:port/db or rediss:// for TLS; None: no Redis tier
    cluster: bool = False  # the url names one node of a Redis Cluster
    # more nodes of that Redis Cluster, "host:port": the slot map is asked of the first that answers, so a
    # worker starts while the url's node is down
    cluster_nodes: tuple[str, ...] = ()
    username: str | None = None  # overrides the url's
    password_file: str | None = None  # overrides the url's password; read at every new connection, so a
    # rotated password needs no restart (it must be readable at start)
    ca_file: str | None = None  # CA bundle for rediss://
    ttl_s: int | None = None  # expire stored blocks after this many seconds
    # a block this worker wrote or read, found again in its GPU pool this long after Redis last confirmed it, is
    # checked in Redis (its keys touched: their LRU clock, and TTL, start again) and written again if Redis lost
    # it; at most ttl_s / 2 with a TTL. 0: never (a prefix hot in one worker's GPU pool, so never read from
    # Redis, may then be evicted or expire there, or be lost in a restart, while other workers need it)
    refresh_s: float = 60.0
    socket_timeout_s: float = 0.25  # every Redis call is a miss after this long
    connect_timeout_s: float = 0.25
    max_retries: int = 1  # retries of a failed call, with exponential backoff
    retry_backoff_s: float = 0.02
    breaker_failures: int = 3  # failures in a row that stop all calls (to that node, in a Redis Cluster) ...
    breaker_reset_s: float = 2.0  # ... for this long, then one trial call
    # the data path's connections: every read thread's and the writer's; a caller finding them all in use
    # waits up to connect_timeout_s for one. The health probe and flushes have two of their own
    max_connections: int = 8
    # a large read split into this many MGETs on as many connections at once; 1 was fastest on a 2-core host
    # (docs/benchmarks.md), hosts with cores to spare may gain
    read_parallelism: int = 1
    # requests whose prefixes are read from Redis at once, each read on its own thread (with read_parallelism
    # connections): a short prefix is not held up behind a long one; requests wanting the same blocks share
    # one read whatever this is
    prefetch_threads: int = 2
    # a request whose prefix Redis holds computes its first blocks while Redis reads the rest from the end,
    # where the cost model predicts both end sooner than the read alone (workers/redis_end_reads.py): "auto"
    # on CUDA only (on the CPU the two share the host's cores, and it measured slower there), "on", "off"
    compute_while_reading: str = "auto"
    write_queue_blocks: int = 4096  # write-behind queue; blocks beyond it are dropped (and counted); a queued
    # block waits in host memory (pinned with CUDA) until written: at most this many blocks' bytes
    write_batch_blocks: int = 64  # blocks per pipelined write ...
    write_batch_bytes: str = "8MiB"  # ... and at most this many bytes
    # host memory (pinned, with CUDA) taken at start for blocks between the GPU and Redis: copied off the GPU
    # until written (half of it, with one rank, in the gathers' pieces of 64 blocks), read from Redis until
    # loaded; so neither waits for memory to be pinned (beyond it, more is pinned as needed)
    staging_memory: str = "1GiB"

    def __post_init__(self) -> None:
        if self.url is not None and not re.match(r"^rediss?://", self.url):
            raise ValueError(f"url: {self.url!r} must start with redis:// or rediss://")
        if self.cluster_nodes and not self.cluster:
            raise ValueError("cluster_nodes: set, but cluster is false")
        for index, node in enumerate(self.cluster_nodes):
            if not _HOST_PORT.match(node):
                raise ValueError(f"cluster_nodes[{index}]: {node!r} is not host:port")
        for name in ("socket_timeout_s", "connect_timeout_s", "breaker_reset_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be > 0")
        for name in ("max_connections", "read_parallelism", "prefetch_threads", "write_queue_blocks",
                     "write_batch_blocks", "breaker_failures"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1")
        readers = self.read_parallelism * self.prefetch_threads
        if readers >= self.max_connections:  # one connection stays for the writer
            raise ValueError(f"read_parallelism: read_parallelism x prefetch_threads ({self.read_parallelism} x "
                             f"{self.prefetch_threads} = {readers}) must be below max_connections "
                             f"({self.max_connections}): one connection stays for the writer")
        if self.max_retries < 0 or self.retry_backoff_s < 0:
            raise ValueError("max_retries: and retry_backoff_s must be >= 0")
        for name in ("write_batch_bytes", "staging_memory"):
            try:
                parse_size(getattr(self, name))
            except ValueError as error:
                raise ValueError(f"{name}: {error}") from None
        if self.compute_while_reading not in ("auto", "on", "off"):
            raise ValueError(f"compute_while_reading: must be auto, on or off, got {self.compute_while_reading!r}")
        if self.ttl_s is not None and self.ttl_s < 1:
            raise ValueError(f"ttl_s: must be >= 1 second, got {self.ttl_s}")
        if self.refresh_s < 0:
            raise ValueError(f"refresh_s: must be >= 0 (0: never), got {self.refresh_s}")

    @property
    def refresh_interval_s(self) -> float:
        """``refresh_s``, capped at half the TTL so a hot block is touched before it expires."""
        if self.ttl_s is None or self.refresh_s == 0:
            return self.refresh_s
        return min(self.refresh_s, self.ttl_s / 2)


@dataclass(frozen=True)
class KVStoreConfig:
    prefix_caching: bool = True  # off: no tier is used, every prompt is computed
    cpu: CpuTierConfig = field(default_factory=CpuTierConfig)
    redis: RedisConfig = field(default_factory=RedisConfig)
    cost_model: bool = True  # skip a fetch that is predicted slower than recomputing
