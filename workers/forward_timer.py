"""The time of a step's forward alone, for the cost model's prefill rate.

On CUDA the host clock would also count what the forward waited for on the GPU: tier copies (a CPU hit's
loads, spills, gathers for Redis) that the compute stream waits for before the forward. So the forward is
timed with events on the compute stream: the first is recorded after those waits were enqueued, so it fires
once they resolved. It is read without waiting, after the step read its sampled tokens back (by then both
events have fired). On the CPU the copies run before the forward starts, and the host clock times it.
"""

from __future__ import annotations

import time

import torch


class ForwardTimer:
    def __init__(self, device: torch.device) -> None:
        self._cuda = device.type == "cuda"
        self._began = 0.0
        self._host_seconds = 0.0
        self._events: tuple[torch.cuda.Event, torch.cuda.Event] | None = None

    def start(self) -> None:
        if self._cuda:
            self._events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            self._events[0].record()
        else:
            self._began = time.perf_counter()

    def stop(self) -> None:
        """Mark the forward's end (before its results are read back)."""
        if self._cuda:
            self._events[1].record()
        else:
            self._host_seconds = time.perf_counter() - self._began

    def seconds(self) -> float | None:
        """The forward's seconds; None if the GPU has not reached its end yet (nothing waits for it)."""
        if not self._cuda:
            return self._host_seconds
        start, end = self._events
        return start.elapsed_time(end) / 1e3 if end.query() else None
