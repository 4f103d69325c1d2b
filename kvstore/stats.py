"""Counters of the KV tiers. Pure Python; one ``TierStats`` per tier."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

TIERS = ("gpu", "cpu", "redis")


@dataclass
class TierStats:
    hit_blocks: int = 0  # blocks a request found here (and loaded, below the GPU)
    miss_blocks: int = 0  # blocks looked up here and not found
    bytes_in: int = 0  # stored into this tier
    bytes_out: int = 0  # loaded out of this tier
    stored_blocks: int = 0
    evicted_blocks: int = 0
    errors: int = 0  # failed calls, corrupt values, write failures
    skipped_fetches: int = 0  # hits not fetched: the cost model predicted recomputing is faster
    shared_reads: int = 0  # requests that waited for another's read of their blocks instead of reading them
    dropped_writes: int = 0  # computed blocks the full write-behind queue could not take (GPU hits: not counted)
    corrupt_values: int = 0
    refreshed_blocks: int = 0  # blocks hot in the GPU pool whose keys a refresh found, and touched, in Redis
    lost_blocks: int = 0  # blocks a refresh found Redis had lost: written again at their next GPU hit
    transfer_seconds: float = 0.0  # time spent fetching and loading out of this tier

    def add(self, counted: TierStats) -> None:
        """Add another tally's counts to these (a Redis read counts on its own thread, then hands them over)."""
        for name, value in asdict(counted).items():
            setattr(self, name, getattr(self, name) + value)

    @property
    def load_bytes_per_s(self) -> float | None:
        return self.bytes_out / self.transfer_seconds if self.transfer_seconds > 0 else None


@dataclass
class KVStoreStats:
    tiers: dict[str, TierStats] = field(default_factory=lambda: {tier: TierStats() for tier in TIERS})

    def __getitem__(self, tier: str) -> TierStats:
        return self.tiers[tier]

    def as_dict(self) -> dict[str, dict[str, int]]:
        return {tier: asdict(stats) for tier, stats in self.tiers.items()}
