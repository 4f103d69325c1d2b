"""Paged attention in Triton: one kernel for every chunk of a step (prefill over a cached prefix, a whole prompt,
a decode token, any mix), reading K/V straight from the block-major cache through the block table.

Grid: (chunk, query tile, KV head). A program takes ``BLOCK_Q`` consecutive query tokens of one chunk and the
``GROUP`` query heads that share one KV head, as ``ROWS`` = BLOCK_Q x GROUP rows (padded to a power of two), so
each K/V page is loaded once for the whole group (GQA). It walks the chunk's context ``TILE_N`` keys (several
pages, each key's block looked up in the block table) at a time up to the tile's last causal position, with an
online softmax (running max and sum, fp32 accumulator). Slots past the context are masked on load, so a page's
unused tail is never read into the sums (whatever it holds, NaN included).

Decode steps with long contexts and few programs (batch x KV heads below the GPU's width) split each context's
key tiles across ``num_splits`` programs (split-K): each writes its partial max, sum and accumulator, and a second
kernel combines them, so a batch-1 decode over 32k tokens uses the whole GPU rather than 8 of its SMs.

A whole prompt (no cached prefix) of at least ``sdpa_min_tokens`` tokens is attended by torch's
``scaled_dot_product_attention`` (FlashAttention on CUDA) over its own contiguous K/V instead, as transformers
does: the paged kernel skips such chunks. Steps mixing them with other chunks run both. A layer with a sliding
window attends every chunk in the paged kernel, which walks only each query tile's window of keys.

Runs on CUDA; with ``TRITON_INTERPRET=1`` it runs on the CPU (slowly), which is how the test suite checks it
against the torch reference on machines without a GPU. Speed work (split-K decode for long contexts, tuning)
belongs to the GPU fast path and is measured there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from workers.attention.base import AttentionMetadata, LayerKVCache, write_kv

_MIN_ROWS = 16  # tl.dot needs at least 16 rows on the GPU
_PREFILL_ROWS = 64
_MAX_SPLITS = 16
_PAGES_PER_SPLIT = 32  # split a decode context only where each split still walks this many pages
_TARGET_PROGRAMS = 128  # about one per SM of an H100 (132)
_KEYS_PER_TILE = 64  # keys per inner-loop iteration (4 pages of 16): fewer, larger steps over a long context
SDPA_MIN_TOKENS = 1024  # whole prompts this long go to torch's SDPA (flash); shorter ones stay in one launch
_NEVER = 2**31 - 1


class TritonBackend:
    def __init__(self, sdpa_min_tokens: int = SDPA_MIN_TOKENS) -> None:
        self.sdpa_min_tokens = sdpa_min_tokens

    def forward(
        self,
        query: torch.Tensor,  # [T, Hq, D], RoPE applied
        key: torch.Tensor,  # [T, Hkv, D], RoPE applied
        value: torch.Tensor,  # [T, Hkv, D]
        cache: LayerKVCache,
        meta: AttentionMetadata,
        scale: float,
        window: int = 0,
    ) -> torch.Tensor:  # [T, Hq, D]
        write_kv(cache, key, value, meta)
        dense = [] if window else dense_prompt_spans(meta, self.sdpa_min_tokens)
        out = paged_attention(query, cache, meta, scale, dense_from=self.sdpa_min_tokens if dense else _NEVER,
                              window=window)
        for start, end in dense:
            out[start:end] = causal_sdpa(query[start:end], key[start:end], value[start:end], scale)
        return out


def dense_prompt_spans(meta: AttentionMetadata, min_tokens: int) -> list[tuple[int, int]]:
    """Token spans of the chunks that are whole prompts (no cached prefix) of at least ``min_tokens`` tokens."""
    if meta.max_query_len < min_tokens:  # every decode step and most others: no per-chunk walk in every layer
        return []
    starts, ends = meta.query_start_loc[:-1], meta.query_start_loc[1:]
    return [(start, end) for start, end, context in zip(starts, ends, meta.context_lens)
            if end - start == context and context >= min_tokens]


def causal_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    """[S, Hq, D] queries over their own [S, Hkv, D] keys and values, causally: [S, Hq, D]."""
    out = F.scaled_dot_product_attention(query.transpose(0, 1)[None], key.transpose(0, 1)[None],
                                         value.transpose(0, 1)[None], is_causal=True, scale=scale, enable_gqa=True)
    return out[0].transpose(0, 1)  # [1, Hq, S, D] -> [S, Hq, D]


def paged_attention(query: torch.Tensor, cache: LayerKVCache, meta: AttentionMetadata, scale: float,
                    num_splits: int | None = None, dense_from: int = _NEVER, window: int = 0) -> torch.Tensor:
    """Every query token attends causally over its chunk's context, read from ``cache`` ([T, Hq, D] out).
    ``num_splits`` (decode-only steps): pages per context split across programs; None picks it.
    ``dense_from``: chunks that are whole prompts of at least this many tokens are skipped (their rows of the
    output are left for the caller). ``window`` > 0: each query sees only the last ``window`` positions up to
    its own (``AttentionBackend``)."""
    query = query if query.stride(-1) == 1 else query.contiguous()
    max_query_len = meta.max_query_len
    window = window or _NEVER
    if max_query_len == 1:
        splits = num_splits or _decode_splits(meta, cache.key.shape[1], cache.key.shape[2], window)
        if splits > 1:
            return _split_decode(query, cache, meta, scale, splits, window)
    out = torch.empty_like(query)
    group = query.shape[1] // cache.key.shape[2]
    block_q = 1 if max_query_len == 1 else max(1, _PREFILL_ROWS // group)
    grid = (meta.num_chunks, triton.cdiv(max_query_len, block_q), cache.key.shape[2])
    _paged_attention_kernel[grid](
        out, query, cache.key, cache.value, *meta.device_tables, scale, dense_from, window,
        *_strides(query, out, cache, meta),
        BLOCK_Q=block_q, ROWS=max(_MIN_ROWS, triton.next_power_of_2(block_q * group)),
        **_shape_constants(query, cache),
    )
    return out


def _decode_splits(meta: AttentionMetadata, page: int, num_kv_heads: int, window: int = _NEVER) -> int:
    """Enough splits to give the GPU about ``_TARGET_PROGRAMS`` programs, each still walking a fair run of pages."""
    programs = meta.num_chunks * num_kv_heads
    longest_pages = triton.cdiv(min(max(meta.context_lens), window), page)
    return max(1, min(_MAX_SPLITS, triton.cdiv(_TARGET_PROGRAMS, programs), longest_pages // _PAGES_PER_SPLIT))


def _split_decode(query: torch.Tensor, cache: LayerKVCache, meta: AttentionMetadata, scale: float,
                  splits: int, window: int) -> torch.Tensor:
    """Split-K decode: partial softmax state per (chunk, head, split), then one combine per (chunk, head)."""
    batch, num_heads, head_dim = meta.num_chunks, query.shape[1], query.shape[2]
    block_d = triton.next_power_of_2(head_dim)
    partial_acc = torch.empty(batch, num_heads, splits, block_d, dtype=torch.float32, device=query.device)
    partial_max = torch.empty(batch, num_heads, splits, dtype=torch.float32, device=query.device)
    partial_sum = torch.empty_like(partial_max)
    group = num_heads // cache.key.shape[2]
    _split_decode_kernel[(batch, cache.key.shape[2], splits)](
        partial_acc, partial_max, partial_sum, query, cache.key, cache.value, *meta.device_tables, scale, window,
        *_strides(query, query, cache, meta), NUM_HEADS=num_heads, SPLITS=splits,
        ROWS=max(_MIN_ROWS, triton.next_power_of_2(group)), **_shape_constants(query, cache),
    )
    out = torch.empty_like(query)
    _combine_splits_kernel[(batch, num_heads)](
        out, partial_acc, partial_max, partial_sum, out.stride(0), out.stride(1), SPLITS=splits,
        BLOCK_S=triton.next_power_of_2(splits), HEAD_DIM=head_dim, BLOCK_D=block_d,
    )
    return out


def _strides(query: torch.Tensor, out: torch.Tensor, cache: LayerKVCache, meta: AttentionMetadata) -> tuple:
    key, value = cache.key, cache.value
    return (query.stride(0), query.stride(1), out.stride(0), out.stride(1), key.stride(0), key.stride(1),
            key.stride(2), value.stride(0), value.stride(1), value.stride(2), meta.device_tables.block_table.stride(0))


def _shape_constants(query: torch.Tensor, cache: LayerKVCache) -> dict:
    head_dim = query.shape[2]
    return {"GROUP": query.shape[1] // cache.key.shape[2], "HEAD_DIM": head_dim,
            "BLOCK_D": triton.next_power_of_2(head_dim), "PAGE": cache.key.shape[1], "TILE_N": _KEYS_PER_TILE,
            "IEEE": query.dtype == torch.float32}  # fp32: exact products, not TF32


@triton.jit
def _attend_keys(
    q, query_pos, acc, row_max, row_sum, key_begin, key_end, window, table_row_ptr, k_ptr, v_ptr, kv_head,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, scale, dims, dim_ok,
    PAGE: tl.constexpr, TILE_N: tl.constexpr, IEEE: tl.constexpr,
):
    """Fold keys [key_begin, key_end) of one context into the rows' online softmax: (acc, max, sum). ``TILE_N``
    keys at a time (several pages: each key's block is looked up in the block table), so a long context takes
    few iterations and each dot product is ``ROWS x TILE_N``. A row sees the keys at its position and the
    ``window - 1`` before it."""
    offsets = tl.arange(0, TILE_N)
    start = key_begin
    while start < key_end:  # a while, not range(): Triton's interpreter cannot range over a loaded bound
        key_pos = start + offsets  # [TILE_N]
        valid = key_pos < key_end
        block = tl.load(table_row_ptr + key_pos // PAGE, mask=valid, other=0).to(tl.int64)  # [TILE_N]
        slot = key_pos % PAGE
        kv_mask = valid[:, None] & dim_ok[None, :]
        k = tl.load(k_ptr + block[:, None] * stride_kb + slot[:, None] * stride_ks + kv_head * stride_kh
                    + dims[None, :], mask=kv_mask, other=0.0)  # [TILE_N, BLOCK_D]
        v = tl.load(v_ptr + block[:, None] * stride_vb + slot[:, None] * stride_vs + kv_head * stride_vh
                    + dims[None, :], mask=kv_mask, other=0.0)
        if IEEE:
            scores = tl.dot(q, tl.trans(k), input_precision="ieee") * scale  # [ROWS, TILE_N]
        else:
            scores = tl.dot(q, tl.trans(k)) * scale
        visible = (key_pos[None, :] <= query_pos[:, None]) & (key_pos[None, :] > query_pos[:, None] - window)
        visible = visible & valid[None, :]
        scores = tl.where(visible, scores, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, 1))
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)  # rows that saw no key yet
        probs = tl.exp(scores - safe_max[:, None])
        rescale = tl.exp(row_max - safe_max)
        row_sum = row_sum * rescale + tl.sum(probs, 1)
        if IEEE:
            acc = acc * rescale[:, None] + tl.dot(probs.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * rescale[:, None] + tl.dot(probs.to(v.dtype), v)
        row_max = new_max
        start += TILE_N
    return acc, row_max, row_sum


@triton.jit
def _paged_attention_kernel(
    out_ptr, q_ptr, k_ptr, v_ptr, block_table_ptr, query_start_ptr, context_lens_ptr, scale, dense_from, window,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_table,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr,
    ROWS: tl.constexpr, PAGE: tl.constexpr, TILE_N: tl.constexpr, IEEE: tl.constexpr,
):
    chunk, tile, kv_head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    query_begin = tl.load(query_start_ptr + chunk)
    query_len = tl.load(query_start_ptr + chunk + 1) - query_begin
    context_len = tl.load(context_lens_ptr + chunk)
    not_by_sdpa = (query_len < context_len) | (query_len < dense_from)  # long whole prompts are the caller's
    if (tile * BLOCK_Q < query_len) & not_by_sdpa:
        rows = tl.arange(0, ROWS)
        token = tile * BLOCK_Q + rows // GROUP  # the row's query, within the chunk
        head = kv_head * GROUP + rows % GROUP
        row_ok = (rows < BLOCK_Q * GROUP) & (token < query_len)
        query_pos = context_len - query_len + token  # [ROWS] absolute positions
        dims = tl.arange(0, BLOCK_D)
        dim_ok = dims < HEAD_DIM
        q = tl.load(q_ptr + (query_begin + token)[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :],
                    mask=row_ok[:, None] & dim_ok[None, :], other=0.0)  # [ROWS, BLOCK_D]
        tile_first_pos = context_len - query_len + tile * BLOCK_Q
        keys_begin = tl.maximum(tile_first_pos - window + 1, 0)  # the tile's first query's window
        keys_end = tl.minimum(tile_first_pos + BLOCK_Q, context_len)  # exclusive
        acc, row_max, row_sum = _attend_keys(
            q, query_pos, tl.zeros([ROWS, BLOCK_D], tl.float32), tl.full([ROWS], float("-inf"), tl.float32),
            tl.zeros([ROWS], tl.float32), keys_begin, keys_end, window, block_table_ptr + chunk * stride_table,
            k_ptr, v_ptr,
            kv_head, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, scale, dims, dim_ok, PAGE,
            TILE_N, IEEE)
        result = acc / tl.where(row_sum == 0.0, 1.0, row_sum)[:, None]
        tl.store(out_ptr + (query_begin + token)[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :],
                 result.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])


@triton.jit
def _split_decode_kernel(
    acc_ptr, max_ptr, sum_ptr, q_ptr, k_ptr, v_ptr, block_table_ptr, query_start_ptr, context_lens_ptr, scale,
    window, stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_table,
    NUM_HEADS: tl.constexpr, SPLITS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, ROWS: tl.constexpr, PAGE: tl.constexpr, TILE_N: tl.constexpr, IEEE: tl.constexpr,
):
    """One decode token's GROUP heads over this split's share of the pages; partial state out (unnormalised)."""
    chunk, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    token = tl.load(query_start_ptr + chunk)
    context_len = tl.load(context_lens_ptr + chunk)
    rows = tl.arange(0, ROWS)
    head = kv_head * GROUP + rows % GROUP
    row_ok = rows < GROUP
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    q = tl.load(q_ptr + token * stride_qt + head[:, None] * stride_qh + dims[None, :],
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)  # [ROWS, BLOCK_D]
    first_key = tl.maximum(context_len - window, 0)  # the decode token's window
    tiles_per_split = tl.cdiv(tl.cdiv(context_len - first_key, TILE_N), SPLITS)  # splits walk whole key tiles
    key_begin = first_key + split * tiles_per_split * TILE_N
    query_pos = tl.zeros([ROWS], tl.int32) + context_len - 1
    acc, row_max, row_sum = _attend_keys(
        q, query_pos, tl.zeros([ROWS, BLOCK_D], tl.float32), tl.full([ROWS], float("-inf"), tl.float32),
        tl.zeros([ROWS], tl.float32), key_begin, tl.minimum(key_begin + tiles_per_split * TILE_N, context_len),
        window, block_table_ptr + chunk * stride_table, k_ptr, v_ptr, kv_head, stride_kb, stride_ks, stride_kh,
        stride_vb, stride_vs, stride_vh, scale, dims, dim_ok, PAGE, TILE_N, IEEE)
    state = (chunk * NUM_HEADS + head) * SPLITS + split  # [ROWS] index into [B, Hq, SPLITS]
    tl.store(max_ptr + state, row_max, mask=row_ok)
    tl.store(sum_ptr + state, row_sum, mask=row_ok)
    tl.store(acc_ptr + state[:, None] * BLOCK_D + dims[None, :], acc, mask=row_ok[:, None])


@triton.jit
def _combine_splits_kernel(
    out_ptr, acc_ptr, max_ptr, sum_ptr, stride_ot, stride_oh,
    SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s, over the splits that saw a key (M: their max)."""
    chunk, head = tl.program_id(0), tl.program_id(1)
    splits = tl.arange(0, BLOCK_S)
    split_ok = splits < SPLITS
    state = (chunk * tl.num_programs(1) + head) * SPLITS + splits  # [BLOCK_S]
    split_max = tl.load(max_ptr + state, mask=split_ok, other=float("-inf"))
    split_sum = tl.load(sum_ptr + state, mask=split_ok, other=0.0)
    dims = tl.arange(0, BLOCK_D)
    split_acc = tl.load(acc_ptr + state[:, None] * BLOCK_D + dims[None, :], mask=split_ok[:, None], other=0.0)
    overall = tl.max(split_max, 0)
    weight = tl.where(split_max == float("-inf"), 0.0, tl.exp(split_max - overall))  # [BLOCK_S]
    total = tl.sum(weight * split_sum, 0)
    result = tl.sum(weight[:, None] * split_acc, 0) / total  # [BLOCK_D]
    tl.store(out_ptr + chunk * stride_ot + head * stride_oh + dims, result.to(out_ptr.dtype.element_ty),
             mask=dims < HEAD_DIM)
