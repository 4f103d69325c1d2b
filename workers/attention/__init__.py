"""Attention over the paged KV cache: a small backend interface and its implementations."""

from workers.attention.base import AttentionBackend, AttentionMetadata, LayerKVCache
from workers.attention.torch_ref import TorchReferenceBackend

__all__ = ["AttentionBackend", "AttentionMetadata", "LayerKVCache", "TorchReferenceBackend", "make_backend"]


def make_backend(name: str) -> AttentionBackend:
    """The backend called ``name``; only ``torch`` exists until the Triton backend lands."""
    if name == "torch":
        return TorchReferenceBackend()
    raise ValueError(f"attention backend {name!r} is unknown (known: 'torch')")
