"""Tensor parallelism on CPU (gloo, local rank processes): same tokens as tp=1 and transformers, KV heads split
(or replicated when tp exceeds them), each rank holding 1/tp of the pool, and a dead rank failing fast."""

from __future__ import annotations

import dataclasses
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.hf_reference import hf_greedy, random_prompts, save_random_model
from workers.engine import LLMEngine
from workers.engine_config import CacheConfig, EngineConfig, SchedulerConfig
from workers.parallel import TensorParallelError
from workers.sampling_params import SamplingParams

PROMPT_LENGTHS = [1, 17, 100, 300]
GREEDY = SamplingParams(max_tokens=12, temperature=0)


@pytest.fixture(scope="module", params=["llama3", "qwen2"])
def reference(request, tmp_path_factory):
    model_dir = save_random_model(request.param, tmp_path_factory.mktemp(f"tp-{request.param}"))
    prompts = random_prompts(PROMPT_LENGTHS, vocab_size=320, seed=3)
    return model_dir, prompts, hf_greedy(model_dir, prompts, GREEDY.max_tokens)


def run(model_dir: Path, prompts: list[list[int]], tp: int, num_blocks: int = 64,
        params: SamplingParams = GREEDY) -> tuple[list[list[int]], int, list[list[float]]]:
    """(greedy outputs, bytes of rank 0's KV pool, each prompt token's log-probability when ``params`` ask)."""
    config = EngineConfig(
        model=str(model_dir), tensor_parallel_size=tp, cache=CacheConfig(num_blocks=num_blocks),
        scheduler=SchedulerConfig(max_num_batched_tokens=128),
    )
    engine = LLMEngine.from_config(config, progress=False)
    try:
        completions = engine.generate(prompts, params)
        cache = engine.runner.kv_cache
        scores = [[found.logprob for found in c.prompt_logprobs] for c in completions]
        return [c.token_ids for c in completions], cache.numel() * cache.element_size(), scores
    finally:
        engine.close()


@pytest.mark.parametrize("tp", [2, 4], ids=["kv-heads-split", "kv-heads-replicated"])
def test_tp_equals_tp1_and_transformers(reference, tp):
    model_dir, prompts, expected = reference  # both shapes have 4 query heads and 2 KV heads
    scoring = dataclasses.replace(GREEDY, prompt_logprobs=2)
    tp1_outputs, tp1_pool_bytes, tp1_scores = run(model_dir, prompts, tp=1, params=scoring)
    outputs, pool_bytes, scores = run(model_dir, prompts, tp=tp, params=scoring)
    assert tp1_outputs == expected
    assert outputs == expected
    assert [len(found) for found in scores] == [n - 1 for n in PROMPT_LENGTHS]
    assert sum(scores, []) == pytest.approx(sum(tp1_scores, []), abs=1e-4)
    kv_heads_per_rank = max(1, 2 // tp)
    assert pool_bytes == tp1_pool_bytes * kv_heads_per_rank // 2  # tp=2: half; tp=4: half (one head, shared)


def test_a_model_with_a_sliding_window_at_tp_2_equals_transformers(tmp_path):
    model_dir = save_random_model("qwen2-window", tmp_path / "model")  # layer 1: a 40-token window
    prompts = random_prompts([17, 100, 300], vocab_size=320, seed=5)
    assert run(model_dir, prompts, tp=2)[0] == hf_greedy(model_dir, prompts, GREEDY.max_tokens)


def test_a_degree_the_model_cannot_split_is_a_clear_error(reference):
    model_dir, _, _ = reference
    from workers.parallel import TensorParallelError

    with pytest.raises(TensorParallelError, match="engine.tensor_parallel_size: 3 does not divide the 4"):
        LLMEngine.from_config(EngineConfig(model=str(model_dir), tensor_parallel_size=3), progress=False)


def decoding_tp2_generate() -> tuple[subprocess.Popen, int, threading.Timer]:
    """``kvtier generate --tp 2`` with a long decode, once it decodes: the process, its rank 1's pid, and a
    watchdog that kills it after 180 s (a run that hangs fails the test instead of hanging it)."""
    command = [
        str(Path(sys.executable).parent / "kvtier"), "generate", "--model", "tiny", "--tp", "2",
        "--prompt-token-ids", ",".join(["7"] * 64), "--max-tokens", "3000", "--ignore-eos", "--temperature", "0",
        "--num-kv-blocks", "512",
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(180, process.kill)
    watchdog.start()
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
    return process, rank_pid, watchdog


def finish_within(process: subprocess.Popen, watchdog: threading.Timer, timeout_s: float, what: str) -> str:
    """The rest of its stderr, once it ended; fails the test if it did not within ``timeout_s``."""
    try:
        return process.communicate(timeout=timeout_s)[1]
    except subprocess.TimeoutExpired:
        process.kill()
        raise AssertionError(f"kvtier generate --tp 2 was still running {timeout_s} s after {what}") from None
    finally:
        watchdog.cancel()


def test_killing_a_rank_fails_the_group_within_bounded_time():
    process, rank_pid, watchdog = decoding_tp2_generate()
    subprocess.run(["kill", "-9", str(rank_pid)], check=True)
    killed_at = time.monotonic()
    remaining_stderr = finish_within(process, watchdog, 60, "its rank died")
    assert time.monotonic() - killed_at < 30
    assert process.returncode != 0
    assert f"tensor-parallel rank 1 (pid {rank_pid}) exited" in remaining_stderr, remaining_stderr


def test_ctrl_c_stops_the_group_at_once_and_leaves_no_rank_behind():
    """SIGINT lands inside a step (rank 1 waits in a collective, where no stop message reaches it): the ranks
    are killed, not asked to stop between steps (that waited out the 60 s collective timeout first)."""
    process, rank_pid, watchdog = decoding_tp2_generate()
    process.send_signal(signal.SIGINT)
    interrupted_at = time.monotonic()
    remaining_stderr = finish_within(process, watchdog, 60, "Ctrl-C")
    assert time.monotonic() - interrupted_at < 10
    assert process.returncode == 130 and "kvtier: interrupted" in remaining_stderr, remaining_stderr
    assert "Traceback" not in remaining_stderr
    deadline = time.monotonic() + 5
    while Path(f"/proc/{rank_pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{rank_pid}").exists(), "rank 1 outlived kvtier generate"


# --- tiers under tensor parallelism: per-rank CPU slices, Redis units by KV-head range ---------------------

from kvstore.config import CpuTierConfig, KVStoreConfig, RedisConfig  # noqa: E402
from kvstore.hashing import block_hashes  # noqa: E402

TINY_PREFIX = [(i * 37) % 250 + 3 for i in range(160)]  # 10 blocks
TINY_GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


def tiny_engine(tp: int, kvstore: KVStoreConfig, num_blocks: int = 256) -> LLMEngine:
    config = EngineConfig(model="tiny", tensor_parallel_size=tp, cache=CacheConfig(num_blocks=num_blocks))
    return LLMEngine.from_config(config, kvstore, progress=False)


def tiny_tp2_config(**timeouts: float) -> EngineConfig:
    return EngineConfig(model="tiny", tensor_parallel_size=2, cache=CacheConfig(num_blocks=64), **timeouts)


def redis_tier(url: str) -> KVStoreConfig:
    return KVStoreConfig(cpu=CpuTierConfig(enabled=False), redis=RedisConfig(url=url))


def generate_and_close(engine: LLMEngine, prompt: list[int]):
    try:
        (done,) = engine.generate([prompt], TINY_GREEDY)
        return done
    finally:
        engine.close()


@pytest.mark.parametrize("writer_tp, reader_tp", [(2, 1), (1, 2)])
def test_a_prefix_stored_at_one_tp_degree_is_reused_at_another(redis_server, writer_tp, reader_tp):
    expected = generate_and_close(tiny_engine(1, KVStoreConfig(prefix_caching=False)), TINY_PREFIX + [9, 9, 9])
    generate_and_close(tiny_engine(writer_tp, redis_tier(redis_server.url)), TINY_PREFIX + [5, 6])
    units = {key.rsplit(b":", 1)[1] for key in redis_server.client().keys("kvtier:*")}
    assert units == ({b"h0-1", b"h1-2", b"m"} if writer_tp == 2 else {b"h0-2", b"m"})
    done = generate_and_close(tiny_engine(reader_tp, redis_tier(redis_server.url)), TINY_PREFIX + [9, 9, 9])
    assert done.usage.cached_tokens.redis == 160
    assert done.token_ids == expected.token_ids


def test_a_block_with_a_missing_head_slice_is_a_miss(redis_server):
    expected = generate_and_close(tiny_engine(1, KVStoreConfig(prefix_caching=False)), TINY_PREFIX + [9, 9, 9])
    generate_and_close(tiny_engine(2, redis_tier(redis_server.url)), TINY_PREFIX + [5, 6])
    client = redis_server.client()
    fourth = block_hashes(TINY_PREFIX, 16)[3].hex().encode()
    (slice_key,) = [key for key in client.keys("kvtier:*") if fourth in key and key.endswith(b":h1-2")]
    client.delete(slice_key)
    done = generate_and_close(tiny_engine(1, redis_tier(redis_server.url)), TINY_PREFIX + [9, 9, 9])
    assert done.usage.cached_tokens.redis == 3 * 16  # blocks 0-2; block 3 lacks a slice
    assert done.token_ids == expected.token_ids


def test_each_rank_spills_and_loads_its_own_slice_in_the_cpu_tier():
    prefixes = [[(i * seed) % 250 + 3 for i in range(160)] for seed in (37, 41, 43)]
    waves = [prefixes[i % 3] + [7 + i] * 9 for i in range(6)]
    expected = [generate_and_close(tiny_engine(1, KVStoreConfig(prefix_caching=False)), w).token_ids for w in waves]
    engine = tiny_engine(2, KVStoreConfig(cpu=CpuTierConfig(capacity="4MiB")), num_blocks=24)
    try:
        outputs = [engine.generate([wave], TINY_GREEDY)[0].token_ids for wave in waves]
        stats = engine.kv_store_stats()
    finally:
        engine.close()
    assert outputs == expected
    assert stats["cpu"]["stored_blocks"] > 0 and stats["cpu"]["hit_blocks"] > 0


def test_a_one_rank_group_runs_the_distributed_path():
    import torch.distributed as dist

    prompt = TINY_PREFIX[:50]
    plain = generate_and_close(tiny_engine(1, KVStoreConfig(prefix_caching=False)), prompt)
    config = EngineConfig(model="tiny", cache=CacheConfig(num_blocks=64))
    engine = LLMEngine.from_config(config, KVStoreConfig(prefix_caching=False), progress=False, distributed=True)
    assert dist.is_initialized() and dist.get_world_size() == 1
    assert generate_and_close(engine, prompt).token_ids == plain.token_ids
    assert not dist.is_initialized()


def test_a_group_that_failed_to_form_leaves_the_process_able_to_form_another(monkeypatch):
    """Rank 1 announces itself, then dies before the group forms: rank 0 fails within its collective timeout,
    and the next group this process starts forms and gives the tokens of tp=1 (torch's name for the failed
    group is not reused)."""
    import workers.tp_group as tp_group

    def ranks_that_die_after_announcing(world_size, port, config):
        ranks = spawn_local_ranks(world_size, port, config)
        ranks.kill()
        tp_group.announce_joining(tp_group.rendezvous(1, world_size, port, 10), 1)
        return ranks

    spawn_local_ranks = tp_group.spawn_local_ranks
    config = tiny_tp2_config(collective_timeout_s=3)
    monkeypatch.setattr(tp_group, "spawn_local_ranks", ranks_that_die_after_announcing)
    began = time.monotonic()
    with pytest.raises(Exception, match="timeout"):
        LLMEngine.from_config(config, KVStoreConfig(prefix_caching=False), progress=False)
    assert time.monotonic() - began < 3 + 5
    monkeypatch.setattr(tp_group, "spawn_local_ranks", spawn_local_ranks)
    prompt = TINY_PREFIX[:50]
    plain = generate_and_close(tiny_engine(1, KVStoreConfig(prefix_caching=False)), prompt)
    engine = LLMEngine.from_config(config, KVStoreConfig(prefix_caching=False), progress=False)
    assert generate_and_close(engine, prompt).token_ids == plain.token_ids


def test_a_rank_that_dies_before_joining_is_named_at_once(monkeypatch):
    import workers.tp_group as tp_group

    def ranks_that_die(world_size, port, config):
        ranks = spawn_local_ranks(world_size, port, config)
        ranks.kill()
        return ranks

    spawn_local_ranks = tp_group.spawn_local_ranks
    monkeypatch.setattr(tp_group, "spawn_local_ranks", ranks_that_die)
    config = tiny_tp2_config(collective_timeout_s=30)
    began = time.monotonic()
    with pytest.raises(TensorParallelError, match=r"rank 1 \(pid \d+\) exited"):
        LLMEngine.from_config(config, KVStoreConfig(prefix_caching=False), progress=False)
    assert time.monotonic() - began < 5  # not the collective timeout


def test_a_rank_that_starts_slower_than_the_collective_timeout_still_joins(monkeypatch):
    """A busy node may take longer than ``collective_timeout_s`` (here 2 s) to start a rank (4 s here): rank 0
    waits for it up to ``rank_start_timeout_s``. Before, the group's rendezvous timed out, and a restarted
    cluster worker stayed down."""
    import workers.tp_group as tp_group

    def ranks_that_start_late(world_size, port, config):
        ranks = tp_group.LocalRanks([])

        def start_late() -> None:
            time.sleep(4)
            ranks.processes.append(tp_group._spawn_rank(1, world_size, port, config))

        threading.Thread(target=start_late, daemon=True).start()
        return ranks

    monkeypatch.setattr(tp_group, "spawn_local_ranks", ranks_that_start_late)
    config = tiny_tp2_config(collective_timeout_s=2)
    prompt = TINY_PREFIX[:50]
    plain = generate_and_close(tiny_engine(1, KVStoreConfig(prefix_caching=False)), prompt)
    engine = LLMEngine.from_config(config, KVStoreConfig(prefix_caching=False), progress=False)
    assert generate_and_close(engine, prompt).token_ids == plain.token_ids


def test_ranks_that_never_start_are_named_after_rank_start_timeout_s(monkeypatch):
    import workers.tp_group as tp_group

    monkeypatch.setattr(tp_group, "spawn_local_ranks", lambda world_size, port, config: tp_group.LocalRanks([]))
    config = tiny_tp2_config(rank_start_timeout_s=1)
    with pytest.raises(TimeoutError, match=r"ranks \[1\] did not start within rank_start_timeout_s \(1 s\)"):
        LLMEngine.from_config(config, KVStoreConfig(prefix_caching=False), progress=False)


def test_a_group_left_idle_longer_than_its_collective_timeout_still_serves():
    """Between steps the ranks wait with no timeout: before, they gave up after ``collective_timeout_s`` of an
    idle worker (here 2 s), and its next request failed with the group down."""
    config = tiny_tp2_config(collective_timeout_s=2)
    engine = LLMEngine.from_config(config, KVStoreConfig(prefix_caching=False), progress=False)
    prompt = TINY_PREFIX[:50]
    try:
        first = engine.generate([prompt], TINY_GREEDY)[0].token_ids
        time.sleep(4)
        assert engine.tp_group.ranks.ended() is None
        assert engine.generate([prompt], TINY_GREEDY)[0].token_ids == first
    finally:
        engine.close()


def test_a_rank_that_stops_taking_steps_fails_the_next_step_within_the_collective_timeout():
    """Rank 1 is alive but stuck (SIGSTOP: its sockets stay open): rank 0's next step header, sent on the
    between-steps group whose own timeout is a year, gives up after ``collective_timeout_s`` (2 s) instead of
    waiting for ever."""
    import os

    config = tiny_tp2_config(collective_timeout_s=2)
    engine = LLMEngine.from_config(config, KVStoreConfig(prefix_caching=False), progress=False)
    (rank,) = engine.tp_group.ranks.processes
    outcome: list[BaseException] = []

    def generate() -> None:
        try:
            engine.generate([TINY_PREFIX[:50]], TINY_GREEDY)
        except TensorParallelError as error:
            outcome.append(error)

    try:
        engine.generate([TINY_PREFIX[:50]], TINY_GREEDY)
        os.kill(rank.pid, signal.SIGSTOP)
        began = time.monotonic()
        stuck = threading.Thread(target=generate, daemon=True)
        stuck.start()
        stuck.join(timeout=30)
        assert not stuck.is_alive(), "rank 0 still waits for the stopped rank"
        assert time.monotonic() - began < 2 + 5
        assert outcome and "collective failed" in str(outcome[0])
    finally:
        rank.kill()
        engine.close()
