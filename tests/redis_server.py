"""A real redis-server on a free loopback port, owned by one test: it can be killed, paused, restarted, filled."""

from __future__ import annotations

import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too.

    Both are drawn from below the kernel's ephemeral range, so an outgoing connection (Ray, the other nodes'
    cluster bus links) cannot take either between this check and the server's bind.
    """
    rng = random.Random()
    upper = _ephemeral_low() - 10000
    for _ in range(200):
        port = rng.randrange(10000, upper)
        if _bindable(port) and _bindable(port + 10000):
            return port
    raise RuntimeError("no free port pair for a Redis Cluster node")


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class PortTakenError(RuntimeError):
    """redis-server could not bind its port (or its cluster bus port): another process holds it."""


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for a TLS-only redis-server: its certificate and key, and the CA that signed them."""

    cert_file: str
    key_file: str
    ca_file: str


class RedisServer:
    """``password`` turns on requirepass; ``tls`` serves TLS only (no plaintext port).

    Without ``port``, one is drawn by ``pick_port``; if another process binds it (or its cluster bus port) before
    the server's first start does, the first start draws again. Later starts (a restart) keep the port.
    """

    def __init__(self, directory: Path, port: int | None = None, extra_args: tuple[str, ...] = (),
                 password: str | None = None, tls: TlsFiles | None = None,
                 pick_port: Callable[[], int] = free_port) -> None:
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not installed (scripts/test.sh installs it)")
        self.directory = directory
        self.port = port or pick_port()
        self._pick_port = None if port else pick_port
        self.extra_args = extra_args
        self.password = password
        self.tls = tls
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://127.0.0.1:{self.port}/0"

    def client(self, retry: bool = True) -> redis.Redis:
        """With redis-py's own retries (about 4 s with its default backoff), or none."""
        tls = {"ssl": True, "ssl_ca_certs": self.tls.ca_file} if self.tls else {}
        retry = {} if retry else {"retry": Retry(NoBackoff(), 0)}
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5, password=self.password, **tls, **retry)

    def _security_args(self) -> list[str]:
        args = ["--requirepass", self.password] if self.password else []
        if self.tls:
            args += ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", self.tls.cert_file,
                     "--tls-key-file", self.tls.key_file, "--tls-ca-cert-file", self.tls.ca_file,
                     "--tls-auth-clients", "no"]
        return args

    def start(self) -> RedisServer:
        attempts = 3 if self._pick_port else 1
        for attempt in range(attempts):
            try:
                self._start_once()
                break
            except PortTakenError:
                if attempt == attempts - 1:
                    raise
                (self.directory / "redis.log").unlink(missing_ok=True)
                self.port = self._pick_port()
        self._pick_port = None
        return self

    def _start_once(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        command = [
            "redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(self.directory), "--logfile", str(self.directory / "redis.log"), *self.extra_args,
            *self._security_args(),
        ]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._wait_until_up()

    def _wait_until_up(self, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                if self.client(retry=False).ping():
                    return
            except redis.ConnectionError:
                time.sleep(0.02)
        log = self.directory / "redis.log"
        last_lines = log.read_text().splitlines()[-2:] if log.exists() else []
        self.kill()
        error = PortTakenError if any("Address already in use" in line for line in last_lines) else RuntimeError
        raise error(f"redis-server on port {self.port} did not start: {last_lines}")

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None

    def pause(self) -> None:
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.process is not None:  # (a killed server stays down)
            self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.process is not None:
            self.resume()
            self.kill()


class RedisClusterNodes:
    """Three redis-server primaries on free loopback ports, joined into one Redis Cluster (no replicas)."""

    def __init__(self, directory: Path, size: int = 3) -> None:
        self.nodes = [
            RedisServer(
                directory / f"node{i}",
                pick_port=free_cluster_port,
                extra_args=("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                            "--cluster-node-timeout", "2000"),
            )
            for i in range(size)
        ]

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def start(self) -> RedisClusterNodes:
        for node in self.nodes:
            node.start()
        addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
        subprocess.run(
            ["redis-cli", "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
            check=True, capture_output=True, timeout=60,
        )
        self.wait_until_ok()
        return self

    def wait_until_ok(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            states = [node.client().cluster("info") for node in self.nodes]
            if all(state.get("cluster_state") == "ok" for state in states):
                return
            time.sleep(0.1)
        raise RuntimeError("the Redis Cluster did not reach cluster_state:ok")

    def key_counts(self) -> list[int]:
        return [node.client().dbsize() for node in self.nodes]

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

