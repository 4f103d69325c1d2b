"""Moving KV blocks between the GPU cache and the tiers below it: host RAM and Redis.

- ``lookup``: for the hashes after a request's GPU hits, the longest contiguous run found in the CPU tier,
  then in Redis (each value fetched, decoded and verified; a corrupt one is deleted and ends the run).
  CPU entries are pinned and Redis payloads staged until ``load`` copies them into GPU blocks this step.
- ``spill``: blocks the GPU pool evicts are copied to the CPU tier before their slots are reused.
- ``store``: newly computed full blocks are encoded and queued for Redis (write-behind), once per hash.
The pure decisions live in ``kvstore`` (tier policy, codec, cost model); this module only moves bytes.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections import OrderedDict
import torch

from kvstore import codec
from kvstore.config import KVStoreConfig, parse_size
from kvstore.cost_model import FetchCostModel
from kvstore.redis_keys import BlockLoad, PrefixRef, block_key, flush_pattern
from kvstore.redis_store import RedisStore, WriteBehind
from kvstore.stats import KVStoreStats
from kvstore.tier_policy import LRUTierPolicy
from workers.kv_cache import KVCacheShape

log = logging.getLogger(__name__)
_REDIS_BATCH_BLOCKS = 32  # blocks per MGET: the first batch tells whether a prefix is there at all
_KNOWN_IN_REDIS = 1 << 18  # hashes remembered as already written, so hot prefixes are not rewritten


class KVTiers:
    def __init__(
        self,
        kv_cache: torch.Tensor,  # [num_blocks, num_layers, 2, block_size, Hkv, D]
        shape: KVCacheShape,
        config: KVStoreConfig,
        fingerprint: str,
        stats: KVStoreStats,
        cost_model: FetchCostModel,
    ) -> None:
        self.kv_cache = kv_cache
        self.shape = shape
        self.fingerprint = fingerprint
        self.stats = stats
        self.cost_model = cost_model
        self.block_bytes = shape.bytes_per_block
        self.cpu = _HostTier(config, shape, kv_cache.device) if config.cpu.enabled else None
        self.redis = RedisStore(config.redis) if config.redis.url else None
        redis_config = config.redis
        self.writer = (
            WriteBehind(self.redis, redis_config.write_queue_blocks, redis_config.write_batch_blocks,
                        parse_size(redis_config.write_batch_bytes))
            if self.redis else None
        )
        self._staged: dict[bytes, memoryview] = {}
        self._known_in_redis: OrderedDict[bytes, None] = OrderedDict()
        self._dtype_name = str(shape.dtype).removeprefix("torch.")

    # --- lookup and load -----------------------------------------------------------------------------------

    def lookup(self, block_hashes: list[bytes], prefix: PrefixRef) -> list[str]:
        """The tier of each leading hash found below the GPU (["cpu", "cpu", "redis", ...]); pins and stages them."""
        tiers: list[str] = []
        if self.cpu is not None:
            hits = self.cpu.pin(block_hashes)
            tiers += ["cpu"] * hits
        rest = block_hashes[len(tiers):]
        if self.redis is not None and rest:
            tiers += ["redis"] * self._fetch_from_redis(rest, prefix)
        self._count_lookup(block_hashes, tiers)
        return tiers

    def cancel(self, block_hashes: list[bytes], tiers: list[str]) -> None:
        """Undo ``lookup`` for loads that will not happen (the request could not be admitted)."""
        cpu_hashes = [h for h, tier in zip(block_hashes, tiers) if tier == "cpu"]
        if cpu_hashes:
            self.cpu.unpin(cpu_hashes)
        for block_hash, tier in zip(block_hashes, tiers):
            if tier == "redis":
                self._staged.pop(block_hash, None)
        for tier in ("cpu", "redis"):  # the lookup counted these as hits
            self.stats[tier].hit_blocks -= tiers.count(tier)

    def load(self, loads: list[BlockLoad]) -> None:
        """Copy looked-up blocks into their GPU blocks (before the step's forward reads them)."""
        cpu_loads = [load for load in loads if load.tier == "cpu"]
        if cpu_loads:
            began = time.perf_counter()
            self.cpu.load(cpu_loads, self.kv_cache)
            self.stats["cpu"].transfer_seconds += _synchronized_seconds(began, self.kv_cache.device)
            self.stats["cpu"].bytes_out += len(cpu_loads) * self.block_bytes
        redis_loads = [load for load in loads if load.tier == "redis"]
        began = time.perf_counter()
        for load in redis_loads:
            payload = self._staged.pop(load.block_hash)
            self.kv_cache[load.block_id].copy_(_tensor_from(payload, self.shape))
            self.stats["redis"].bytes_out += len(payload)
        if redis_loads:
            self.stats["redis"].transfer_seconds += _synchronized_seconds(began, self.kv_cache.device)

    def _fetch_from_redis(self, block_hashes: list[bytes], prefix: PrefixRef) -> int:
        """Stage the longest verified run of ``block_hashes`` found in Redis; returns its length."""
        if not self.cost_model.should_fetch("redis", len(block_hashes), self.block_bytes, self.shape.block_size):
            self.stats["redis"].skipped_fetches += 1
            return 0
        found = 0
        for start in range(0, len(block_hashes), _REDIS_BATCH_BLOCKS):
            batch = block_hashes[start : start + _REDIS_BATCH_BLOCKS]
            keys = [self._key(h, prefix) for h in batch]
            began = time.perf_counter()
            values = self.redis.get_many(keys)
            if values is None:
                self.stats["redis"].errors += 1
                return found
            verified = self._verify_run(batch, keys, values)
            fetched = sum(len(v) for v in values[:verified] if v is not None)
            seconds = time.perf_counter() - began
            self.stats["redis"].transfer_seconds += seconds
            self.cost_model.observe_fetch("redis", fetched, seconds)
            found += verified
            if verified < len(batch):
                return found
        return found

    def _verify_run(self, hashes: list[bytes], keys: list[str], values: list[bytes | None]) -> int:
        for index, (block_hash, key, value) in enumerate(zip(hashes, keys, values)):
            if value is None:
                return index
            try:
                self._staged[block_hash] = codec.decode(value, self.unit_of(block_hash))
            except codec.CorruptValue as error:
                log.warning("redis value %s is corrupt (%s): deleted, will recompute", key, error)
                self.stats["redis"].corrupt_values += 1
                self.stats["redis"].errors += 1
                self.redis.delete([key])
                return index
            self._remember_in_redis(block_hash)
        return len(hashes)

    # --- spill and store ------------------------------------------------------------------------------------

    def spill(self, evicted: list[tuple[bytes, int]]) -> None:
        """Copy blocks the GPU pool just evicted into the CPU tier (their GPU slots are about to be reused)."""
        self.stats["gpu"].evicted_blocks += len(evicted)
        if self.cpu is None or not evicted:
            return
        stored = self.cpu.store(evicted, self.kv_cache)
        self.stats["cpu"].stored_blocks += stored
        self.stats["cpu"].bytes_in += stored * self.block_bytes
        self.stats["cpu"].evicted_blocks += len(self.cpu.policy.take_evicted())

    def store(self, blocks: list[tuple[bytes, int, PrefixRef]]) -> None:
        """Queue newly computed full blocks for Redis, skipping hashes already written or read there."""
        if self.writer is None:
            return
        fresh = [(h, block_id, prefix) for h, block_id, prefix in blocks if h not in self._known_in_redis]
        if not fresh:
            return
        payloads = _bytes_of(self.kv_cache, [block_id for _, block_id, _ in fresh])
        items = [
            (self._key(h, prefix), codec.encode(self.unit_of(h), payload))
            for (h, _, prefix), payload in zip(fresh, payloads)
        ]
        dropped = self.writer.submit(items)
        self.stats["redis"].dropped_writes += dropped
        for block_hash, _, _ in fresh:
            self._remember_in_redis(block_hash)

    def sync_writer_stats(self) -> None:
        """Fold the write-behind thread's counters into the Redis tier's stats."""
        if self.writer is None:
            return
        redis_stats = self.stats["redis"]
        redis_stats.stored_blocks = self.writer.written
        redis_stats.bytes_in = self.writer.bytes_written
        redis_stats.errors = max(redis_stats.errors, self.redis.errors)

    # --- flush and close -----------------------------------------------------------------------------------

    def flush(self, salt: str | None = None, all_salts: bool = True) -> dict[str, int]:
        """Drop this model's blocks (or one salt's) from the CPU tier and Redis; counts per tier."""
        dropped = {"cpu": self.cpu.policy.clear() if self.cpu else 0, "redis": 0}
        self._known_in_redis.clear()
        if self.redis is not None:
            if self.writer is not None:
                self.writer.flush()
            deleted = self.redis.delete_matching(flush_pattern(self.fingerprint, salt, any_salt=all_salts))
            dropped["redis"] = deleted or 0
        return dropped

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.sync_writer_stats()
        if self.redis is not None:
            self.redis.close()

    # --- helpers -------------------------------------------------------------------------------------------

    def _key(self, block_hash: bytes, prefix: PrefixRef) -> str:
        return block_key(self.fingerprint, prefix, block_hash, (0, self.shape.num_kv_heads))

    def unit_of(self, block_hash: bytes) -> codec.BlockUnit:
        shape = self.shape
        return codec.BlockUnit(
            fingerprint=bytes.fromhex(self.fingerprint), block_hash=block_hash, dtype=self._dtype_name,
            shape=(shape.num_layers, 2, shape.block_size, shape.num_kv_heads, shape.head_dim),
            head_start=0, head_end=shape.num_kv_heads, total_heads=shape.num_kv_heads,
        )

    def _remember_in_redis(self, block_hash: bytes) -> None:
        self._known_in_redis[block_hash] = None
        self._known_in_redis.move_to_end(block_hash)
        if len(self._known_in_redis) > _KNOWN_IN_REDIS:
            self._known_in_redis.popitem(last=False)

    def _count_lookup(self, block_hashes: list[bytes], tiers: list[str]) -> None:
        for tier in ("cpu", "redis"):
            self.stats[tier].hit_blocks += tiers.count(tier)
        if len(tiers) < len(block_hashes):
            missed_in = "redis" if self.redis is not None else "cpu"
            if self.redis is not None or self.cpu is not None:
                self.stats[missed_in].miss_blocks += len(block_hashes) - len(tiers)


class _HostTier:
    """The CPU tier's bytes: ``[num_slots, num_layers, 2, block_size, Hkv, D]`` in host RAM (pinned with CUDA)."""

    def __init__(self, config: KVStoreConfig, shape: KVCacheShape, device: torch.device) -> None:
        num_slots = max(1, parse_size(config.cpu.capacity) // shape.bytes_per_block)
        self.policy = LRUTierPolicy(num_slots)
        self._pinned: dict[bytes, int] = {}  # hash -> slot, between lookup and load
        dims = (num_slots, *shape.dims[1:])
        self.slots = torch.empty(dims, dtype=shape.dtype, pin_memory=device.type == "cuda")
        log.info("CPU tier: %d blocks, %.2f GiB", num_slots, num_slots * shape.bytes_per_block / 2**30)

    def pin(self, block_hashes: list[bytes]) -> int:
        """Pin the leading run of hashes this tier holds; returns its length."""
        hits = block_hashes[: self.policy.lookup(block_hashes)]
        self._pinned.update(zip(hits, self.policy.prepare_load(hits)))
        return len(hits)

    def unpin(self, block_hashes: list[bytes]) -> None:
        self.policy.complete_load(block_hashes)
        for block_hash in block_hashes:
            self._pinned.pop(block_hash, None)

    def load(self, loads: list[BlockLoad], kv_cache: torch.Tensor) -> None:
        hashes = [load.block_hash for load in loads]
        slots = torch.tensor([self._pinned.pop(h) for h in hashes])
        targets = torch.tensor([load.block_id for load in loads], device=kv_cache.device)
        kv_cache.index_copy_(0, targets, self.slots[slots].to(kv_cache.device, non_blocking=True))
        self.policy.complete_load(hashes)

    def store(self, evicted: list[tuple[bytes, int]], kv_cache: torch.Tensor) -> int:
        block_of = dict(evicted)
        planned = self.policy.prepare_store([h for h, _ in evicted])
        if not planned:
            return 0
        sources = torch.tensor([block_of[h] for h, _ in planned], device=kv_cache.device)
        slots = torch.tensor([slot for _, slot in planned])
        self.slots.index_copy_(0, slots, kv_cache.index_select(0, sources).cpu())
        self.policy.complete_store([h for h, _ in planned], ok=True)
        return len(planned)


def _synchronized_seconds(began: float, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - began


def _bytes_of(kv_cache: torch.Tensor, block_ids: list[int]) -> list[memoryview]:
    """Each block's raw bytes, copied to host memory in one transfer."""
    index = torch.tensor(block_ids, device=kv_cache.device)
    host = kv_cache.index_select(0, index).cpu().contiguous()  # [n, L, 2, bs, Hkv, D]
    flat = host.view(len(block_ids), -1).view(torch.uint8)  # [n, block_bytes]
    data = memoryview(flat.numpy()).cast("B")
    size = flat.shape[1]
    return [data[i * size : (i + 1) * size] for i in range(len(block_ids))]


def _tensor_from(payload: memoryview, shape: KVCacheShape) -> torch.Tensor:
    with warnings.catch_warnings():  # the buffer is read-only; it is only copied from
        warnings.simplefilter("ignore", UserWarning)
        raw = torch.frombuffer(payload, dtype=torch.uint8)
    return raw.view(shape.dtype).view(shape.dims[1:])
