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
overrides = {"ray": {"address": sys.argv[1], "connect_timeout_s": 1, **({"auth_token_file": sys.argv[2]}
             if len(sys.argv) > 2 else {})}}
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
    temp_dir = Path("/tmp") / f"kvtier-ray-{port}"  # short: Ray's socket paths live under it
    environment = {**clean_environment(base), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    head = subprocess.Popen(
        [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
         "--port", str(port), "--num-cpus", "1", "--include-dashboard=false", "--disable-usage-stats",
         f"--temp-dir={temp_dir}"],
        env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for_port(port, head)
        yield f"127.0.0.1:{port}", token, base
    finally:
        stop_process_group(head)


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


def join(address: str, home: Path, *token_file: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", JOIN, address, *token_file], env=clean_environment(home),
                          capture_output=True, text=True, timeout=120)


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
    refused = join(address, home, str(token_file))
    assert refused.returncode != 0
    assert "ray.address: cannot join" in refused.stderr and "ray.auth_token_file" in refused.stderr


def test_no_token_at_all_is_refused_before_connecting(token_ray_head):
    address, _, home = token_ray_head
    began = time.monotonic()
    refused = join(address, home)
    assert refused.returncode != 0
    assert "ray.auth_token_file" in refused.stderr and "no authentication token" in refused.stderr
    assert time.monotonic() - began < 15  # told at once, not after Ray's connection timeout
