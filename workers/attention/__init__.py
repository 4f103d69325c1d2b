"""Attention over the paged KV cache: a small backend interface and its implementations."""

import os

from workers.attention.base import AttentionBackend, AttentionMetadata, LayerKVCache
from workers.attention.torch_ref import TorchReferenceBackend
from workers.engine_config import EngineConfigError

__all__ = ["AttentionBackend", "AttentionMetadata", "LayerKVCache", "TorchReferenceBackend", "make_backend"]


BACKENDS = ("torch", "triton")


def make_backend(name: str, device: str = "cpu") -> AttentionBackend:
    """``torch``: the reference (any device); ``triton``: paged kernels (CUDA, or the CPU under TRITON_INTERPRET=1)."""
    if name == "torch":
        return TorchReferenceBackend()
    if name == "triton":
        if not device.startswith("cuda") and os.environ.get("TRITON_INTERPRET") != "1":
            raise EngineConfigError(f"engine.attention_backend: triton runs on CUDA, not on {device} (use torch; "
                                    "TRITON_INTERPRET=1 runs the kernels on the CPU, slowly, for tests)")
        try:
            from workers.attention.triton_backend import TritonBackend
        except ImportError as error:
            raise EngineConfigError(f"engine.attention_backend: triton needs the triton package ({error}): "
                                    "pip install 'kvtier[gpu]'") from None
        return TritonBackend()
    raise ValueError(f"attention backend {name!r} is unknown (known: {', '.join(BACKENDS)})")
