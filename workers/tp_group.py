"""A tensor-parallel group: rank 0 in this process, ranks 1..N-1 started by a launcher: child processes here
(``spawn_local_ranks``, for ``kvtier generate --tp N``) or Ray actors in the worker's placement group
(``cluster.rank_actor``), all on one node.

The ranks join over torch.distributed on loopback (gloo on CPU, NCCL with CUDA, one GPU per rank). Rank 0
broadcasts each step's inputs; every collective within a step has ``collective_timeout_s``, and rank 0 checks
before each step that every other rank still runs, so a dead rank ends the group with a ``TensorParallelError``
naming it, within bounded time. The group is started and stopped as a unit.

Rank 0 waits up to ``rank_start_timeout_s`` for the other ranks to start (a process or Ray actor to launch, torch
to import: tens of seconds on a busy node) and says at once if one ends first (``wait_for_ranks_to_join``);
only then do the ranks form the group, whose own rendezvous has ``collective_timeout_s``. On that shorter
timeout a busy node's restarted worker used to fail to form its group and stay down.

What a rank waits for between steps (the next step's header: an idle worker sends nothing for hours; the pool
sizes: rank 0 may still be loading its weights) goes over a second group of the same ranks with no practical
timeout (``Collectives.send_header``). On the default group's timeout an idle worker's ranks used to give up
after ``collective_timeout_s`` of idleness, and its next request failed. A rank whose peer dies meanwhile
still learns it at once: the peer's sockets close.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import timedelta
from typing import Protocol, TypeVar

import torch
import torch.distributed as dist

from workers import step_packet
from workers.block_mover import TierOps
from workers.engine_config import EngineConfig
from workers.parallel import TensorParallelError
from workers.step_packet import HostBatch

log = logging.getLogger(__name__)
T = TypeVar("T")
_BETWEEN_STEPS_TIMEOUT = timedelta(days=365)  # waits between steps: as long as a worker may stay idle


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def collective_device(device: torch.device) -> torch.device:
    """Where collectives' tensors must live: CUDA for NCCL, the host for gloo."""
    return device if backend_for(device) == "nccl" else torch.device("cpu")


def rank_device(device: torch.device, rank: int) -> torch.device:
    """Rank r's GPU among those this process sees: ``cuda:r`` for local ranks that see every GPU, ``cuda:0`` for
    a Ray actor that sees only its own."""
    return torch.device("cuda", rank % torch.cuda.device_count()) if device.type == "cuda" else device


def rendezvous(rank: int, world_size: int, port: int, timeout_s: float) -> dist.TCPStore:
    """The group's store: rank 0 serves it (``port`` 0: on a port the OS picks, so no other process can take it
    first; ``store.port`` says which), the other ranks connect to it on ``port``."""
    return dist.TCPStore("127.0.0.1", port, world_size, is_master=rank == 0, timeout=timedelta(seconds=timeout_s),
                         wait_for_workers=False)


def announce_joining(store: dist.Store, rank: int) -> None:
    """Rank ``rank`` has started and is about to join the group (``wait_for_ranks_to_join``)."""
    store.set(_joining_key(rank), "1")


def _joining_key(rank: int) -> str:
    return f"kvtier/rank/{rank}/joining"


def init_group(rank: int, world_size: int, store: dist.Store, device: torch.device,
               timeout_s: float) -> Collectives:
    """Join the default process group over ``store``, and the group for waits between steps; the collectives
    over both. A failure leaves nothing behind that would stop this process forming another group."""
    try:
        dist.init_process_group(backend_for(device), store=store, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout_s))
        between_steps = dist.new_group(list(range(world_size)), timeout=_BETWEEN_STEPS_TIMEOUT)
    except BaseException:
        _forget_failed_group()
        raise
    return Collectives(device, between_steps, timedelta(seconds=timeout_s))


def _forget_failed_group() -> None:
    """torch names each default group by a counter that only ``destroy_process_group`` resets, and a failed
    ``init_process_group`` leaves it raised: the next group this process forms would wait for keys under a
    name its fresh ranks do not use. (A private attribute; a test forms a group after a failed one.)"""
    if dist.is_initialized():
        dist.destroy_process_group()
    else:
        dist.distributed_c10d._world.group_count = 0


class Collectives:
    """The broadcasts rank 0 and the other ranks exchange, on the device the backend needs: within a step on
    the default group (``collective_timeout_s``), between steps on ``between_steps``: no practical timeout for
    the ranks that wait there, ``send_timeout`` for rank 0, which sends only when it has work for them (a rank
    that does not take it within that is dead or stuck)."""

    def __init__(self, device: torch.device, between_steps: dist.ProcessGroup, send_timeout: timedelta) -> None:
        self.device = collective_device(device)
        self.between_steps = between_steps
        self.send_timeout = send_timeout

    def send(self, tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> None:
        dist.broadcast(tensor.to(self.device), src=0, group=group)

    def receive(self, size: int, group: dist.ProcessGroup | None = None) -> torch.Tensor:
        tensor = torch.empty(size, dtype=torch.long, device=self.device)
        dist.broadcast(tensor, src=0, group=group)
        return tensor.cpu()

    def send_header(self, tensor: torch.Tensor, timeout: timedelta | None = None) -> None:
        """What the other ranks wait for between steps: the next message's header. With gloo it raises
        RuntimeError after ``timeout`` (default ``send_timeout``; the group's own timeout is a year): gloo's
        sender waits until its receivers post theirs, which they do at once after each step, so a rank that has
        not by then is stuck.
        With NCCL the wait stays unbounded here: a bounded wait would stall the host on the device every step
        (NCCL's watchdog bounds it instead)."""
        work = dist.broadcast(tensor.to(self.device), src=0, group=self.between_steps, async_op=True)
        if self.device.type == "cpu":
            work.wait(timeout or self.send_timeout)
        else:
            work.wait()

    def receive_header(self, size: int) -> torch.Tensor:
        return self.receive(size, self.between_steps)

    def receive_message(self) -> HostBatch | TierOps | None:
        """The next step's batch or tier moves, or None when rank 0 says stop."""
        header = self.receive_header(step_packet.HEADER_SIZE)
        command = header[0].item()
        if command == step_packet.STOP:
            return None
        if command == step_packet.TIER:
            counts = header[1:].tolist()
            return TierOps.from_flat(counts, self.receive(counts[0] + 2 * (counts[1] + counts[2]) + counts[3]).tolist())
        return step_packet.unpack(header, self.receive(step_packet.body_size(header)))


class RankProcesses(Protocol):
    """Ranks 1..N-1 of one group, however they run."""

    def ended(self) -> str | None:
        """How the first rank that is no longer running ended (None: all run)."""

    def wait(self, timeout_s: float) -> bool:
        """Wait for every rank to end; False if some still run after ``timeout_s``."""

    def kill(self) -> None: ...


RankLauncher = Callable[[int, int, EngineConfig], RankProcesses]  # (world size, rendezvous port, config)


class TPGroup:
    def __init__(self, config: EngineConfig, device: torch.device, launch: RankLauncher | None = None) -> None:
        self.world_size = config.tensor_parallel_size
        self._broken: str | None = None  # why the ranks' collectives may be out of step (then stop kills them)
        store = rendezvous(0, self.world_size, 0, config.collective_timeout_s)
        self.ranks = (launch or spawn_local_ranks)(self.world_size, store.port, config)
        try:
            self.wait_for_ranks_to_join(store, config.rank_start_timeout_s)
            self.collectives = init_group(0, self.world_size, store, device, config.collective_timeout_s)
        except Exception:
            self.ranks.kill()
            raise

    def wait_for_ranks_to_join(self, store: dist.Store, timeout_s: float) -> None:
        """Until every other rank has announced itself: a ``TensorParallelError`` if one ends first, a
        ``TimeoutError`` naming the missing ranks after ``timeout_s``."""
        keys = [_joining_key(rank) for rank in range(1, self.world_size)]
        if not self._wait_while_ranks_run(lambda: store.check(keys), timeout_s):
            missing = [rank for rank in range(1, self.world_size) if not store.check([_joining_key(rank)])]
            raise TimeoutError(f"tensor-parallel ranks {missing} did not start within rank_start_timeout_s "
                               f"({timeout_s:g} s)")

    def broadcast_sizes(self, num_blocks: int, num_cpu_slots: int) -> None:
        """Rank 0 sized the pools; every rank allocates the same number of GPU blocks and CPU slots."""
        sizes = torch.tensor([num_blocks, num_cpu_slots], dtype=torch.long)
        # unbounded: a rank may still be loading its weights (it waits for these on the between-steps group)
        self._guarded(lambda: self.collectives.send(sizes, self.collectives.between_steps))

    def run_tier_ops(self, ops: TierOps, run: Callable[[], T]) -> T:
        """Send ``ops`` to the other ranks, then ``run`` this rank's part (their collectives meet)."""
        header = torch.tensor([step_packet.TIER, *ops.counts()], dtype=torch.long)
        body = torch.tensor(ops.flat(), dtype=torch.long)

        def tier_step() -> T:
            self.collectives.send_header(header)
            if body.numel():
                self.collectives.send(body)
            return run()

        return self._guarded(tier_step)

    def run_step(self, batch: HostBatch, run: Callable[[], T]) -> T:
        """Broadcast ``batch``, then ``run`` this rank's share of the step (its all-reduces meet the others')."""
        header, body = step_packet.pack(batch)

        def step() -> T:
            self.collectives.send_header(header)
            self.collectives.send(body)
            return run()

        return self._guarded(step)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Tell the other ranks to stop, between steps, and wait up to ``timeout_s`` for them; kill them if they
        do not, or at once where a step was cut short (they may wait inside it, where no stop reaches them)."""
        try:
            if self._broken is not None:
                raise RuntimeError(self._broken)
            if self.ranks.ended() is None:
                self.collectives.send_header(step_packet.stop_header(), timedelta(seconds=timeout_s))
            if not self.ranks.wait(timeout_s):
                raise TimeoutError(f"ranks still running after {timeout_s} s")
        except (RuntimeError, TimeoutError) as error:
            log.warning("tensor-parallel ranks did not stop cleanly (%s); killing them", error)
            self.ranks.kill()
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()

    def check_alive(self) -> None:
        ended = self.ranks.ended()
        if ended is not None:
            raise TensorParallelError(f"tensor-parallel {ended}; the group must be restarted")

    def _guarded(self, collective: Callable[[], T]) -> T:
        self.check_alive()
        try:
            return collective()
        except RuntimeError as error:  # gloo/NCCL: a peer closed its connection or the timeout passed
            self._broken = "a collective failed"
            self._name_the_dead_rank(grace_s=2.0)
            raise TensorParallelError(f"tensor-parallel collective failed: {error}") from error
        except BaseException:  # KeyboardInterrupt, SystemExit: the ranks may be left inside the step
            self._broken = "a step was interrupted"
            raise

    def _name_the_dead_rank(self, grace_s: float) -> None:
        """A peer's socket can close a moment before its process is reapable: wait briefly to name it."""
        self._wait_while_ranks_run(lambda: False, grace_s)

    def _wait_while_ranks_run(self, done: Callable[[], bool], timeout_s: float) -> bool:
        """Poll ``done`` every 50 ms for up to ``timeout_s``, raising ``TensorParallelError`` as soon as a rank
        has ended; whether ``done`` came true."""
        deadline = time.monotonic() + timeout_s
        while not done():
            self.check_alive()
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True


class LocalRanks:
    """Ranks 1..N-1 as child processes of this one (``python -m workers.tp_worker``)."""

    def __init__(self, processes: list[subprocess.Popen]) -> None:
        self.processes = processes

    def ended(self) -> str | None:
        for rank, process in enumerate(self.processes, start=1):
            if process.poll() is not None:
                return f"rank {rank} (pid {process.pid}) exited with code {process.returncode}"
        return None

    def wait(self, timeout_s: float) -> bool:
        try:
            for process in self.processes:
                process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return False
        return True

    def kill(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
                process.wait()


def spawn_local_ranks(world_size: int, port: int, config: EngineConfig) -> LocalRanks:
    ranks = LocalRanks([_spawn_rank(rank, world_size, port, config) for rank in range(1, world_size)])
    log.info("tensor parallel: %d ranks, pids %s", world_size, [p.pid for p in ranks.processes])
    return ranks


def _spawn_rank(rank: int, world_size: int, port: int, config: EngineConfig) -> subprocess.Popen:
    command = [
        sys.executable, "-m", "workers.tp_worker", "--rank", str(rank), "--world-size", str(world_size),
        "--port", str(port), "--config-json", json.dumps(asdict(config)),
    ]
    return subprocess.Popen(command, stdout=sys.stderr, stderr=sys.stderr)
