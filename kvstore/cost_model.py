"""Fetch or recompute? A per-tier decision from measured rates. Pure Python.

The model keeps exponentially weighted averages of the prefill rate (tokens/s, from engine steps) and of each
tier's effective transfer rate (bytes/s over whole calls, so per-call latency is folded in). Fetching n blocks
costs ``n * block_bytes / rate``; recomputing them costs ``n * block_tokens / prefill_rate``. With no
measurement yet, fetching is assumed to win (the first fetches measure the tier).
"""

from __future__ import annotations

from dataclasses import dataclass, field

_WEIGHT = 0.2  # of the newest sample in each average


@dataclass
class _Average:
    value: float | None = None

    def add(self, sample: float) -> None:
        self.value = sample if self.value is None else (1 - _WEIGHT) * self.value + _WEIGHT * sample


@dataclass
class FetchCostModel:
    enabled: bool = True
    prefill_tokens_per_s: _Average = field(default_factory=_Average)
    bytes_per_s: dict[str, _Average] = field(default_factory=dict)

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        if tokens > 0 and seconds > 0:
            self.prefill_tokens_per_s.add(tokens / seconds)

    def observe_fetch(self, tier: str, num_bytes: int, seconds: float) -> None:
        if num_bytes > 0 and seconds > 0:
            self.bytes_per_s.setdefault(tier, _Average()).add(num_bytes / seconds)

    def rate(self, tier: str) -> float | None:
        """The tier's measured bytes/s; None until a fetch from it moved bytes."""
        average = self.bytes_per_s.get(tier)
        return average.value if average is not None else None

    def has_rate(self, tier: str) -> bool:
        return self.rate(tier) is not None

    def should_fetch(self, tier: str, num_blocks: int, block_bytes: int, block_tokens: int) -> bool:
        bandwidth = self.rate(tier)
        prefill_rate = self.prefill_tokens_per_s.value
        if not self.enabled or bandwidth is None or prefill_rate is None or num_blocks == 0:
            return True
        fetch_s = num_blocks * block_bytes / bandwidth
        recompute_s = num_blocks * block_tokens / prefill_rate
        return fetch_s <= recompute_s

    def snapshot(self) -> dict[str, float | None]:
        rates = {f"{tier}_bytes_per_s": avg.value for tier, avg in self.bytes_per_s.items()}
        return {"prefill_tokens_per_s": self.prefill_tokens_per_s.value, **rates}
