"""Checking that GPU code queues its work without making the host wait."""

from __future__ import annotations

import torch


def no_host_sync(fn):
    """``fn()`` under ``torch.cuda.set_sync_debug_mode("error")``: a call that synchronises the host raises."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        return fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
