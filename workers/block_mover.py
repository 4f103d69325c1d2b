"""The KV copies every rank makes in lockstep when blocks move between tiers.

Rank 0 decides (``workers.kv_tiers``); a ``TierOps`` says:
1. ``spills``: copy GPU block -> this rank's CPU slot (its own heads);
2. ``gather_blocks``: copy these GPU blocks, all KV heads, to rank 0 (to be written to Redis; with one rank,
   on a side stream like the copies below, read by the Redis writer's thread once they are done);
3. ``cpu_loads``: copy this rank's CPU slot -> GPU block;
4. ``full_loads``: rank 0 broadcasts these blocks with every KV head; each rank keeps its own heads;
and ``reused``: the GPU blocks the pool handed out again since the last ops (their contents go now).
With one rank all of it is local. With several, rank 0 first sends the ops (``workers.tp_group``).

Copies between the GPU cache and the CPU slots (and, with one rank, from Redis's staged blocks) go straight
from block to block, consecutive blocks as one copy (``kvstore.copy_runs``). A gather goes in pieces (64 blocks,
then powers of two), each an ``index_select`` into a device temporary and one copy into pinned memory.

On CUDA the copies run on three side streams: spills and gathers device to host (one stream each), loads host
to device; the host does not wait for them. Each waits for the compute stream first (the blocks hold what
earlier steps wrote). The compute stream then waits, before the next forward, for the loads (the forward reads
them) and for the copies that read a block the step overwrites (``reused``, every spill): not for the rest of a
gather, which runs beside the forwards that follow. Gathers still running are remembered across ``apply``
calls, so a later step that reuses a block waits for the gather that reads it. A load into a block waits only
for the copies that read that block (its spill piece, its gather), so loads run beside later spill pieces.
Across steps the compute stream orders the rest: a spill into a slot runs after an earlier load from it.
Invariant the callers keep: a gathered block is not overwritten unless it is in ``reused`` of some later ops
(the pool reports every reallocated cached block) or after ``settle_gathers`` (a flush uncaches without
reporting).
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
GATHER_PIECE_BLOCKS = 64  # the largest piece of a gather, in blocks (smaller pieces are powers of two)


@dataclass(frozen=True)
class GatheredBlocks:
    """Blocks copied out of the GPU cache for Redis: n blocks [L, 2, bs, Hkv_all, D] on the host (pinned on
    CUDA), in pieces. The copies may still be running on a side stream: read them only through ``wait`` (any
    thread)."""

    pieces: list[torch.Tensor] | None  # each [n_i, L, 2, bs, Hkv_all, D], in block order; None on ranks but 0
    copied: torch.cuda.Event | None = None  # recorded after the copies; None: they are done already

    def wait(self) -> list[torch.Tensor]:
        """The blocks, one [L, 2, bs, Hkv_all, D] view each, once their copies are done."""
        if self.copied is not None:
            self.copied.synchronize()
        return [block for piece in self.pieces for block in piece.unbind(0)]


@dataclass(frozen=True)
class TierOps:
    gather_blocks: list[int] = field(default_factory=list)
    spills: list[tuple[int, int]] = field(default_factory=list)  # (GPU block, CPU slot)
    cpu_loads: list[tuple[int, int]] = field(default_factory=list)  # (CPU slot, GPU block)
    full_loads: list[int] = field(default_factory=list)  # GPU blocks
    reused: list[int] = field(default_factory=list)  # GPU blocks reallocated (rank 0 only: not in ``flat``)

    @property
    def copies_nothing(self) -> bool:
        return not (self.gather_blocks or self.spills or self.cpu_loads or self.full_loads)

    @property
    def empty(self) -> bool:
        return self.copies_nothing and not self.reused

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
        self.stream = torch.cuda.Stream(kv_cache.device) if on_cuda else None  # device to host: spills
        self.gather_stream = torch.cuda.Stream(kv_cache.device) if on_cuda else None  # device to host: gathers
        self.load_stream = torch.cuda.Stream(kv_cache.device) if on_cuda else None  # host to device: loads
        self.time_loads = time_loads and self.stream is not None  # on the CPU the host clock times them
        self._load_timings: deque[tuple[torch.cuda.Event, torch.cuda.Event]] = deque()  # oldest first
        self._gathers: deque[tuple[torch.cuda.Event, list[int]]] = deque()  # gathers that may still run, oldest first

    def apply(self, ops: TierOps, full_payload: list[torch.Tensor] | None = None) -> GatheredBlocks | None:
        """Run ``ops`` on this rank; rank 0 gets the gathered blocks back (possibly still in flight).
        ``full_payload`` (rank 0): one block [L, 2, bs, Hkv_all, D] per full load, pinned on CUDA."""
        gathered = None
        if ops.gather_blocks and self.parallel.world_size > 1:
            joined = self._gather_from_ranks(ops.gather_blocks)  # [n, ...] on rank 0, done
            gathered = GatheredBlocks([joined] if joined is not None else None)
        spills, gathers = _ReadsInFlight(), self._gathers_still_running()
        with self._transfers(ops, spills, gathers):
            self._spill(ops.spills, spills)
            if ops.gather_blocks and self.parallel.world_size == 1:
                gathered = self._gather_local(ops.gather_blocks)
                gathers.add(ops.gather_blocks, gathered.copied)
                if gathered.copied is not None:
                    self._gathers.append((gathered.copied, ops.gather_blocks))
            with self._on(self.load_stream), self._timed(bool(ops.cpu_loads or ops.full_loads)):
                self._load(ops, full_payload, spills, gathers)
        return gathered

    def settle_gathers(self) -> None:
        """Wait for every gather still running: before blocks are uncached without being reported as reused
        (a flush), after which the next forward could overwrite them unordered."""
        while self._gathers:
            self._gathers.popleft()[0].synchronize()

    def _gathers_still_running(self) -> _ReadsInFlight:
        """The gathers of earlier ``apply`` calls that may still be reading, as reads in flight (stream order)."""
        while self._gathers and self._gathers[0][0].query():
            self._gathers.popleft()
        reads = _ReadsInFlight()
        for event, blocks in self._gathers:
            reads.add(blocks, event)
        return reads

    def _spill(self, spills: list[tuple[int, int]], reads: _ReadsInFlight) -> None:
        """Copy GPU blocks into CPU slots, in pieces, each marked by an event (CUDA): a load into a spilled block
        waits for its own piece only, so loads (host to device) run beside later pieces (device to host), each
        direction on a copy engine of its own."""
        for start in range(0, len(spills), _SPILL_PIECE_BLOCKS):
            piece = spills[start : start + _SPILL_PIECE_BLOCKS]
            _copy_blocks(self.kv_cache, self.host, piece)
            reads.add([block for block, _ in piece], self._event_on(self.stream))

    def _load(self, ops: TierOps, full_payload: list[torch.Tensor] | None, spills: _ReadsInFlight,
              gathers: _ReadsInFlight) -> None:
        """CPU slots and staged Redis blocks into GPU blocks, each once the copies off its block have read it:
        the loads into the blocks of one spill piece wait for that piece (and a gather reading them), not for
        every piece."""
        if ops.full_loads and self.parallel.world_size > 1:  # a collective: after every copy off its blocks
            for lane in (spills, gathers):
                if (last_read := lane.last_reading(ops.full_loads)) is not None:
                    self.load_stream.wait_event(last_read)
            self._load_broadcast(ops.full_loads, full_payload)
        staged = dict(zip(ops.full_loads, full_payload or [])) if self.parallel.world_size == 1 else {}
        targets = [block for _, block in ops.cpu_loads] + list(staged)
        for events, blocks in _in_read_order(targets, spills, gathers):
            for event in events:
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
    def _transfers(self, ops: TierOps, spills: _ReadsInFlight, gathers: _ReadsInFlight) -> Iterator[None]:
        """Copies enqueued inside run on the side streams (CUDA), after the compute stream's work so far; the
        compute stream then waits for the loads and for the reads of the blocks it will overwrite, not for the
        rest. On the CPU the copies run here and now."""
        if self.stream is None:
            yield
            return
        compute = torch.cuda.current_stream(self.kv_cache.device)
        for side in (self.stream, self.gather_stream, self.load_stream):
            side.wait_stream(compute)
        with torch.cuda.stream(self.stream):
            yield
        overwritten = [*ops.reused, *(block for block, _ in ops.spills)]
        for lane in (spills, gathers):
            if (last_read := lane.last_reading(overwritten)) is not None:
                compute.wait_event(last_read)
        compute.wait_stream(self.load_stream)

    @contextmanager
    def _on(self, stream: torch.cuda.Stream | None) -> Iterator[None]:
        if stream is None:
            yield
            return
        with torch.cuda.stream(stream):
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
        """Copies of the blocks in host memory (pinned on CUDA), queued on the gather stream, in pieces of a
        power of two blocks (``_pieces``), each an ``index_select`` into a device temporary and one copy (a
        single block: one copy). Torch's caching host allocator reuses pinned memory by size, and powers of two
        are its sizes: ``KVTiers`` pins pieces of ``GATHER_PIECE_BLOCKS`` and single blocks at start, the
        sizes between are pinned on first use, and from then on a gather takes them back without
        cudaHostAlloc."""
        cache = self.kv_cache
        pieces = []
        with self._on(self.gather_stream):
            ids = upload(block_ids, cache.device) if len(block_ids) > 1 else None
            for start, size in _pieces(len(block_ids)):
                piece = torch.empty((size, *cache.shape[1:]), dtype=cache.dtype, pin_memory=self.stream is not None)
                if size == 1:
                    piece.copy_(cache[block_ids[start]][None], non_blocking=True)  # [1, L, 2, bs, Hkv, D]
                elif cache.device == piece.device:  # the CPU: straight into the piece
                    torch.index_select(cache, 0, ids[start : start + size], out=piece)
                else:
                    piece.copy_(cache.index_select(0, ids[start : start + size]), non_blocking=True)
                pieces.append(piece)
            return GatheredBlocks(pieces, self._event_on(self.gather_stream))

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
    """Copies off GPU blocks still in flight on one side stream (CUDA), in the order that stream runs them: once
    ``events[i]`` fired, the blocks of piece i were read, and a write may overwrite them. Empty on the CPU,
    where copies are done when enqueued."""

    events: list[torch.cuda.Event] = field(default_factory=list)
    piece_of: dict[int, int] = field(default_factory=dict)  # GPU block -> index into events (its last read)

    def add(self, blocks: list[int], event: torch.cuda.Event | None) -> None:
        if event is not None:
            self.piece_of.update((block, len(self.events)) for block in blocks)
            self.events.append(event)

    def last_reading(self, blocks: list[int]) -> torch.cuda.Event | None:
        """The event after which every copy off ``blocks`` has run (the pieces run in order on one stream)."""
        pieces = [self.piece_of[block] for block in blocks if block in self.piece_of]
        return self.events[max(pieces)] if pieces else None


def _in_read_order(blocks: list[int], first: _ReadsInFlight, second: _ReadsInFlight
                   ) -> list[tuple[list[torch.cuda.Event], set[int]]]:
    """``blocks`` grouped by the pieces that read them (on two streams), in ``first``'s piece order, each with
    the events to wait for; blocks no copy reads come first, with nothing to wait for."""
    groups: dict[tuple[int, int], set[int]] = {}
    for block in blocks:
        groups.setdefault((first.piece_of.get(block, -1), second.piece_of.get(block, -1)), set()).add(block)
    return [([lane.events[piece] for lane, piece in zip((first, second), key) if piece >= 0], groups[key])
            for key in sorted(groups)]


def _pieces(count: int) -> list[tuple[int, int]]:
    """(start, size) of a gather's pieces: whole pieces of ``GATHER_PIECE_BLOCKS``, then the rest in powers of
    two, largest first (at most log2 of it more pieces; a size the host allocator rounds to no larger one)."""
    pieces, start = [], 0
    while start < count:
        size = min(GATHER_PIECE_BLOCKS, 1 << ((count - start).bit_length() - 1))
        pieces.append((start, size))
        start += size
    return pieces


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
