"""The Redis tier's transport: bytes in, bytes out, never an error to the caller.

Every call has a socket timeout, a bounded number of retries with exponential backoff, and goes through a
circuit breaker; a call that fails (or is refused by an open breaker) returns a miss (``None``) and is
counted. Writes from the engine go through ``kvstore.write_behind``. Values are opaque bytes here
(``kvstore.codec`` gives them meaning).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit
from typing import TypeVar

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.connection import BlockingConnectionPool, ConnectionPool
from redis.credentials import CredentialProvider
from redis.exceptions import AskError, ClusterDownError, RedisClusterException
from redis.retry import Retry

from kvstore import resp
from kvstore.circuit_breaker import CircuitBreaker
from kvstore.config import RedisConfig

log = logging.getLogger(__name__)
T = TypeVar("T")
# Redis unreachable or too slow: retried, and counted by the circuit breaker. A Redis Cluster none of whose
# nodes answers, or whose slot map has a hole (a primary down), raises RedisClusterException, not a RedisError.
_UNAVAILABLE = (redis.ConnectionError, redis.TimeoutError, ClusterDownError, RedisClusterException, OSError)
_MIN_SLICE_KEYS = 8  # a parallel MGET slice is worth its thread hand-off only past this many values
_CONTROL_CONNECTIONS = 2  # the health probe and a flush, each on its own connection beside the data path's


@dataclass(frozen=True)
class RedisHealth:
    """One probe of Redis as this process sees it (the operator's view; the data path never waits on it)."""

    up: bool
    breaker: str  # the data path's circuit breaker: closed, open or half-open
    ping_s: float | None = None
    used_memory_bytes: int = 0  # summed over every primary of a Redis Cluster
    max_memory_bytes: int = 0  # 0: no maxmemory set
    error: str = ""

    def as_gauges(self) -> dict[str, float]:
        gauges = {"up": float(self.up), "breaker_open": float(self.breaker != "closed"),
                  "used_memory_bytes": float(self.used_memory_bytes), "max_memory_bytes": float(self.max_memory_bytes)}
        if self.ping_s is not None:
            gauges["ping_seconds"] = self.ping_s
        return gauges


class RedisStore:
    def __init__(self, config: RedisConfig, clock: Callable[[], float] = time.monotonic) -> None:
        if config.url is None:
            raise ValueError("RedisStore needs kvstore.redis.url")
        self.config = config
        self._connect_lock = threading.Lock()
        # the data path's client (reads and writes); a Redis Cluster's is made on first use (``client``)
        self._client = None if config.cluster else _connect(config, config.max_connections)
        # the health probe and flushes never take (or wait for) a data-path connection; a Redis Cluster's pools,
        # one per node, are not bounded, so it has one client
        self._control_client = None if config.cluster else _connect(config, _CONTROL_CONNECTIONS)
        self._clock = clock
        # per Redis Cluster node ("host:port"), so one node down or stalled costs only its own slots' hits; ""
        # for a single server, a call not tied to one node (a flush), and a cluster's first call (no slot map)
        self._breakers: dict[str, CircuitBreaker] = {}
        self._lock = threading.Lock()
        self.errors = 0
        parallel = config.read_parallelism  # each prefetch thread reads one slice itself
        self._readers = ThreadPoolExecutor((parallel - 1) * config.prefetch_threads, "kvtier-redis-read") \
            if parallel > 1 else None

    @property
    def client(self) -> redis.Redis | RedisCluster:
        """The data path's client. Making a Redis Cluster's asks a node for the slot map, so it is made on first
        use, in a call: a cluster down when the worker starts fails that call (counted, through the breaker)
        and the next one tries again, where failing here would keep the worker from starting at all."""
        if self._client is None:
            with self._connect_lock:
                if self._client is None:
                    self._client = _connect(self.config, self.config.max_connections)
        return self._client

    @property
    def _control(self) -> redis.Redis | RedisCluster:
        return self.client if self._control_client is None else self._control_client

    def open_read_connections(self) -> bool:
        """Connect the ``read_parallelism`` connections a large read uses, so that the first read (which the cost
        model times to decide whether Redis beats recomputing) does not pay for connecting them. False, logged,
        when Redis cannot be reached now: reads connect when it can."""
        if self.config.cluster:
            return True  # one pool per node; each connects on its first read
        pool, held = self.client.connection_pool, []
        try:
            for _ in range(self.config.read_parallelism):
                held.append(pool.get_connection())  # held at once, so the pool opens that many
        except _UNAVAILABLE as error:
            log.warning("redis is not reachable yet (%s): reads will connect when it is", error)
            return False
        finally:
            for connection in held:
                pool.release(connection)
        return True

    def get_many(self, keys: Sequence[str]) -> list[bytes | None] | None:
        """Values in key order (None where absent); None for all when Redis cannot be reached in time. A large
        read is split into ``read_parallelism`` MGETs run at once (this thread reads the first)."""
        parts = self._in_slices(list(keys), lambda part, _first: self._mget(part))
        if parts is None:
            return None
        return [value for part in parts for value in part]

    def read_into(self, keys: Sequence[str], sink: resp.ValueSink) -> bool:
        """MGET ``keys`` with each value streamed from the socket into ``sink`` (``kvstore.resp``), key ``i`` as
        index ``i``, in ``read_parallelism`` slices at once (each slice's values arrive in order, on its own
        thread); False when Redis cannot be reached in time (the sink may have seen some of the values)."""
        return self._in_slices(list(keys), lambda part, first: self._call(
            lambda: self._mget_into(part, sink, first), part[0])) is not None

    def _in_slices(self, keys: list[str], read: Callable[[list[str], int], T | None]) -> list[T] | None:
        """``read(slice, index of its first key)`` for each slice, the first on this thread; None if any failed."""
        slices = _slices(keys, self.config.read_parallelism)
        starts = [0]
        for part in slices[:-1]:
            starts.append(starts[-1] + len(part))
        others = [self._readers.submit(read, part, start) for part, start in zip(slices[1:], starts[1:])]
        parts = [read(slices[0], 0)] if slices else []
        parts += [future.result() for future in others]
        return None if any(part is None for part in parts) else parts

    def _mget(self, keys: list[str]) -> list[bytes | None] | None:
        return self._call(lambda: self.client.mget(keys), keys[0])

    def _mget_into(self, keys: list[str], sink: resp.ValueSink, first: int) -> bool:
        """One MGET on a pooled connection, its reply read by ``kvstore.resp`` (redis-py sent the command)."""
        with self._exchange(self._pool_for(keys[0]), [resp.encode_command("MGET", *keys)]) as stream:
            stream.read_mget_into(len(keys), sink, first)
        return True

    @contextmanager
    def _exchange(self, pool: ConnectionPool, command: list[bytes | memoryview]) -> Iterator[resp.ReplyStream]:
        """Send ``command`` on a pooled connection and yield the stream of its reply, which the caller reads
        whole (bytes left after it: the connection is out of step). An error reply of one line (a Redis
        Cluster's MOVED included) raises ``redis.ResponseError`` with the connection kept; anything else that
        fails drops the connection, so what is left of a reply never reaches the next command."""
        connection = pool.get_connection()
        try:
            connection.send_packed_command(command)
            stream = resp.ReplyStream(_socket_of(connection))
            yield stream
            if stream.pending:
                raise resp.ProtocolError(f"{stream.pending} bytes past the end of the reply")
        except resp.RespError as error:  # the reply was one line: the connection is still in step
            # (a MOVED on a read is a miss: the manifests' read just before, through redis-py, follows a slot's
            # move and updates the slot map this read's node came from)
            raise redis.ResponseError(str(error)) from error
        except BaseException:
            connection.disconnect()
            raise
        finally:
            pool.release(connection)

    def _pool_for(self, key: str) -> ConnectionPool:
        if isinstance(self.client, RedisCluster):
            return self.client.get_node_from_key(key).redis_connection.connection_pool
        return self.client.connection_pool

    def put_many(self, items: Sequence[tuple[str, resp.Value]]) -> bool:
        """SET each key to its value (one buffer, or parts sent one after another: a payload is handed to the
        socket as it is, never joined with its header), pipelined per node, in order; False when Redis cannot be
        reached in time or refused a write (on any node)."""
        by_node: dict[str, list[tuple[str, resp.Value]]] = {}
        for item in items:
            by_node.setdefault(self._node_of(item[0]), []).append(item)
        results = [self._call(lambda group=group: self._set_all(group), group[0][0]) for group in by_node.values()]
        return bool(results) and all(result is True for result in results)

    def _set_all(self, items: Sequence[tuple[str, resp.Value]]) -> bool:
        groups: dict[int, tuple[ConnectionPool, list[tuple[str, resp.Value]]]] = {}
        for item in items:  # a block's units and manifest share a hash slot: one node, in order
            pool = self._pool_for(item[0])
            groups.setdefault(id(pool), (pool, []))[1].append(item)
        moved = [item for pool, group in groups.values() for item in self._set_on(pool, group)]
        if moved:  # a Redis Cluster slot moved: redis-py follows it (MOVED, ASK) and updates its slot map
            pipe = self.client.pipeline(transaction=False)
            for key, value in moved:
                pipe.set(key, b"".join(value) if isinstance(value, tuple) else value, ex=self.config.ttl_s)
            pipe.execute()
        return True

    def _set_on(self, pool: ConnectionPool, items: list[tuple[str, resp.Value]]) -> list[tuple[str, resp.Value]]:
        """Pipelined SETs on one pooled connection; returns the items a cluster node answered MOVED or ASK for
        (any other error reply raises, once every reply was read)."""
        with self._exchange(pool, resp.encode_set_commands(items, self.config.ttl_s)) as stream:
            statuses = stream.read_statuses(len(items))
        errors = [(item, status) for item, status in zip(items, statuses) if status is not None]
        refused = [status for _, status in errors if not status.startswith(("MOVED ", "ASK "))]
        if refused:
            raise redis.ResponseError(f"{len(refused)} of {len(items)} writes refused: {refused[0]}")
        return [item for item, _ in errors]

    def touch(self, key_groups: Sequence[Sequence[str]]) -> list[int] | None:
        """For each group of keys (one block's: one hash slot), how many Redis holds; each key it holds has its
        LRU clock started again (TOUCH) and, with ``ttl_s``, its expiry too (EXPIRE). Pipelined; the groups of
        one call must share a Redis Cluster node (one prefix's blocks do). None when Redis cannot be reached in
        time."""
        if not key_groups:
            return []
        return self._call(lambda: self._touch_all(key_groups), key_groups[0][0])

    def _touch_all(self, key_groups: Sequence[Sequence[str]]) -> list[int]:
        pipe = self.client.pipeline(transaction=False)
        ttl_s = self.config.ttl_s
        for keys in key_groups:
            if ttl_s is None:
                pipe.touch(*keys)
            else:
                for key in keys:
                    pipe.expire(key, ttl_s)
        replies = iter(pipe.execute())
        if ttl_s is None:
            return [int(reply) for reply in replies]
        return [sum(bool(next(replies)) for _ in keys) for keys in key_groups]

    def delete(self, keys: Sequence[str]) -> int | None:
        if not keys:
            return 0
        return self._call(lambda: self._unlink_now(self.client, list(keys)), keys[0])

    def delete_matching(self, pattern: str) -> int | None:
        """UNLINK every key matching ``pattern`` (SCAN, on every primary of a cluster)."""

        def scan_and_unlink() -> int:
            deleted = 0
            batch: list[str] = []
            for key in self._control.scan_iter(match=pattern, count=1000):
                batch.append(key)
                if len(batch) >= 1000:
                    deleted += self._unlink_now(self._control, batch)
                    batch = []
            return deleted + self._unlink_now(self._control, batch)

        return self._call(scan_and_unlink)

    @staticmethod
    def _unlink_now(client: redis.Redis | RedisCluster, keys: list[str]) -> int:
        if not keys:
            return 0
        if isinstance(client, RedisCluster):
            return sum(client.unlink(key) for key in keys)
        return client.unlink(*keys)

    def _call(self, operation: Callable[[], T], key: str | None = None) -> T | None:
        """Run ``operation`` (on the node that serves ``key``, if it names one) with retries and backoff,
        through that node's breaker; None on failure."""
        for attempt in range(self.config.max_retries + 1):
            breaker = self._breaker_for(key)
            with self._lock:
                allowed = breaker.allow()
            if not allowed:
                return None
            try:
                result = operation()
            except _UNAVAILABLE as error:
                self._on_failure(breaker, error, attempt)
                continue
            except redis.RedisError as error:  # Redis answered with an error (OOM, ...): no retry, and it is up
                with self._lock:  # (a trial call that ended so must close the breaker, or it stays half-open)
                    self.errors += 1
                    breaker.record_success()
                log.warning("redis refused a call: %s%s", error, self._hint(error))
                return None
            except Exception:  # not Redis's doing (a bug): raised, but a trial call must not stay in flight
                with self._lock:
                    breaker.record_failure()
                raise
            with self._lock:
                breaker.record_success()
            return result
        return None

    def _breaker_for(self, key: str | None) -> CircuitBreaker:
        node = self._node_of(key) if key is not None else ""
        with self._lock:
            if node not in self._breakers:
                self._breakers[node] = CircuitBreaker(self.config.breaker_failures, self.config.breaker_reset_s,
                                                      self._clock)
            return self._breakers[node]

    def _node_of(self, key: str) -> str:
        """The Redis Cluster node serving ``key`` in the slot map ("" for a single server, or with no map)."""
        if self._client is None or not isinstance(self._client, RedisCluster):
            return ""
        try:
            return self._client.get_node_from_key(key).name
        except RedisClusterException:  # a slot no node serves (yet): the cluster-wide breaker
            return ""

    def _hint(self, error: redis.RedisError) -> str:
        if isinstance(error, AskError) and not self.config.cluster:  # (MovedError is an AskError)
            return (" (a MOVED or ASK reply: this Redis is a node of a Redis Cluster; set kvstore.redis.cluster: "
                    "true, or redis.external.cluster in the Helm chart)")
        return ""

    def _on_failure(self, breaker: CircuitBreaker, error: Exception, attempt: int) -> None:
        with self._lock:
            self.errors += 1
            breaker.record_failure()
        log.warning("redis call failed (attempt %d): %s", attempt + 1, error)
        if attempt < self.config.max_retries:
            time.sleep(self.config.retry_backoff_s * 2**attempt)

    def health(self) -> RedisHealth:
        """PING and INFO memory, once each, outside the retries and the breaker (a probe must not trip it)."""
        with self._lock:
            breaker = _worst([b.state for b in self._breakers.values()])
        began = time.perf_counter()
        try:
            self._control.ping()
            ping_s = time.perf_counter() - began
            if isinstance(self._control, RedisCluster):
                info = self._control.info("memory", target_nodes=RedisCluster.PRIMARIES)
            else:
                info = self._control.info("memory")
        except (redis.RedisError, RedisClusterException, OSError) as error:
            return RedisHealth(up=False, breaker=breaker, error=f"{type(error).__name__}: {error}")
        used, limit = _memory_of(info)
        return RedisHealth(up=True, breaker=breaker, ping_s=ping_s, used_memory_bytes=used, max_memory_bytes=limit)

    def close(self) -> None:
        if self._readers is not None:
            self._readers.shutdown(wait=True)
        for client in (self._client, self._control_client):
            if client is not None:
                client.close()


def _worst(states: list[str]) -> str:
    """The state the probe reports for the breakers: open if any is, else half-open if any is, else closed."""
    return next((state for state in ("open", "half-open") if state in states), "closed")


def _slices(keys: list[str], parts: int, min_keys: int = _MIN_SLICE_KEYS) -> list[list[str]]:
    """``keys`` in at most ``parts`` contiguous slices of at least ``min_keys`` (small reads stay whole)."""
    count = max(1, min(parts, len(keys) // min_keys))
    size = max(1, -(-len(keys) // count))
    return [keys[start : start + size] for start in range(0, len(keys), size)]


def _socket_of(connection) -> socket.socket:
    """The connected socket of a redis-py connection (redis-py offers no public accessor; it has been ``_sock``
    for years, and the integration tests read through it against a real redis-server)."""
    sock = getattr(connection, "_sock", None)
    if sock is None:
        raise resp.ProtocolError("redis-py connection has no socket (its internals changed?)")
    return sock


def _memory_of(info: dict) -> tuple[int, int]:
    """(used_memory, maxmemory) of one server's INFO, or summed over a cluster's {node: INFO}."""
    if "used_memory" in info:
        return int(info["used_memory"]), int(info.get("maxmemory", 0))
    per_node = [_memory_of(node_info) for node_info in info.values()]
    return sum(used for used, _ in per_node), sum(limit for _, limit in per_node)


def _connect(config: RedisConfig, max_connections: int) -> redis.Redis | RedisCluster:
    """A client whose pool opens at most ``max_connections``; a caller finding them all in use waits up to
    ``connect_timeout_s`` for one (then the call fails like a connect that timed out), where redis-py's default
    pool would fail it at once."""
    options = dict(
        socket_timeout=config.socket_timeout_s,
        socket_connect_timeout=config.connect_timeout_s,
        retry=Retry(NoBackoff(), 0),  # retries are ours, bounded, and go through the breaker
        retry_on_timeout=False,
    )
    url, credentials = _credentials_apart(config)
    if credentials is not None:
        credentials.get_credentials()  # a password file that cannot be read is an error at start
        options["credential_provider"] = credentials
    if url.startswith("rediss://") and config.ca_file:
        options["ssl_ca_certs"] = config.ca_file
    if config.cluster:
        more_nodes = [ClusterNode(host, int(port)) for host, port in (n.rsplit(":", 1) for n in config.cluster_nodes)]
        return RedisCluster.from_url(url, startup_nodes=more_nodes, **options)
    pool = BlockingConnectionPool.from_url(url, max_connections=max_connections,
                                           timeout=config.connect_timeout_s, **options)
    client = redis.Redis(connection_pool=pool)
    client.auto_close_connection_pool = True  # close() disconnects the pool, as Redis.from_url's client does
    return client


@dataclass(frozen=True)
class _Credentials(CredentialProvider):
    """The AUTH of each new connection. The password file is read at every connect, so a rotated password (a
    mounted Secret's file is replaced in place) reaches the next connection without a restart."""

    username: str | None
    password: str | None
    password_file: str | None

    def get_credentials(self) -> tuple[str] | tuple[str, str]:
        password = Path(self.password_file).read_text().strip() if self.password_file else self.password
        return (self.username, password) if self.username else (password,)


def _credentials_apart(config: RedisConfig) -> tuple[str, _Credentials | None]:
    """The url without its user and password, and the credentials: ``username`` and ``password_file`` where
    set, else the url's."""
    parts = urlsplit(config.url)
    username = config.username if config.username is not None else _unquoted(parts.username)
    password = _unquoted(parts.password)
    if password is None and config.password_file is None:
        return config.url, None
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=host)), _Credentials(username, password, config.password_file)


def _unquoted(text: str | None) -> str | None:
    return unquote(text) if text else None
