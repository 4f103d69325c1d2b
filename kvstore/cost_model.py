"""Fetch or recompute? A per-tier decision from measured rates. Pure Python.

The model keeps exponentially weighted averages of the prefill rate and of each tier's effective transfer
rate (bytes/s over whole calls, so per-call latency is folded in). Fetching n blocks costs
``n * block_bytes / rate``. Recomputing them depends on where they sit: a token at position p attends to p + 1
keys, so the blocks at 30k-32k of a prompt cost far more than its first ones. With the model's ``PrefillWork``
the prefill rate is measured in FLOP/s over whole steps (their tokens at their positions) and recomputing
blocks costs their FLOPs over that rate; without it, ``n * block_tokens`` over the measured tokens/s. With no
measurement yet, fetching is assumed to win (the first fetches measure the tier).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

_WEIGHT = 0.2  # of the newest sample in each average


@dataclass
class _Average:
    value: float | None = None

    def add(self, sample: float) -> None:
        self.value = sample if self.value is None else (1 - _WEIGHT) * self.value + _WEIGHT * sample


@dataclass(frozen=True)
class PrefillWork:
    """The FLOPs of computing prompt tokens: each token multiplies by the layers' weights once (``per_token``)
    and attends to every key up to its own position (``per_attended`` for each query-key pair)."""

    per_token: float  # 2 x the weights of every layer (the LM head runs for sampled tokens only)
    per_attended: float  # 4 x layers x query heads x head_dim: Q.K and the weighted V, per query-key pair

    def flops(self, start: int, num_tokens: int) -> float:
        """Tokens ``[start, start + num_tokens)`` of one sequence, those before ``start`` already cached."""
        attended = num_tokens * start + num_tokens * (num_tokens + 1) // 2
        return self.per_token * num_tokens + self.per_attended * attended


@dataclass
class FetchCostModel:
    enabled: bool = True
    work: PrefillWork | None = None  # None: recomputing costs the same per token wherever it sits
    prefill_tokens_per_s: _Average = field(default_factory=_Average)
    prefill_flops_per_s: _Average = field(default_factory=_Average)
    bytes_per_s: dict[str, _Average] = field(default_factory=dict)
    # the step loop and the Redis prefetch thread both feed it
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def observe_prefill(self, tokens: int, seconds: float, flops: float = 0.0) -> None:
        """A step that computed ``tokens`` (``flops`` by ``work``, when the caller has it) in ``seconds``."""
        with self._lock:
            if tokens > 0 and seconds > 0:
                self.prefill_tokens_per_s.add(tokens / seconds)
            if flops > 0 and seconds > 0:
                self.prefill_flops_per_s.add(flops / seconds)

    def observe_fetch(self, tier: str, num_bytes: int, seconds: float) -> None:
        if num_bytes > 0 and seconds > 0:
            with self._lock:
                self.bytes_per_s.setdefault(tier, _Average()).add(num_bytes / seconds)

    def rate(self, tier: str) -> float | None:
        """The tier's measured bytes/s; None until a fetch from it moved bytes."""
        average = self.bytes_per_s.get(tier)
        return average.value if average is not None else None

    def has_rate(self, tier: str) -> bool:
        return self.rate(tier) is not None

    def should_fetch(self, tier: str, num_blocks: int, block_bytes: int, block_tokens: int,
                     start_token: int = 0) -> bool:
        """Whether loading ``num_blocks`` blocks from ``tier`` beats recomputing them; the first of them starts
        at token ``start_token`` of its sequence."""
        bandwidth = self.rate(tier)
        recompute_s = self.recompute_seconds(start_token, num_blocks * block_tokens)
        if not self.enabled or bandwidth is None or recompute_s is None or num_blocks == 0:
            return True
        return num_blocks * block_bytes / bandwidth <= recompute_s

    def tokens_to_compute_first(self, tier: str, start_token: int, num_blocks: int, block_bytes: int,
                                block_tokens: int) -> int:
        """Where a computation from the front should meet a fetch from the back of ``num_blocks`` blocks (the
        first at token ``start_token``), in tokens: the whole blocks to compute while the rest is fetched so
        that the later of the two ends soonest. That is the first count whose recompute outlasts fetching the
        blocks after it, or the one before (0: fetch it all). 0 until both rates are measured."""
        bandwidth = self.rate(tier)
        if not self.enabled or bandwidth is None or self.recompute_seconds(start_token, block_tokens) is None:
            return 0

        def fetch_s(blocks: int) -> float:
            return blocks * block_bytes / bandwidth

        low, high = 0, num_blocks  # the first count in [low, high] whose recompute outlasts the fetch after it
        while low < high:
            middle = (low + high) // 2
            if self.recompute_seconds(start_token, middle * block_tokens) >= fetch_s(num_blocks - middle):
                high = middle
            else:
                low = middle + 1
        if low > 0 and fetch_s(num_blocks - low + 1) < self.recompute_seconds(start_token, low * block_tokens):
            low -= 1  # one block fewer: then the fetch ends last, and sooner
        return low * block_tokens

    def recompute_seconds(self, start: int, num_tokens: int) -> float | None:
        """Predicted time to compute tokens ``[start, start + num_tokens)``; None until a prefill was measured."""
        if self.work is not None and self.prefill_flops_per_s.value:
            return self.work.flops(start, num_tokens) / self.prefill_flops_per_s.value
        if self.prefill_tokens_per_s.value:
            return num_tokens / self.prefill_tokens_per_s.value
        return None

    def snapshot(self) -> dict[str, float | None]:
        rates = {f"{tier}_bytes_per_s": avg.value for tier, avg in self.bytes_per_s.items()}
        return {"prefill_tokens_per_s": self.prefill_tokens_per_s.value,
                "prefill_flops_per_s": self.prefill_flops_per_s.value, **rates}
