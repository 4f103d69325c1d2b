"""Engine behaviour on the built-in tiny model: sampling seeds, stops, aborts, validation, async streaming."""

from __future__ import annotations

import asyncio

import pytest

from workers.async_engine import AsyncEngine, EngineFailed
from workers.engine import LLMEngine
from workers.engine_config import CacheConfig, EngineConfig, EngineConfigError
from workers.presets import EOS_ID
from workers.sampling_params import SamplingParams
from workers.sequence import FinishReason
from workers.validation import InvalidRequestError

SAMPLED = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)


@pytest.fixture(scope="module")
def engine() -> LLMEngine:
    return LLMEngine.from_config(EngineConfig(model="tiny", cache=CacheConfig(num_blocks=256)), progress=False)


def pool_is_full(engine: LLMEngine) -> bool:
    return engine.block_pool.num_free == engine.block_pool.num_blocks


def test_same_seed_same_tokens_alone_or_in_a_batch(engine):
    alone = engine.generate(["The same seed"], SAMPLED)[0].token_ids
    others = [SamplingParams(max_tokens=20, temperature=1.3, seed=s, ignore_eos=True) for s in range(5)]
    batch = engine.generate(["x" * 40, "The same seed", "y", "z" * 100, "w"], [others[0], SAMPLED, *others[1:4]])
    assert batch[1].token_ids == alone
    different_seed = engine.generate(["The same seed"], SamplingParams(**{**SAMPLED.__dict__, "seed": 99}))
    assert different_seed[0].token_ids != alone


def test_unseeded_requests_differ_from_each_other(engine):
    params = SamplingParams(max_tokens=16, temperature=1.0, ignore_eos=True)
    first, second = engine.generate(["same prompt", "same prompt"], params)
    assert first.token_ids != second.token_ids


def test_an_unseeded_request_tells_the_seed_it_drew_which_repeats_its_tokens(engine):
    import dataclasses

    params = SamplingParams(max_tokens=16, temperature=1.0, ignore_eos=True)
    (drawn,) = engine.generate(["same prompt"], params)
    assert drawn.seed is not None
    (again,) = engine.generate(["same prompt"], dataclasses.replace(params, seed=drawn.seed))
    assert again.token_ids == drawn.token_ids and again.seed == drawn.seed
    assert engine.generate(["same prompt"], SamplingParams(max_tokens=4, temperature=0))[0].seed is None


def test_finished_requests_return_every_block(engine):
    engine.generate(["a" * 50, "b" * 3], SamplingParams(max_tokens=5))
    assert pool_is_full(engine) and not engine.has_unfinished()


def test_abort_frees_blocks_at_once_and_reports_abort(engine):
    engine.add_request("long", "c" * 100, SamplingParams(max_tokens=200, ignore_eos=True))
    engine.add_request("short", "d", SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    engine.step()
    engine.step()
    assert not pool_is_full(engine)
    assert engine.abort("long") is True
    assert engine.abort("long") is False and engine.abort("unknown") is False
    remaining = engine.run_to_completion(["short"])
    assert remaining[0].finish_reason is FinishReason.LENGTH and remaining[0].usage.completion_tokens == 3
    assert pool_is_full(engine)


def test_the_aborted_request_gets_a_final_output(engine):
    engine.add_request("gone", "e" * 20, SamplingParams(max_tokens=50))
    engine.step()
    engine.abort("gone")
    (final,) = [o for o in engine.step() if o.request_id == "gone"]
    assert final.finished and final.finish_reason is FinishReason.ABORT and final.usage.completion_tokens == 1


@pytest.mark.parametrize(
    "prompt, params, field",
    [
        ("", SamplingParams(), "prompt"),
        ([], SamplingParams(), "prompt_token_ids"),
        ([1, 100_000], SamplingParams(), "prompt_token_ids[1]"),
        ("hi", SamplingParams(max_tokens=5000), "max_tokens"),
        ("hi", SamplingParams(max_tokens=0), "max_tokens"),
        ("hi", SamplingParams(temperature=-1), "temperature"),
        ("hi", SamplingParams(top_p=0), "top_p"),
        ("hi", SamplingParams(top_k=-5), "top_k"),
        ("hi", SamplingParams(temperature=float("nan")), "temperature"),
    ],
)
def test_invalid_requests_get_a_typed_error_and_the_engine_keeps_serving(engine, prompt, params, field):
    engine.add_request("running", "keep going", SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    with pytest.raises(InvalidRequestError) as caught:
        engine.add_request("bad", prompt, params)
    assert caught.value.field == field
    (done,) = engine.run_to_completion(["running"])
    assert len(done.token_ids) == 6 and pool_is_full(engine)


def test_a_duplicate_request_id_is_rejected(engine):
    engine.add_request("dup", "x", SamplingParams(max_tokens=2))
    with pytest.raises(InvalidRequestError, match="request_id"):
        engine.add_request("dup", "y", SamplingParams(max_tokens=2))
    engine.run_to_completion(["dup"])


def test_stop_token_ids_and_eos_finish_with_stop(engine):
    greedy = engine.generate(["stop here"], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0]
    third = greedy.token_ids[2]
    stopped = engine.generate(["stop here"], SamplingParams(max_tokens=10, temperature=0, stop_token_ids=(third,)))
    first_hit = greedy.token_ids.index(third)
    assert stopped[0].token_ids == greedy.token_ids[: first_hit + 1]
    assert stopped[0].finish_reason is FinishReason.STOP
    # Same seed, same draws: the run that ignores EOS shows where the one that honours it must stop.
    past_eos = engine.generate([[1, 2, 3]], SamplingParams(max_tokens=400, temperature=1.0, seed=0, ignore_eos=True))
    assert EOS_ID in past_eos[0].token_ids, "seed 0 no longer reaches EOS within 400 tokens: pick another seed"
    first_eos = past_eos[0].token_ids.index(EOS_ID)
    (at_eos,) = engine.generate([[1, 2, 3]], SamplingParams(max_tokens=400, temperature=1.0, seed=0))
    assert at_eos.token_ids == past_eos[0].token_ids[: first_eos + 1]
    assert at_eos.finish_reason is FinishReason.STOP and past_eos[0].finish_reason is FinishReason.LENGTH


def test_stop_strings_cut_the_text(engine):
    full = engine.generate([[72, 105]], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))[0]
    printable = [i for i, ch in enumerate(full.text) if ch.isprintable() and ch.strip()]
    assert printable, f"greedy text has nothing to stop on: {full.text!r}"
    stop = full.text[printable[len(printable) // 2]]
    cut = engine.generate([[72, 105]], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, stop=(stop,)))
    assert cut[0].finish_reason is FinishReason.STOP
    assert cut[0].text == full.text[: full.text.index(stop)]


def test_a_max_model_len_beyond_the_model_is_a_config_error():
    with pytest.raises(EngineConfigError, match="engine.max_model_len: 100000 exceeds"):
        LLMEngine.from_config(EngineConfig(model="tiny", max_model_len=100_000), progress=False)


def test_max_model_len_finishes_with_length():
    engine = LLMEngine.from_config(EngineConfig(model="tiny", max_model_len=24), progress=False)
    with pytest.raises(InvalidRequestError, match="max_model_len 24"):
        engine.add_request("too-long", [5] * 20, SamplingParams(max_tokens=5))
    (done,) = engine.generate([[5] * 20], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    assert done.finish_reason is FinishReason.LENGTH and len(done.token_ids) == 4


def test_async_streams_match_the_synchronous_engine(engine):
    params = [SamplingParams(max_tokens=n, temperature=0.8, seed=n, ignore_eos=True) for n in (5, 9, 14)]
    prompts = ["first", "second prompt", "third " * 10]
    expected = [c.token_ids for c in engine.generate(prompts, params)]

    async def stream(async_engine, index):
        tokens, finals = [], []
        async for output in async_engine.generate(f"a{index}", prompts[index], params[index]):
            tokens += output.new_token_ids
            finals.append(output.finished)
        return tokens, finals

    async def main():
        async_engine = AsyncEngine(engine)
        return await asyncio.gather(*(stream(async_engine, i) for i in range(3)))

    results = asyncio.run(main())
    assert [tokens for tokens, _ in results] == expected
    assert all(finals[-1] and not any(finals[:-1]) for _, finals in results)
    assert pool_is_full(engine)


def test_async_validation_errors_raise_at_once_and_a_cancelled_stream_aborts(engine):
    async def main():
        async_engine = AsyncEngine(engine)
        with pytest.raises(InvalidRequestError, match="top_p"):
            async for _ in async_engine.generate("bad", "x", SamplingParams(top_p=2.0)):
                pass
        stream = async_engine.generate("left", "y" * 30, SamplingParams(max_tokens=500, ignore_eos=True))
        first = await stream.__anext__()
        await stream.aclose()  # the client went away
        while engine.has_unfinished():
            await asyncio.sleep(0.01)
        return first

    first = asyncio.run(main())
    assert first.new_token_ids and not first.finished
    assert pool_is_full(engine)



def test_outputs_a_stream_has_not_taken_come_as_one_with_every_token_and_character_in_order(engine):
    params = SamplingParams(max_tokens=24, temperature=0.9, seed=5, ignore_eos=True, stop=("never",), logprobs=2)
    expected = engine.generate(["slow consumer"], params)[0]

    async def main():
        async_engine = AsyncEngine(engine)
        stream = async_engine.generate("slow", "slow consumer", params)
        first = await stream.__anext__()
        while engine.has_unfinished():  # the steps go on while this consumer takes nothing
            await asyncio.sleep(0.01)
        return first, [output async for output in stream]

    first, rest = asyncio.run(main())
    assert not first.finished and len(rest) == 1 and rest[0].finished
    assert rest[0].finish_reason is FinishReason.LENGTH and rest[0].usage.completion_tokens == 24
    assert list(first.new_token_ids + rest[0].new_token_ids) == expected.token_ids
    assert first.new_text + rest[0].new_text == expected.text
    assert list(first.logprobs + rest[0].logprobs) == expected.logprobs and rest[0].seed == 5


def test_a_failed_step_reaches_a_stream_after_the_tokens_it_had_not_taken(engine):
    params = SamplingParams(max_tokens=50, temperature=0, ignore_eos=True)

    async def main():
        async_engine = AsyncEngine(engine)
        stream = async_engine.generate("fails", [5, 6, 7], params)
        first = await stream.__anext__()
        while engine.stats.generated_tokens < generated_before + 4:  # tokens put, not taken
            await asyncio.sleep(0.005)
        async_engine.fail_next_step_for_test(RuntimeError("a step raised (test)"))
        while async_engine.failed is None:
            await asyncio.sleep(0.005)
        taken = list(first.new_token_ids)
        with pytest.raises(EngineFailed, match="a step raised"):
            async for output in stream:
                taken += output.new_token_ids
        return taken

    generated_before = engine.stats.generated_tokens
    taken = asyncio.run(main())
    produced = engine.stats.generated_tokens - generated_before
    engine.abort("fails")  # the failed step left it in the engine: its blocks go back before the next test
    engine.step()
    assert pool_is_full(engine)
    assert 4 <= len(taken) == produced < 50
    assert taken == engine.generate([[5, 6, 7]], params)[0].token_ids[:produced]

def test_step_time_is_split_into_host_work_and_the_wait_for_sampled_tokens(engine):
    before = engine.stats.step_seconds
    engine.generate([[5, 6, 7]], SamplingParams(max_tokens=4, ignore_eos=True))
    step_seconds = engine.stats.step_seconds - before
    assert step_seconds > 0
    assert 0 <= engine.stats.token_wait_seconds <= engine.stats.step_seconds


def test_a_burst_sharing_a_new_prefix_computes_it_once_with_the_tokens_of_an_uncached_run():
    """16 requests on one 2,000-token prefix nothing caches, submitted together: the first computes it, the
    others wait a step and compute only their 32-token questions (before: the second one, admitted beside the
    first, computed the prefix again). Seeded sampling: the same tokens as each request alone, without caches."""
    import random

    from kvstore.config import KVStoreConfig

    rng = random.Random(8)
    prefix = [rng.randrange(3, 250) for _ in range(2000)]
    prompts = [prefix + [rng.randrange(3, 250) for _ in range(32)] for _ in range(16)]
    params = [SamplingParams(max_tokens=4, temperature=0.9, seed=i, ignore_eos=True) for i in range(16)]
    engine = LLMEngine.from_config(EngineConfig(model="tiny", cache=CacheConfig(num_blocks=512)), progress=False)
    completions = engine.generate(prompts, params)
    assert engine.stats.computed_tokens == 2032 + 15 * 32 + 16 * 3  # the prefix once, every question, decodes
    assert [c.usage.cached_tokens.gpu for c in completions] == [0] + [2000] * 15
    uncached = LLMEngine.from_config(EngineConfig(model="tiny", cache=CacheConfig(num_blocks=512)),
                                     KVStoreConfig(prefix_caching=False), progress=False)
    assert [c.token_ids for c in completions] == [uncached.generate([p], sp)[0].token_ids
                                                  for p, sp in zip(prompts, params)]


def test_a_dropped_engine_is_freed_at_once_with_its_kv_cache():
    """No reference cycle holds an engine with tiers: dropped, it goes (and its KV cache, 2 GiB of address space
    on the CPU by default, GPU memory on CUDA) without waiting for the garbage collector. Before, the tiers
    held the engine's bound methods: a test process kept a dozen pools and could no longer fork."""
    import gc
    import weakref

    gc.collect()
    gc.disable()
    try:
        dropped = LLMEngine.from_config(EngineConfig(model="tiny", cache=CacheConfig(num_blocks=64)), progress=False)
        assert dropped.tiers is not None  # the default CPU tier
        dropped.generate([[5, 6, 7] * 20], SamplingParams(max_tokens=3))
        engine_ref, cache_ref = weakref.ref(dropped), weakref.ref(dropped.runner.kv_cache)
        del dropped
        assert engine_ref() is None and cache_ref() is None
    finally:
        gc.enable()


def test_the_cli_penalty_flags_give_the_engines_penalized_tokens(engine):
    import json
    import subprocess
    import sys
    from pathlib import Path

    flags = {"--repetition-penalty": 1.5, "--presence-penalty": 1.0, "--frequency-penalty": 0.5}
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, repetition_penalty=1.5,
                            presence_penalty=1.0, frequency_penalty=0.5)
    command = [str(Path(sys.executable).parent / "kvtier"), "generate", "--model", "tiny", "--prompt-token-ids",
               "5,6,7,8,5,6,7,8", "--max-tokens", "16", "--temperature", "0", "--ignore-eos", "--json", "--quiet"]
    done = subprocess.run(command + [str(part) for flag in flags.items() for part in flag], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    penalized = engine.generate([[5, 6, 7, 8] * 2], params)[0].token_ids
    assert json.loads(done.stdout)["token_ids"] == penalized
    assert penalized != engine.generate([[5, 6, 7, 8] * 2], SamplingParams(max_tokens=16, temperature=0,
                                                                         ignore_eos=True))[0].token_ids


def test_min_tokens_masks_the_stop_token_ids_until_the_output_holds_that_many(engine):
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    (first,) = engine.generate([[9, 10, 11]], greedy)[0].token_ids[:1]
    stopped = engine.generate([[9, 10, 11]], SamplingParams(**{**greedy.__dict__, "stop_token_ids": (first,)}))[0]
    assert stopped.token_ids == [first] and stopped.finish_reason == FinishReason.STOP
    held = engine.generate([[9, 10, 11]], SamplingParams(**{**greedy.__dict__, "stop_token_ids": (first,),
                                                            "min_tokens": 3}))[0]
    assert len(held.token_ids) >= 3 and first not in held.token_ids[:3]
    assert held.finish_reason == (FinishReason.STOP if first in held.token_ids else FinishReason.LENGTH)


def test_the_cli_streams_one_prompts_text_as_the_json_has_it():
    import json
    import subprocess
    import sys
    from pathlib import Path

    kvtier = [str(Path(sys.executable).parent / "kvtier"), "generate", "--model", "tiny", "--prompt", "Stream me",
              "--max-tokens", "24", "--temperature", "0", "--ignore-eos", "--quiet"]
    streamed = subprocess.run(kvtier + ["--stream"], capture_output=True, timeout=120)
    whole = subprocess.run(kvtier + ["--json"], capture_output=True, text=True, timeout=120)
    assert streamed.returncode == 0 and whole.returncode == 0, streamed.stderr + whole.stderr.encode()
    assert streamed.stdout.decode() == json.loads(whole.stdout)["text"] + "\n"
    refused = subprocess.run(kvtier + ["--stream", "--json"], capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "stream: --stream takes one prompt, and not --json" in refused.stderr
