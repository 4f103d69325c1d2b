"""Tensor parallelism on CPU (gloo, local rank processes): same tokens as tp=1 and transformers, KV heads split
(or replicated when tp exceeds them), each rank holding 1/tp of the pool, and a dead rank failing fast."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.hf_reference import hf_greedy, random_prompts, save_random_model
from workers.engine import LLMEngine
from workers.engine_config import CacheConfig, EngineConfig, SchedulerConfig
from workers.sampling_params import SamplingParams

PROMPT_LENGTHS = [1, 17, 100, 300]
GREEDY = SamplingParams(max_tokens=12, temperature=0)


@pytest.fixture(scope="module", params=["llama3", "qwen2"])
def reference(request, tmp_path_factory):
    model_dir = save_random_model(request.param, tmp_path_factory.mktemp(f"tp-{request.param}"))
    prompts = random_prompts(PROMPT_LENGTHS, vocab_size=320, seed=3)
    return model_dir, prompts, hf_greedy(model_dir, prompts, GREEDY.max_tokens)


def run(model_dir: Path, prompts: list[list[int]], tp: int, num_blocks: int = 64) -> tuple[list[list[int]], int]:
    """(greedy outputs, bytes of rank 0's KV pool)."""
    config = EngineConfig(
        model=str(model_dir), tensor_parallel_size=tp, cache=CacheConfig(num_blocks=num_blocks),
        scheduler=SchedulerConfig(max_num_batched_tokens=128),
    )
    engine = LLMEngine.from_config(config, progress=False)
    try:
        outputs = [c.token_ids for c in engine.generate(prompts, GREEDY)]
        cache = engine.runner.kv_cache
        return outputs, cache.numel() * cache.element_size()
    finally:
        engine.close()


@pytest.mark.parametrize("tp", [2, 4], ids=["kv-heads-split", "kv-heads-replicated"])
def test_tp_equals_tp1_and_transformers(reference, tp):
    model_dir, prompts, expected = reference  # both shapes have 4 query heads and 2 KV heads
    tp1_outputs, tp1_pool_bytes = run(model_dir, prompts, tp=1)
    outputs, pool_bytes = run(model_dir, prompts, tp=tp)
    assert tp1_outputs == expected
    assert outputs == expected
    kv_heads_per_rank = max(1, 2 // tp)
    assert pool_bytes == tp1_pool_bytes * kv_heads_per_rank // 2  # tp=2: half; tp=4: half (one head, shared)


def test_a_degree_the_model_cannot_split_is_a_clear_error(reference):
    model_dir, _, _ = reference
    from workers.parallel import TensorParallelError

    with pytest.raises(TensorParallelError, match="engine.tensor_parallel_size: 3 does not divide the 4"):
        LLMEngine.from_config(EngineConfig(model=str(model_dir), tensor_parallel_size=3), progress=False)


def test_killing_a_rank_fails_the_group_within_bounded_time():
    command = [
        str(Path(sys.executable).parent / "kvtier"), "generate", "--model", "tiny", "--tp", "2",
        "--prompt-token-ids", ",".join(["7"] * 64), "--max-tokens", "3000", "--ignore-eos", "--temperature", "0",
        "--num-kv-blocks", "512",
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rank_pid = None
    stderr_lines = []
    for line in process.stderr:
        stderr_lines.append(line)
        match = re.search(r"tensor parallel: 2 ranks, pids \[(\d+)\]", line)
        if match:
            rank_pid = int(match.group(1))
        if rank_pid and line.startswith("kvtier: KV cache"):
            break
    assert rank_pid is not None, "".join(stderr_lines)
    time.sleep(1.0)  # decoding is under way
    subprocess.run(["kill", "-9", str(rank_pid)], check=True)
    killed_at = time.monotonic()
    remaining_stderr = process.stderr.read()
    returncode = process.wait(timeout=60)
    assert time.monotonic() - killed_at < 30
    assert returncode != 0
    assert f"tensor-parallel rank 1 (pid {rank_pid}) exited" in remaining_stderr, remaining_stderr
