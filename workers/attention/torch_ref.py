"""Reference attention over the paged cache in plain torch: one SDPA call per chunk.

Slow but simple and exact; every faster backend is tested against it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from workers.attention.base import AttentionMetadata, LayerKVCache, write_kv


class TorchReferenceBackend:
    def forward(
        self,
        query: torch.Tensor,  # [T, Hq, D]
        key: torch.Tensor,  # [T, Hkv, D]
        value: torch.Tensor,  # [T, Hkv, D]
        cache: LayerKVCache,
        meta: AttentionMetadata,
        scale: float,
        window: int = 0,
    ) -> torch.Tensor:
        write_kv(cache, key, value, meta)
        return attend_paged(query, cache, meta, scale, window)


def attend_paged(query: torch.Tensor, cache: LayerKVCache, meta: AttentionMetadata, scale: float,
                 window: int = 0) -> torch.Tensor:
    """Each chunk's queries ([T, Hq, D]) over its context as the cache holds it: one SDPA call per chunk.
    ``window``: see ``AttentionBackend``."""
    out = torch.empty_like(query)
    for i in range(meta.num_chunks):
        start, end = meta.query_start_loc[i], meta.query_start_loc[i + 1]
        table = meta.block_table[i, : -(-meta.context_lens[i] // cache.key.shape[1])]  # [blocks of the context]
        keys = _gather_context(cache.key, table, meta.context_lens[i])
        values = _gather_context(cache.value, table, meta.context_lens[i])
        out[start:end] = _attend(query[start:end], keys, values, scale, window)
    return out


def _gather_context(cache: torch.Tensor, block_table: torch.Tensor, context_len: int) -> torch.Tensor:
    blocks = cache[block_table]  # [num_blocks_seq, block_size, Hkv, D]
    return blocks.reshape(-1, *blocks.shape[2:])[:context_len]  # [context_len, Hkv, D]


def _attend(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float,
            window: int = 0) -> torch.Tensor:
    """Causal attention of the last ``q_len`` positions of a context over all of it (or over their windows)."""
    q_len, num_heads, _ = query.shape
    ctx_len, num_kv_heads, _ = keys.shape
    groups = num_heads // num_kv_heads
    q = query.transpose(0, 1)[None]  # [1, Hq, q_len, D]
    k = keys.transpose(0, 1).repeat_interleave(groups, dim=0)[None]  # [1, Hq, ctx_len, D]
    v = values.transpose(0, 1).repeat_interleave(groups, dim=0)[None]
    windowed = 0 < window < ctx_len
    if q_len == 1 and not windowed:
        out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    elif q_len == ctx_len and not windowed:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    else:
        query_pos = torch.arange(ctx_len - q_len, ctx_len, device=query.device)[:, None]
        key_pos = torch.arange(ctx_len, device=query.device)[None, :]
        mask = key_pos <= query_pos  # [q_len, ctx_len]
        if windowed:
            mask &= key_pos > query_pos - window
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out[0].transpose(0, 1)  # [q_len, Hq, D]
