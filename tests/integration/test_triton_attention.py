"""The Triton paged-attention kernel against the torch reference, on every kind of chunk a step can hold, and an
engine on the Triton backend against one on the reference. Without a GPU the kernel runs in Triton's
interpreter (``TRITON_INTERPRET=1``, set in conftest); on a GPU the same tests run it compiled."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

pytest.importorskip("triton")

from kvstore.config import CpuTierConfig, KVStoreConfig  # noqa: E402
from workers.attention.base import AttentionMetadata, LayerKVCache  # noqa: E402
from workers.attention.torch_ref import attend_paged as reference  # noqa: E402
from workers.attention.triton_backend import paged_attention  # noqa: E402
from workers.engine import LLMEngine  # noqa: E402
from workers.engine_config import EngineConfig, SchedulerConfig  # noqa: E402
from workers.sampling_params import SamplingParams  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BLOCK = 16


def step_inputs(chunks: list[tuple[int, int]], num_heads: int, num_kv_heads: int, head_dim: int, seed: int):
    """A random paged cache and a step of ``chunks`` (query_len, context_len), block tables shuffled; the
    slots no context covers hold NaN, so a kernel that reads them gives NaN."""
    gen = torch.Generator().manual_seed(seed)
    pages = [math.ceil(context / BLOCK) for _, context in chunks]
    num_blocks = sum(pages) + 3
    shape = (num_blocks, BLOCK, num_kv_heads, head_dim)
    key, value = torch.full(shape, float("nan")), torch.full(shape, float("nan"))
    order = torch.randperm(num_blocks, generator=gen)
    tables, starts, used = [], [0], 0
    for (query_len, context), count in zip(chunks, pages):
        table = order[used:used + count]
        used += count
        for position in range(context):  # the context's K/V, in the blocks its table names
            block, slot = table[position // BLOCK], position % BLOCK
            key[block, slot] = torch.randn(num_kv_heads, head_dim, generator=gen)
            value[block, slot] = torch.randn(num_kv_heads, head_dim, generator=gen)
        tables.append(table.to(DEVICE))
        starts.append(starts[-1] + query_len)
    query = torch.randn(starts[-1], num_heads, head_dim, generator=gen).to(DEVICE)
    table = torch.nn.utils.rnn.pad_sequence(tables, batch_first=True, padding_value=-1).to(torch.int32)
    meta = AttentionMetadata(starts, [c for _, c in chunks], table, torch.zeros(starts[-1], dtype=torch.long,
                             device=DEVICE), torch.zeros(starts[-1], dtype=torch.long, device=DEVICE))
    return query, LayerKVCache(key.to(DEVICE), value.to(DEVICE)), meta


MIXED = [(1, 1), (1, 15), (1, 16), (1, 17), (1, 40), (24, 24), (20, 50), (5, 37)]  # decode, prefill, prefix+chunk


@pytest.mark.parametrize("num_heads, num_kv_heads, head_dim", [(4, 4, 32), (4, 2, 32), (6, 2, 24), (8, 1, 16)])
def test_the_kernel_equals_the_reference_on_every_kind_of_chunk(num_heads, num_kv_heads, head_dim):
    query, cache, meta = step_inputs(MIXED, num_heads, num_kv_heads, head_dim, seed=num_heads + head_dim)
    scale = head_dim ** -0.5
    got = paged_attention(query, cache, meta, scale)
    assert not got.isnan().any()  # nothing past a context was read into the sums
    torch.testing.assert_close(got, reference(query, cache, meta, scale), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_splits", [1, 3, 8])
def test_decode_steps_match_whether_or_not_contexts_are_split(num_splits):
    """Split-K: a context's pages spread over programs (some splits of the short ones get no page at all)."""
    query, cache, meta = step_inputs([(1, n) for n in (3, 16, 33, 64, 300)], 8, 2, 32, seed=7)
    got = paged_attention(query, cache, meta, 0.2, num_splits=num_splits)
    torch.testing.assert_close(got, reference(query, cache, meta, 0.2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [1, 7, 16, 33])
def test_a_sliding_window_in_the_kernel_equals_the_reference(window):
    """Every kind of chunk, each query over its last ``window`` positions only (a tile's queries start their
    walks at the first one's window); decode contexts split or not."""
    query, cache, meta = step_inputs(MIXED, 8, 2, 32, seed=window)
    expected = reference(query, cache, meta, 0.2, window)
    torch.testing.assert_close(paged_attention(query, cache, meta, 0.2, window=window), expected, rtol=1e-5,
                               atol=1e-5)
    query, cache, meta = step_inputs([(1, n) for n in (3, 16, 40, 300)], 8, 2, 32, seed=window)
    expected = reference(query, cache, meta, 0.2, window)
    for num_splits in (1, 3):
        got = paged_attention(query, cache, meta, 0.2, num_splits=num_splits, window=window)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_long_whole_prompts_go_to_sdpa_and_the_kernel_takes_the_rest():
    """The backend's forward: the K/V of every token is written, then whole prompts of at least the threshold are
    attended by SDPA over their own K/V and every other chunk (short prompt, prefix + chunk, decode) by the
    kernel, which is told to skip the long ones."""
    from workers.attention.triton_backend import TritonBackend, dense_prompt_spans, paged_attention

    chunks = [(1, 40), (12, 12), (20, 50), (40, 40), (17, 17)]  # 40 and 17: whole prompts >= 17 tokens
    query, cache, meta = step_inputs(chunks, 8, 2, 32, seed=11)
    starts = meta.query_start_loc
    slots = [(int(meta.block_table[i, p // BLOCK]), p % BLOCK) for i, (q, c) in enumerate(chunks)
             for p in range(c - q, c)]  # where each new token's K/V goes: the forward writes it there again
    meta = dataclasses.replace(meta, slot_blocks=torch.tensor([b for b, _ in slots], device=DEVICE),
                               slot_offsets=torch.tensor([o for _, o in slots], device=DEVICE))
    key = torch.stack([cache.key[block, offset] for block, offset in slots])  # [T, Hkv, D]
    value = torch.stack([cache.value[block, offset] for block, offset in slots])
    assert dense_prompt_spans(meta, 17) == [(starts[3], starts[4]), (starts[4], starts[5])]
    skipped = paged_attention(query, cache, meta, 0.2, dense_from=17)
    got = TritonBackend(sdpa_min_tokens=17).forward(query, key, value, cache, meta, 0.2)
    expected = reference(query, cache, meta, 0.2)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(skipped[: starts[3]], expected[: starts[3]], rtol=1e-5, atol=1e-5)


def test_long_decode_contexts_in_a_small_batch_are_split_by_default():
    from workers.attention.triton_backend import _decode_splits

    _, _, long_meta = step_inputs([(1, 2048)], 4, 1, 16, seed=3)
    _, _, short_meta = step_inputs([(1, 100), (1, 90)], 4, 1, 16, seed=3)
    assert _decode_splits(long_meta, BLOCK, 1) == 4  # 128 pages: 4 splits of 32
    assert _decode_splits(short_meta, BLOCK, 1) == 1


def test_an_engine_on_the_triton_backend_generates_what_the_reference_does():
    prompts = [[(7 * i + j) % 250 + 3 for j in range(n)] for i, n in enumerate((5, 40, 70, 33))]
    prompts.append(prompts[2][:48] + [9, 8, 7])  # a cached prefix, then a new chunk after it
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    outputs = {}
    for backend in ("torch", "triton"):
        config = EngineConfig(attention_backend=backend, device=DEVICE,
                              scheduler=SchedulerConfig(max_num_batched_tokens=32))  # chunked prefill
        engine = LLMEngine.from_config(config, KVStoreConfig(cpu=CpuTierConfig(enabled=False)), progress=False)
        outputs[backend] = [c.token_ids for c in engine.generate(prompts, params)]
        outputs[backend].append(engine.generate([prompts[-1]], params)[0].token_ids)  # a GPU prefix-cache hit
    assert outputs["triton"] == outputs["torch"]


def test_a_windowed_model_on_the_triton_backend_generates_what_the_reference_does(tmp_path):
    """Mistral with a 40-token sliding window (``tests.hf_reference``): prompts past the window, a chunked
    prefill and a cached prefix longer than the window."""
    from tests.hf_reference import random_prompts, save_random_model

    model_dir = save_random_model("mistral-window", tmp_path / "model")
    prompts = random_prompts([45, 90], vocab_size=320, seed=4)
    prompts.append(prompts[1][:80] + [9, 8, 7])
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    outputs = {}
    for backend in ("torch", "triton"):
        config = EngineConfig(model=str(model_dir), attention_backend=backend, device=DEVICE,
                              scheduler=SchedulerConfig(max_num_batched_tokens=32))
        engine = LLMEngine.from_config(config, KVStoreConfig(cpu=CpuTierConfig(enabled=False)), progress=False)
        outputs[backend] = [c.token_ids for c in engine.generate(prompts[:2], params)]
        cached = engine.generate([prompts[2]], params)[0]
        assert cached.usage.cached_tokens.gpu == 80
        outputs[backend].append(cached.token_ids)
    assert outputs["triton"] == outputs["torch"]


def test_decode_graph_buckets():
    from workers.decode_graphs import decode_buckets

    assert decode_buckets(1) == [1]
    assert decode_buckets(3) == [1, 2, 3]
    assert decode_buckets(8) == [1, 2, 4, 8]
    assert decode_buckets(20) == [1, 2, 4, 8, 16, 20]
    assert decode_buckets(32) == [1, 2, 4, 8, 16, 24, 32]


def test_padded_static_decode_steps_generate_what_eager_steps_do():
    """The inputs a CUDA graph replays (persistent buffers, rows padded to a bucket, split-K sized for
    max_model_len), run eagerly here: same greedy tokens as plain steps, in batches that shrink as requests end,
    a batch too big for any bucket included."""
    prompts = [[(11 * i + j) % 250 + 3 for j in range(n)] for i, n in enumerate((9, 40, 23, 70, 17))]
    params = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in (3, 9, 6, 12, 5)]
    outputs, buckets = {}, None
    for static in (False, True):
        config = EngineConfig(attention_backend="triton", device=DEVICE, max_model_len=256)
        engine = LLMEngine.from_config(config, KVStoreConfig(cpu=CpuTierConfig(enabled=False)), progress=False)
        if static:
            engine.runner.enable_decode_graphs(max_batch=4, max_model_len=256, with_logits=True, capture=False)
        outputs[static] = [c.token_ids for c in engine.generate(prompts, params)]
        buckets = engine.runner.decode_graphs.steps_by_bucket if static else None
    assert outputs[True] == outputs[False]
    assert buckets[4] > 0 and buckets[2] > 0 and buckets[1] > 0  # 4 (3 of them padded), 2 and 1 rows ran
