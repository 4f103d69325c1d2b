"""Stall detection: a worker whose engine takes no step while it has requests is stalled, and so is one that
answers no stats reading for as long (a hung process: its sockets stay open, nothing tells its steps). Pure
data."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class _Progress:
    steps: float
    since: float  # when ``steps`` last changed, or requests were first seen waiting after an idle reading
    pending: float
    answered: float  # when the worker last answered a reading


class ProgressWatch:
    """Fed each worker's step counter and pending request count over time; says which workers are stalled."""

    def __init__(self, stall_timeout_s: float) -> None:
        self.stall_timeout_s = stall_timeout_s
        self._progress: dict[str, _Progress] = {}

    def observe(self, worker_id: str, steps: float, pending: float, now: float) -> bool:
        """Record one reading; True when the worker has had pending requests and no new step for too long.

        The clock starts at the first reading that sees requests waiting, not at the idle reading before it
        (they may have arrived just now): a stall is called only after at least ``stall_timeout_s`` of waiting,
        and at most one reading interval later than that."""
        last = self._progress.get(worker_id)
        if last is None or steps != last.steps or pending == 0 or last.pending == 0:
            self._progress[worker_id] = _Progress(steps, now, pending, answered=now)
            return False
        last.answered = now
        return now - last.since > self.stall_timeout_s

    def no_answer(self, worker_id: str, now: float) -> bool:
        """A reading the worker did not answer (in time); True once it has answered none for longer than
        ``stall_timeout_s``. The clock starts at its last answer, or at this first silence."""
        last = self._progress.get(worker_id)
        if last is None:
            self._progress[worker_id] = _Progress(steps=-1.0, since=now, pending=0.0, answered=now)
            return False
        return now - last.answered > self.stall_timeout_s

    def forget(self, worker_id: str) -> None:
        """The worker is gone (restarted): its next reading starts afresh."""
        self._progress.pop(worker_id, None)
