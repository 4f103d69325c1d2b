"""Host lists to device tensors without making the host wait for the device."""

from __future__ import annotations

import torch


def upload(values: list, device: torch.device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """``values`` as a ``dtype`` tensor on ``device``. On CUDA the copy goes through pinned memory and does not
    block (the caching host allocator keeps the buffer until the copy has run); a plain ``torch.tensor(values,
    device="cuda")`` waits for the stream, i.e. for every kernel queued before it."""
    host = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
