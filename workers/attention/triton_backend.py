"""Paged attention in Triton: one kernel for every chunk of a step (prefill over a cached prefix, a whole prompt,
a decode token, any mix), reading K/V straight from the block-major cache through the block table.

Grid: (chunk, query tile, KV head). A program takes ``BLOCK_Q`` consecutive query tokens of one chunk and the
``GROUP`` query heads that share one KV head, as ``ROWS`` = BLOCK_Q x GROUP rows (padded to a power of two), so
each K/V page is loaded once for the whole group (GQA). It walks the chunk's block table one page
(``block_size`` tokens) at a time up to the tile's last causal position, with an online softmax (running max
and sum, fp32 accumulator). Slots past the context are masked on load, so a page's unused tail is never read
into the sums (whatever it holds, NaN included).

Runs on CUDA; with ``TRITON_INTERPRET=1`` it runs on the CPU (slowly), which is how the test suite checks it
against the torch reference on machines without a GPU. Speed work (split-K decode for long contexts, tuning)
belongs to the GPU fast path and is measured there.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from workers.attention.base import AttentionMetadata, LayerKVCache, write_kv

_MIN_ROWS = 16  # tl.dot needs at least 16 rows on the GPU
_PREFILL_ROWS = 64


class TritonBackend:
    def forward(
        self,
        query: torch.Tensor,  # [T, Hq, D], RoPE applied
        key: torch.Tensor,  # [T, Hkv, D], RoPE applied
        value: torch.Tensor,  # [T, Hkv, D]
        cache: LayerKVCache,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # [T, Hq, D]
        write_kv(cache, key, value, meta)
        return paged_attention(query, cache, meta, scale)


def paged_attention(query: torch.Tensor, cache: LayerKVCache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Every query token attends causally over its chunk's context, read from ``cache`` ([T, Hq, D] out)."""
    query = query if query.stride(-1) == 1 else query.contiguous()
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads = cache.key.shape[2]
    group = num_heads // num_kv_heads
    tables = meta.device_tables
    max_query_len = max(b - a for a, b in zip(meta.query_start_loc, meta.query_start_loc[1:]))
    block_q = 1 if max_query_len == 1 else max(1, _PREFILL_ROWS // group)
    out = torch.empty_like(query)
    grid = (meta.num_chunks, triton.cdiv(max_query_len, block_q), num_kv_heads)
    _paged_attention_kernel[grid](
        out, query, cache.key, cache.value, tables.block_table, tables.query_start, tables.context_lens, scale,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        cache.key.stride(0), cache.key.stride(1), cache.key.stride(2),
        cache.value.stride(0), cache.value.stride(1), cache.value.stride(2), tables.block_table.stride(0),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_Q=block_q,
        ROWS=max(_MIN_ROWS, triton.next_power_of_2(block_q * group)), PAGE=cache.key.shape[1],
        IEEE=query.dtype == torch.float32,
    )
    return out


@triton.jit
def _paged_attention_kernel(
    out_ptr, q_ptr, k_ptr, v_ptr, block_table_ptr, query_start_ptr, context_lens_ptr, scale,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_table,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr,
    ROWS: tl.constexpr, PAGE: tl.constexpr, IEEE: tl.constexpr,
):
    chunk, tile, kv_head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    query_begin = tl.load(query_start_ptr + chunk)
    query_len = tl.load(query_start_ptr + chunk + 1) - query_begin
    if tile * BLOCK_Q < query_len:
        context_len = tl.load(context_lens_ptr + chunk)
        rows = tl.arange(0, ROWS)
        token = tile * BLOCK_Q + rows // GROUP  # the row's query, within the chunk
        head = kv_head * GROUP + rows % GROUP
        row_ok = (rows < BLOCK_Q * GROUP) & (token < query_len)
        query_pos = context_len - query_len + token  # [ROWS] absolute positions
        dims = tl.arange(0, BLOCK_D)
        dim_ok = dims < HEAD_DIM
        q = tl.load(q_ptr + (query_begin + token)[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :],
                    mask=row_ok[:, None] & dim_ok[None, :], other=0.0)  # [ROWS, BLOCK_D]
        row_max = tl.full([ROWS], float("-inf"), tl.float32)
        row_sum = tl.zeros([ROWS], tl.float32)
        acc = tl.zeros([ROWS, BLOCK_D], tl.float32)
        keys_end = tl.minimum(context_len - query_len + (tile + 1) * BLOCK_Q, context_len)  # exclusive
        slots = tl.arange(0, PAGE)
        num_pages = tl.cdiv(keys_end, PAGE)
        page = 0
        while page < num_pages:  # a while, not range(): Triton's interpreter cannot range over a loaded bound
            block = tl.load(block_table_ptr + chunk * stride_table + page).to(tl.int64)
            key_pos = page * PAGE + slots  # [PAGE]
            kv_mask = (key_pos < context_len)[:, None] & dim_ok[None, :]
            k = tl.load(k_ptr + block * stride_kb + slots[:, None] * stride_ks + kv_head * stride_kh + dims[None, :],
                        mask=kv_mask, other=0.0)  # [PAGE, BLOCK_D]
            v = tl.load(v_ptr + block * stride_vb + slots[:, None] * stride_vs + kv_head * stride_vh + dims[None, :],
                        mask=kv_mask, other=0.0)
            if IEEE:
                scores = tl.dot(q, tl.trans(k), input_precision="ieee") * scale  # [ROWS, PAGE]
            else:
                scores = tl.dot(q, tl.trans(k)) * scale
            visible = (key_pos[None, :] <= query_pos[:, None]) & (key_pos < context_len)[None, :]
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
            page += 1
        result = acc / tl.where(row_sum == 0.0, 1.0, row_sum)[:, None]
        tl.store(out_ptr + (query_begin + token)[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :],
                 result.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])
