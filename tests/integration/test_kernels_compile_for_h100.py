"""The Triton kernels compile for an H100 (sm_90) in every specialisation the engine launches, checked on a
machine without a GPU: the interpreter that runs them in the other CPU tests accepts programs the GPU compiler
rejects (a loop-carried value whose type changes only on the int64 lengths of a decode graph, for one)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton.backends.nvidia")

REPO = Path(__file__).resolve().parents[2]


def test_every_kernel_launch_the_engine_makes_compiles_for_an_h100():
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "tests.kernel_compile"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    launches = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    failures = [launch for launch in launches if "error" in launch]
    assert done.returncode == 0 and not failures, failures or done.stderr[-3000:]
    compiled = {(launch["shape"], launch["kernel"], launch["lens"]) for launch in launches}
    for shape in ("llama3-1b", "llama3-8b", "qwen2-0.5b", "llama2-7b", "tiny"):
        assert {(shape, "_paged_attention_kernel", "torch.int32"), (shape, "_paged_attention_kernel", "torch.int64"),
                (shape, "_split_decode_kernel", "torch.int32"), (shape, "_split_decode_kernel", "torch.int64"),
                (shape, "_combine_splits_kernel", None)} <= compiled  # eager steps and decode-graph steps
    assert all(launch["cubin_bytes"] > 0 for launch in launches)
