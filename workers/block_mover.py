"""The KV copies every rank makes in lockstep when blocks move between tiers.

Rank 0 decides (``workers.kv_tiers``); a ``TierOps`` says, in this order:
1. ``gather_blocks``: copy these GPU blocks, all KV heads, to rank 0 (to be written to Redis; with one rank,
   on the side stream like the copies below, read by the Redis writer's thread once they are done);
2. ``spills``: copy GPU block -> this rank's CPU slot (its own heads);
3. ``cpu_loads``: copy this rank's CPU slot -> GPU block;
4. ``full_loads``: rank 0 broadcasts these blocks with every KV head; each rank keeps its own heads.
With one rank all of it is local. With several, rank 0 first sends the ops (``workers.tp_group``).

Copies between the GPU cache and the CPU slots (and, with one rank, from Redis's staged blocks) go straight
from block to block, consecutive blocks as one copy (``kvstore.copy_runs``), with no gathered temporary. On
CUDA they run from and to pinned memory on two side streams, one per direction (gathers and spills device
to host, loads host to device, on separate copy engines): the host does not wait for them; both wait for the
compute stream (the blocks hold what earlier steps wrote) and the compute stream waits for both before the
next forward (which reads what was loaded and overwrites what was spilled). Within one ``apply`` a load into a
block waits for the event of the copy that read that block off the GPU (its gather, or its piece of the
spills), so loads into evicted blocks run beside the spills of later pieces. Across steps the compute stream
orders them: a spill into a slot runs after an earlier load from it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from kvstore.copy_runs import coalesce
from workers.parallel import ParallelContext, Span
from workers.uploads import upload

_SPILL_PIECE_BLOCKS = 64  # spills per piece: a load into a spilled block waits for its piece, not for them all


@dataclass(frozen=True)
class GatheredBlocks:
    """Blocks copied out of the GPU cache for Redis: n blocks [L, 2, bs, Hkv_all, D] on the host (pinned on
    CUDA). The copies may still be running on the side stream: read ``blocks`` only after ``wait`` (any thread)."""

    blocks: list[torch.Tensor] | torch.Tensor | None  # a list or one [n, ...] tensor; None on ranks other than 0
    copied: torch.cuda.Event | None = None  # recorded after the copies; None: they are done already

    def wait(self) -> list[torch.Tensor] | torch.Tensor:
        if self.copied is not None:
            self.copied.synchronize()
        return self.blocks


@dataclass(frozen=True)
class TierOps:
    gather_blocks: list[int] = field(default_factory=list)
    spills: list[tuple[int, int]] = field(default_factory=list)  # (GPU block, CPU slot)
    cpu_loads: list[tuple[int, int]] = field(default_factory=list)  # (CPU slot, GPU block)
    full_loads: list[int] = field(default_factory=list)  # GPU blocks

    @property
    def empty(self) -> bool:
        return not (self.gather_blocks or self.spills or self.cpu_loads or self.full_loads)

    def counts(self) -> list[int]:
        return [len(self.gather_blocks), len(self.spills), len(self.cpu_loads), len(self.full_loads)]

    def flat(self) -> list[int]:
        pairs = [value for pair in self.spills + self.cpu_loads for value in pair]
        return self.gather_blocks + pairs + self.full_loads

    @classmethod
    def from_flat(cls, counts: list[int], values: list[int]) -> TierOps:
        gathers, spills, loads, fulls = counts
        pairs = values[gathers : gathers + 2 * (spills + loads)]
        pair_list = list(zip(pairs[0::2], pairs[1::2]))
        return cls(values[:gathers], pair_list[:spills], pair_list[spills:], values[len(values) - fulls :])


class BlockMover:
    """One rank's side of tier moves: its GPU cache, its CPU slots, its share of the KV heads."""

    def __init__(
        self,
        kv_cache: torch.Tensor,  # [num_blocks, L, 2, block_size, Hkv_local, D]
        num_cpu_slots: int,
        kv_heads: Span,
        total_kv_heads: int,
        parallel: ParallelContext,
        collective_device: torch.device,
        time_loads: bool = False,  # CUDA: time each apply's loads with events, for ``settled_load_seconds``
    ) -> None:
        self.kv_cache = kv_cache
        self.kv_heads = kv_heads
        self.total_kv_heads = total_kv_heads
        self.parallel = parallel
        self.collective_device = collective_device
        on_cuda = kv_cache.device.type == "cuda"
        dims = (num_cpu_slots, *kv_cache.shape[1:])
        self.host = torch.empty(dims, dtype=kv_cache.dtype, pin_memory=on_cuda) if num_cpu_slots else None
        self.stream = torch.cuda.Stream(kv_cache.device) if on_cuda else None  # device to host: gathers, spills
        self.load_stream = torch.cuda.Stream(kv_cache.device) if on_cuda else None  # host to device: loads
        self.time_loads = time_loads and self.stream is not None  # on the CPU the host clock times them
        self._load_timings: deque[tuple[torch.cuda.Event, torch.cuda.Event]] = deque()  # oldest first

    def apply(self, ops: TierOps, full_payload: list[torch.Tensor] | None = None) -> GatheredBlocks | None:
        """Run ``ops`` on this rank; rank 0 gets the gathered blocks back (possibly still in flight).
        ``full_payload`` (rank 0): one block [L, 2, bs, Hkv_all, D] per full load, pinned on CUDA."""
        gathered = None
        if ops.gather_blocks and self.parallel.world_size > 1:
            gathered = GatheredBlocks(self._gather_from_ranks(ops.gather_blocks))
        reads = _ReadsInFlight()
        with self._transfers():
            if ops.gather_blocks and self.parallel.world_size == 1:
                gathered = self._gather_local(ops.gather_blocks)
                reads.add(ops.gather_blocks, gathered.copied)
            self._spill(ops.spills, reads)
            with self._on_load_stream(), self._timed(bool(ops.cpu_loads or ops.full_loads)):
                self._load(ops, full_payload, reads)
        return gathered

    def _spill(self, spills: list[tuple[int, int]], reads: _ReadsInFlight) -> None:
        """Copy GPU blocks into CPU slots, in pieces, each marked by an event (CUDA): a load into a spilled block
        waits for its own piece only, so loads (host to device) run beside later pieces (device to host), each
        direction on a copy engine of its own."""
        for start in range(0, len(spills), _SPILL_PIECE_BLOCKS):
            piece = spills[start : start + _SPILL_PIECE_BLOCKS]
            _copy_blocks(self.kv_cache, self.host, piece)
            reads.add([block for block, _ in piece], self._event_on(self.stream))

    def _load(self, ops: TierOps, full_payload: list[torch.Tensor] | None, reads: _ReadsInFlight) -> None:
        """CPU slots and staged Redis blocks into GPU blocks, each once the copies off its block have read it:
        the loads into the blocks of one spill piece wait for that piece, not for every piece."""
        if ops.full_loads and self.parallel.world_size > 1:  # a collective: after every copy off its blocks
            last_read = reads.last_reading(ops.full_loads)
            if last_read is not None:
                self.load_stream.wait_event(last_read)
            self._load_broadcast(ops.full_loads, full_payload)
        staged = dict(zip(ops.full_loads, full_payload or [])) if self.parallel.world_size == 1 else {}
        targets = [block for _, block in ops.cpu_loads] + list(staged)
        for event, blocks in reads.in_read_order(targets):
            if event is not None:
                self.load_stream.wait_event(event)
            _copy_blocks(self.host, self.kv_cache, [(slot, block) for slot, block in ops.cpu_loads if block in blocks])
            for block in staged.keys() & blocks:  # each staged block is a whole cache block
                self.kv_cache[block].copy_(staged[block], non_blocking=True)

    @staticmethod
    def _event_on(stream: torch.cuda.Stream | None) -> torch.cuda.Event | None:
        if stream is None:
            return None
        event = torch.cuda.Event()
        event.record(stream)
        return event

    @contextmanager
    def _transfers(self) -> Iterator[None]:
        """Copies enqueued inside run on the side streams (CUDA), ordered after and before the compute stream's
        work; on the CPU they run here and now."""
        if self.stream is None:
            yield
            return
        compute = torch.cuda.current_stream(self.kv_cache.device)
        self.stream.wait_stream(compute)
        self.load_stream.wait_stream(compute)
        with torch.cuda.stream(self.stream):
            yield
        compute.wait_stream(self.stream)
        compute.wait_stream(self.load_stream)

    @contextmanager
    def _on_load_stream(self) -> Iterator[None]:
        if self.stream is None:
            yield
            return
        with torch.cuda.stream(self.load_stream):
            yield

    @contextmanager
    def _timed(self, loads: bool) -> Iterator[None]:
        """On CUDA, events around the loads enqueued inside (read back by ``settled_load_seconds``)."""
        if not (loads and self.time_loads):
            yield
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(self.load_stream)
        yield
        end.record(self.load_stream)
        self._load_timings.append((start, end))

    def settled_load_seconds(self, wait: bool) -> list[float]:
        """GPU seconds of the loads of each earlier ``apply`` that had loads and has finished (all of them if
        ``wait``), oldest first, each reported once. Host clocks cannot time copies the host does not wait for."""
        seconds = []
        while self._load_timings and (wait or self._load_timings[0][1].query()):
            start, end = self._load_timings.popleft()
            end.synchronize()
            seconds.append(start.elapsed_time(end) / 1e3)
        return seconds

    def _load_broadcast(self, block_ids: list[int], payload: list[torch.Tensor] | None) -> None:
        cache = self.kv_cache
        full = self._broadcast_payload(payload, len(block_ids))  # [n, L, 2, bs, Hkv_all, D]
        mine = full[:, :, :, :, self.kv_heads.start : self.kv_heads.stop].to(cache.device)
        cache.index_copy_(0, upload(block_ids, cache.device), mine)

    def _gather_local(self, block_ids: list[int]) -> GatheredBlocks:
        """Copies of the blocks into host memory, queued on the side stream (pinned, asynchronous on CUDA). Each
        block gets a host block of its own: one size for torch's caching host allocator, which then serves every
        gather, large or small, from the blocks ``KVTiers`` pinned at start (one [n, ...] tensor would be a new
        size, pinned inside the step: a 2 GiB gather would wait for cudaHostAlloc)."""
        pinned = self.stream is not None
        host = [torch.empty(self.kv_cache.shape[1:], dtype=self.kv_cache.dtype, pin_memory=pinned)
                for _ in block_ids]
        for block_id, target in zip(block_ids, host):
            target.copy_(self.kv_cache[block_id], non_blocking=True)
        return GatheredBlocks(host, self._event_on(self.stream))

    def _gather_from_ranks(self, block_ids: list[int]) -> torch.Tensor | None:
        """Every rank's heads of the blocks, joined on rank 0 (None elsewhere); the collective waits for them."""
        local = self.kv_cache.index_select(0, upload(block_ids, self.kv_cache.device)).to(self.collective_device)
        parts = [torch.empty_like(local) for _ in range(self.parallel.world_size)] if self.parallel.rank == 0 else None
        dist.gather(local, parts, dst=0)
        if parts is None:
            return None
        owners = self._first_rank_of_each_span()
        return torch.cat([parts[rank] for rank in owners], dim=4).cpu()  # heads in order

    def _first_rank_of_each_span(self) -> list[int]:
        """With replicated KV heads several ranks hold the same head: take each head once, in head order."""
        replicas = max(1, self.parallel.world_size // self.total_kv_heads)
        return list(range(0, self.parallel.world_size, replicas))

    def _broadcast_payload(self, payload: list[torch.Tensor] | None, count: int) -> torch.Tensor:
        dims = (count, *self.kv_cache.shape[1:4], self.total_kv_heads, self.kv_cache.shape[5])
        if self.parallel.rank == 0:
            tensor = torch.stack(payload).to(self.collective_device)
        else:
            tensor = torch.empty(dims, dtype=self.kv_cache.dtype, device=self.collective_device)
        dist.broadcast(tensor, src=0)
        return tensor


@dataclass
class _ReadsInFlight:
    """The copies off GPU blocks one ``apply`` enqueued (CUDA): once ``events[i]`` fired, the blocks of piece i
    were read, and a load may overwrite them. Empty on the CPU, where copies are done when enqueued."""

    events: list[torch.cuda.Event] = field(default_factory=list)
    piece_of: dict[int, int] = field(default_factory=dict)  # GPU block -> index into events

    def add(self, blocks: list[int], event: torch.cuda.Event | None) -> None:
        if event is not None:
            self.piece_of.update((block, len(self.events)) for block in blocks)
            self.events.append(event)

    def last_reading(self, blocks: list[int]) -> torch.cuda.Event | None:
        """The event after which every copy off ``blocks`` has run (the pieces run in order on one stream)."""
        pieces = [self.piece_of[block] for block in blocks if block in self.piece_of]
        return self.events[max(pieces)] if pieces else None

    def in_read_order(self, blocks: list[int]) -> list[tuple[torch.cuda.Event | None, set[int]]]:
        """``blocks`` grouped by the piece that reads them, in piece order, each with the event to wait for;
        blocks no copy reads come first, with nothing to wait for."""
        groups: dict[int, set[int]] = {}
        for block in blocks:
            groups.setdefault(self.piece_of.get(block, -1), set()).add(block)
        return [(self.events[piece] if piece >= 0 else None, groups[piece]) for piece in sorted(groups)]


def _copy_blocks(source: torch.Tensor, target: torch.Tensor, pairs: list[tuple[int, int]]) -> None:
    """target[t] = source[s] for each (s, t), consecutive blocks as one copy; asynchronous where pinned."""
    for run in coalesce(pairs):
        target[run.target : run.target + run.length].copy_(source[run.source : run.source + run.length],
                                                           non_blocking=True)


def writer_head_ranges(world_size: int, total_kv_heads: int) -> list[tuple[int, int]]:
    """The distinct KV-head ranges of a group of ``world_size`` ranks: the units it writes to Redis."""
    if world_size <= total_kv_heads:
        per_rank = total_kv_heads // world_size
        return [(r * per_rank, (r + 1) * per_rank) for r in range(world_size)]
    return [(head, head + 1) for head in range(total_kv_heads)]
