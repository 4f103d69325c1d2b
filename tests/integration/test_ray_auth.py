"""Joining a Ray cluster that has token auth on: a real Ray head (``ray start``, loopback, its own temp dir and
HOME) and ``cluster.serve.join_ray`` in fresh processes with nothing of Ray's auth in their environment."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.redis_server import free_port

JOIN = """
import sys, ray
from cluster.config import load_config
from cluster.serve import join_ray
overrides = {"ray": {"address": sys.argv[1], "connect_timeout_s": float(sys.argv[2]),
                     **({"auth_token_file": sys.argv[3]} if len(sys.argv) > 3 else {})}}
join_ray(load_config(overrides=overrides))
print("CPUs", ray.cluster_resources()["CPU"])
"""


def clean_environment(home: Path) -> dict[str, str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    return {**environment, "HOME": str(home)}  # no ~/.ray/auth_token to fall back on


@pytest.fixture(scope="module")
def token_ray_head(tmp_path_factory):
    base = tmp_path_factory.mktemp("ray-auth")
    token, port = secrets.token_hex(16), free_port()
    head = start_head(port, token, base)
    try:
        wait_for_port(port, head)
        yield f"127.0.0.1:{port}", token, base
    finally:
        stop_process_group(head)


def start_head(port: int, token: str, home: Path) -> subprocess.Popen:
    """``ray start --head`` on loopback ``port`` with token auth, in a process group of its own."""
    temp_dir = Path("/tmp") / f"kvtier-ray-{port}"  # short: Ray's socket paths live under it
    environment = {**clean_environment(home), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    return subprocess.Popen(
        [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
         "--port", str(port), "--num-cpus", "1", "--include-dashboard=false", "--disable-usage-stats",
         f"--temp-dir={temp_dir}"],
        env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def stop_process_group(process: subprocess.Popen, grace_s: float = 5.0) -> None:
    """SIGTERM the head's process group, then SIGKILL it: ``ray start --block`` takes about 30 s to stop its
    processes gracefully, and nothing of this throwaway head needs saving."""
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


def wait_for_port(port: int, process: subprocess.Popen, timeout_s: float = 60) -> None:
    import socket

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, "ray start exited"
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"no Ray head on port {port}")


def join(address: str, home: Path, *token_file: str, connect_timeout_s: float = 1) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", JOIN, address, str(connect_timeout_s), *token_file],
                          env=clean_environment(home), capture_output=True, text=True, timeout=120)


def test_the_cluster_token_from_ray_auth_token_file_joins(token_ray_head, tmp_path):
    address, token, home = token_ray_head
    token_file = tmp_path / "ray-token"
    token_file.write_text(token + "\n")
    joined = join(address, home, str(token_file))
    assert joined.returncode == 0, joined.stderr[-2000:]
    assert "CPUs 1.0" in joined.stdout


def test_a_wrong_token_is_refused_with_a_message_naming_the_token_file(token_ray_head, tmp_path):
    address, _, home = token_ray_head
    token_file = tmp_path / "ray-token"
    token_file.write_text(secrets.token_hex(16))
    began = time.monotonic()
    refused = join(address, home, str(token_file), connect_timeout_s=60)
    assert refused.returncode != 0
    assert "ray.auth_token_file: the Ray cluster at" in refused.stderr and "refused the token" in refused.stderr
    assert time.monotonic() - began < 15  # at once, not after Ray's 20 s of retries nor the 60 s connect wait


def test_a_head_that_is_not_up_is_waited_for_up_to_the_connect_timeout(tmp_path):
    """The token check asks only a head that listens: with none there, joining waits ``connect_timeout_s`` (one
    ``ray.init`` at such an address took minutes to give up) and says nothing listens."""
    token_file = tmp_path / "ray-token"
    token_file.write_text(secrets.token_hex(16))
    began = time.monotonic()
    refused = join(f"127.0.0.1:{free_port()}", tmp_path, str(token_file), connect_timeout_s=3)
    assert refused.returncode != 0 and "cannot join" in refused.stderr and "nothing listens there" in refused.stderr
    assert 3 <= time.monotonic() - began < 30


def test_a_head_that_comes_up_while_joining_is_joined(tmp_path):
    token, port = secrets.token_hex(16), free_port()
    token_file = tmp_path / "ray-token"
    token_file.write_text(token)
    joining = subprocess.Popen([sys.executable, "-c", JOIN, f"127.0.0.1:{port}", "60", str(token_file)],
                               env=clean_environment(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    time.sleep(3)
    head = start_head(port, token, tmp_path)
    try:
        stdout, stderr = joining.communicate(timeout=90)
    finally:
        joining.kill()
        stop_process_group(head)
    assert joining.returncode == 0, stderr[-2000:]
    assert "CPUs 1.0" in stdout  # it waited for the head that started 3 s after it, then joined
def test_no_token_at_all_is_refused_before_connecting(token_ray_head):
    address, _, home = token_ray_head
    began = time.monotonic()
    refused = join(address, home)
    assert refused.returncode != 0
    assert "ray.auth_token_file" in refused.stderr and "no authentication token" in refused.stderr
    assert time.monotonic() - began < 15  # told at once, not after Ray's connection timeout
