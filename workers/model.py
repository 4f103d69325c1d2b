"""The Llama family (Llama 2/3, Mistral, Qwen2) over a paged, block-major KV cache.

Tokens of every sequence in a step are flattened into one batch of T tokens; attention finds each chunk's
context through ``AttentionMetadata``. Under tensor parallelism each rank builds the same model over its slice
(``ParallelContext``): its query and KV heads, its MLP features; the embedding and LM head are replicated. Parameter names follow transformers, except that q/k/v are merged into
``qkv_proj`` and gate/up into ``gate_up_proj`` (``load_weight`` routes checkpoint names to them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from workers.attention import AttentionBackend, AttentionMetadata, LayerKVCache
from workers.layers import ColumnParallelLinear, Embedding, RMSNorm, RowParallelLinear, WeightLoadError, copy_checked
from workers.model_config import ModelConfig
from workers.parallel import ParallelContext, Span
from workers.rope import RotaryEmbedding

# checkpoint projection name -> (merged module name, part index)
_MERGED_PROJECTIONS = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class Attention(nn.Module):
    def __init__(
        self, config: ModelConfig, backend: AttentionBackend, dtype: torch.dtype, device: str,
        parallel: ParallelContext, window: int = 0,
    ) -> None:
        """``window``: the keys each query sees, itself included (a sliding window); 0 is every key before it."""
        super().__init__()
        q_heads, kv_heads, head_dim = parallel.q_heads(config), parallel.kv_heads(config), config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = q_heads.size, kv_heads.size, head_dim
        self.scale = head_dim**-0.5
        q_rows = Span(q_heads.start * head_dim, q_heads.size * head_dim)
        kv_rows = Span(kv_heads.start * head_dim, kv_heads.size * head_dim)
        self.qkv_proj = ColumnParallelLinear(config.hidden_size, (q_rows, kv_rows, kv_rows), config.qkv_bias, dtype,
                                             device)
        self.o_proj = RowParallelLinear(q_rows, config.hidden_size, config.o_bias, dtype, device, parallel)
        self.rotary = RotaryEmbedding(config.rope, config.head_dim).to(device)
        self.backend = backend
        self.window = window

    def forward(
        self, hidden: torch.Tensor, positions: torch.Tensor, cache: LayerKVCache, meta: AttentionMetadata
    ) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        q, k, v = self.qkv_proj(hidden).split(self.qkv_proj.part_sizes, dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)  # [T, Hq, D]
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        q, k = self.rotary(positions, q, k)
        out = self.backend.forward(q, k, v, cache, meta, self.scale, self.window)  # [T, Hq, D]
        return self.o_proj(out.reshape(num_tokens, -1))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype, device: str, parallel: ParallelContext) -> None:
        super().__init__()
        features = parallel.even_span(config.intermediate_size)
        self.gate_up_proj = ColumnParallelLinear(config.hidden_size, (features, features), config.mlp_bias, dtype,
                                                 device)
        self.down_proj = RowParallelLinear(features, config.hidden_size, config.mlp_bias, dtype, device, parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(
        self, config: ModelConfig, backend: AttentionBackend, dtype: torch.dtype, device: str,
        parallel: ParallelContext, window: int = 0,
    ) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)
        self.self_attn = Attention(config, backend, dtype, device, parallel, window)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)
        self.mlp = MLP(config, dtype, device, parallel)

    def forward(
        self, hidden: torch.Tensor, positions: torch.Tensor, cache: LayerKVCache, meta: AttentionMetadata
    ) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), positions, cache, meta)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class LlamaBody(nn.Module):
    def __init__(
        self, config: ModelConfig, backend: AttentionBackend, dtype: torch.dtype, device: str, parallel: ParallelContext
    ) -> None:
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, dtype, device)
        self.layers = nn.ModuleList(
            DecoderLayer(config, backend, dtype, device, parallel, window) for window in config.attention_windows
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)


class LlamaForCausalLM(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        backend: AttentionBackend,
        dtype: torch.dtype,
        device: str,
        parallel: ParallelContext | None = None,
    ) -> None:
        super().__init__()
        parallel = parallel or ParallelContext()
        self.config = config
        self.model = LlamaBody(config, backend, dtype, device, parallel)
        self.lm_head = ColumnParallelLinear(config.hidden_size, (Span(0, config.vocab_size),), False, dtype, device)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.inference_mode()
    def forward(
        self,
        token_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        kv_cache: torch.Tensor,  # [num_blocks, num_layers, 2, block_size, Hkv, D]
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [T, hidden]
        hidden = self.model.embed_tokens(token_ids)
        for index, layer in enumerate(self.model.layers):
            cache = LayerKVCache(kv_cache[:, index, 0], kv_cache[:, index, 1])
            hidden = layer(hidden, positions, cache, meta)
        return self.model.norm(hidden)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [S, hidden] -> [S, vocab] fp32
        return self.lm_head(hidden).float()

    def expected_weight_keys(self) -> set[str]:
        """What a complete checkpoint fills: one key per parameter, one per part of a merged projection."""
        keys = {name for name, _ in self.named_parameters()}  # a tied lm_head appears once, as the embedding
        for module_name, module in self.named_modules():
            if isinstance(module, ColumnParallelLinear) and len(module.part_sizes) > 1:
                for param_name in ("weight", "bias") if module.bias is not None else ("weight",):
                    keys.discard(f"{module_name}.{param_name}")
                    keys.update(f"{module_name}.{param_name}[{part}]" for part in range(len(module.part_sizes)))
        return keys

    @torch.inference_mode()
    def load_weight(self, name: str, tensor: torch.Tensor) -> str | None:
        """Copy one checkpoint tensor into place; returns the key it filled (see ``expected_weight_keys``), or None."""
        if name.endswith(_IGNORED_SUFFIXES) or (name == "lm_head.weight" and self.config.tie_word_embeddings):
            return None
        module_path, _, param_name = name.rpartition(".")
        parent, _, leaf = module_path.rpartition(".")
        if leaf in _MERGED_PROJECTIONS:
            merged, part = _MERGED_PROJECTIONS[leaf]
            self._submodule(f"{parent}.{merged}", name).load(param_name, part, tensor, name)
            return f"{parent}.{merged}.{param_name}[{part}]"
        module = self._submodule(module_path, name)
        if isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
            module.load(param_name, 0, tensor, name)
            return name
        try:
            param = self.get_parameter(name)
        except AttributeError as error:
            raise WeightLoadError(f"{name}: no such parameter in a {self.config.model_type} model") from error
        copy_checked(param.data, tensor, name)
        return name

    def _submodule(self, path: str, name: str) -> nn.Module:
        try:
            return self.get_submodule(path)
        except AttributeError as error:
            raise WeightLoadError(f"{name}: no such parameter in a {self.config.model_type} model") from error
