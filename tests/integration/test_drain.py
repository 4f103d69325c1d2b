"""`kvtier serve` as a real process (its own Ray, its own router): SIGTERM during a stream lets the stream
finish, refuses new requests, and exits 0."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time

import grpc

from cluster.client import KvtierClient, build_request
from tests.redis_server import free_port
from workers.sampling_params import SamplingParams

LONG = SamplingParams(max_tokens=1500, temperature=0, ignore_eos=True)


def serve_config(tmp_path, port: int):
    config = tmp_path / "config.yaml"
    config.write_text(f"workers: {{count: 1}}\nrouter: {{port: {port}, drain_timeout_s: 120}}\n"
                      "kvstore: {cpu: {enabled: false}}\n")
    return config


def start_serve(tmp_path, port: int) -> tuple[subprocess.Popen, list[str]]:
    """The running process, and what it printed before it said it serves."""
    config = serve_config(tmp_path, port)
    env = dict(os.environ, RAY_ADDRESS="")  # a Ray of its own, not the test process's
    process = subprocess.Popen([sys.executable, "-m", "cluster.cli", "serve", "--config", str(config)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=_forward_lines, args=(process, lines), daemon=True).start()  # keeps the pipe drained
    deadline, seen = time.monotonic() + 180, []
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            break
        if line is None:
            raise AssertionError(f"kvtier serve exited with {process.wait()} before serving: {seen[-5:]}")
        if line.startswith("kvtier: serving"):
            return process, seen
        seen.append(line)
    process.kill()
    raise AssertionError(f"kvtier serve did not start within 180 s (silent or stuck): {seen[-5:]}")


def _forward_lines(process: subprocess.Popen, lines: queue.Queue) -> None:
    for line in process.stdout:
        lines.put(line)
    lines.put(None)


def test_sigterm_during_a_stream_lets_it_finish_and_exits_zero(tmp_path):
    port = free_port()
    process, printed = start_serve(tmp_path, port)
    client = KvtierClient(f"127.0.0.1:{port}")
    try:
        assert not [line for line in printed if " E " in line or "Error" in line], printed  # a clean start
        stream = client.stream(build_request([5, 6, 7, 8], LONG), timeout_s=300)
        first = next(stream)
        assert first.HasField("delta")
        process.send_signal(signal.SIGTERM)
        time.sleep(1.0)  # the router is draining now
        try:
            client.complete([9, 10, 11], SamplingParams(max_tokens=2), timeout_s=30)
            refused = None
        except grpc.RpcError as error:
            refused = error.code()
        received = list(first.delta.token_ids)
        for response in stream:
            if response.HasField("delta"):
                received += response.delta.token_ids
            else:
                final = response.final
        assert len(received) == LONG.max_tokens and final.finish_reason == 2  # FINISH_REASON_LENGTH
        assert refused == grpc.StatusCode.UNAVAILABLE
        assert process.wait(timeout=120) == 0
    finally:
        client.close()
        if process.poll() is None:
            process.kill()


# `kvtier serve`, with a Ctrl-C (SIGINT) sent 50 ms into Ray's driver connecting (ray.init's last part)
CTRL_C_WHILE_RAY_CONNECTS = textwrap.dedent("""
    import os, signal, sys, threading
    signal.signal(signal.SIGINT, signal.default_int_handler)  # (a test run in the background may ignore it)
    import ray._private.worker as ray_worker
    connect = ray_worker.connect
    def connect_and_get_interrupted(*args, **kwargs):
        threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGINT)).start()
        return connect(*args, **kwargs)
    ray_worker.connect = connect_and_get_interrupted
    from cluster.cli import main
    sys.exit(main(["serve", "--config", sys.argv[1]]))
""")


def test_ctrl_c_while_ray_connects_stops_serve_with_130_not_a_crash(tmp_path):
    """Ray's driver interrupted halfway through connecting crashed the process on its way out (SIGSEGV, exit
    139); the Ctrl-C is now held until ray.init returns, and then stops `kvtier serve` as any other does."""
    config = serve_config(tmp_path, free_port())
    result = subprocess.run([sys.executable, "-c", CTRL_C_WHILE_RAY_CONNECTS, str(config)], capture_output=True,
                            text=True, timeout=120, env=dict(os.environ, RAY_ADDRESS=""))
    assert result.returncode == 130, result.stderr[-3000:]
    assert "kvtier: interrupted" in result.stderr
