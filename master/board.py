"""The status board: what the master knows of its workers, for whoever reads it.

Rule 1: the supervisor feeds it (`joined`, `heard`, `sessions_closed`, `left`, and the generation
and stopping flag) and nothing else writes to it. Its readers are the status socket, the HTTP
server, the Prometheus collector and the sd_notify reports.
Rule 2: it never starts, signals or messages a worker: what a reader asks of a worker goes
through `actions.WorkerActions`.

It holds the connection table, the memory history, the latest heartbeat of each live worker,
the totals of workers that are gone (so that counters never go backwards), the restart count,
and the host's side of admission (`admission`: the penalty table and every worker's counts,
which the supervisor also feeds, from the workers' admission messages).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable
from typing import Protocol

from kilnproxy.control import FastPathState, Heartbeat, MetricsSnapshot, WorkerStats
from kilnproxy.policy.penalty import PenaltySettings
from master.admission import MIN_SLOTS, HostAdmission
from master.history import MemoryHistory
from master.table import ConnectionTable
from master.workers import WorkerState

HEALTHY_HEARTBEAT = 3.0  # watchdog pings pause when a worker is quieter than this

# What the board reports of a worker not heard from yet.
SILENT = WorkerStats(
    index=0, pid=0, started_at=0.0, sessions=0, sessions_total=0, tasks=0, fds=0, rss=0, heap=0,
    accepting=False, backend_connections=0, fast_path=FastPathState.NOT_APPLIED,
)  # fmt: skip


def fast_path_summary(states: Counter[FastPathState]) -> str:
    """The serving workers' fast path in one word when they agree ("on"); else each state with
    its count ("on 3, unsupported 1"); "none" without a serving worker."""
    if len(states) == 1:
        return next(iter(states)).value
    if not states:
        return "none"
    return ", ".join(f"{state.value} {count}" for state, count in sorted(
        states.items(), key=lambda item: item[0].value))  # fmt: skip


class WorkerView(Protocol):
    """What the board reads of a live worker (the supervisor's WorkerHandle is one)."""

    @property
    def index(self) -> int: ...
    @property
    def pid(self) -> int: ...
    @property
    def generation(self) -> int: ...
    @property
    def state(self) -> WorkerState: ...
    @property
    def serving(self) -> bool: ...
    @property
    def started_at(self) -> float: ...  # monotonic
    @property
    def last_heartbeat(self) -> float: ...  # monotonic


class StatusBoard:
    def __init__(self, penalties: PenaltySettings | None = None, slots: int = MIN_SLOTS) -> None:
        self.started_at = time.time()
        self.admission = HostAdmission(penalties or PenaltySettings(), slots=slots)
        self.generation = 0
        self.stopping = False
        self.restarts = 0  # workers that died and were replaced
        self.recycles = 0  # workers replaced for their memory ([workers] recycle_rss_factor)
        self.table = ConnectionTable()
        self.memory = MemoryHistory()
        self.retired = MetricsSnapshot()  # what workers that are gone had counted
        self._workers: dict[int, WorkerView] = {}  # by pid, in the order they started
        self._latest: dict[int, Heartbeat] = {}  # by pid

    # -- fed by the supervisor ---------------------------------------------------------------------

    def joined(self, worker: WorkerView) -> None:
        self._workers[worker.pid] = worker

    def heard(self, worker: WorkerView, beat: Heartbeat) -> None:
        if worker.pid not in self._workers:
            return  # a line read after its exit: its rows would never leave the table
        self._latest[worker.pid] = beat
        self.table.update(worker.pid, worker.index, beat.sessions)

    def sessions_closed(self, worker: WorkerView, sessions: Iterable[str]) -> None:
        for session in sessions:
            self.table.remove(worker.pid, session)

    def left(self, worker: WorkerView, died: bool) -> None:
        """`worker` exited; `died` if it was not draining (it is replaced: a restart)."""
        self._workers.pop(worker.pid, None)
        self.table.drop_worker(worker.pid)
        beat = self._latest.pop(worker.pid, None)
        if beat is not None:
            self.retired = self.retired.merge(beat.metrics)
        if died:
            self.restarts += 1

    # -- read ------------------------------------------------------------------------------------

    def workers(self) -> list[WorkerView]:
        """Every live worker (serving, or draining), in the order they started."""
        return list(self._workers.values())

    def serving(self) -> list[WorkerView]:
        return [w for w in self._workers.values() if w.serving]

    def stats(self, worker: WorkerView) -> WorkerStats:
        """Its latest statistics; zeros until its first heartbeat."""
        beat = self._latest.get(worker.pid)
        return beat.stats if beat else SILENT

    def sessions_open(self) -> int:
        return sum(self.stats(w).sessions for w in self._workers.values())

    def totals(self) -> MetricsSnapshot:
        """Every counter since the master started: workers gone, and every live worker."""
        total = self.retired
        for beat in self._latest.values():
            total = total.merge(beat.metrics)
        return total

    def fast_path(self) -> Counter[FastPathState]:
        """How many serving workers are in each fast path state (kilnproxy/ssh/fast_path.py)."""
        return Counter(self.stats(worker).fast_path for worker in self.serving())

    def pooled(self) -> Counter[str]:
        """Pooled backend connections of the serving workers, by backend."""
        pooled: Counter[str] = Counter()
        for worker in self.serving():
            beat = self._latest.get(worker.pid)
            for backend, pool in (beat.pools if beat else {}).items():
                pooled[backend] += pool.connections
        return pooled

    def healthy(self, now: float) -> bool:
        """Some worker is ready, and every ready worker was heard from lately."""
        ready = [w for w in self._workers.values() if w.state is WorkerState.READY]
        return bool(ready) and all(now - w.last_heartbeat < HEALTHY_HEARTBEAT for w in ready)

    def slot_holders(self) -> dict[int, WorkerView]:
        """The worker that speaks for each slot: of two (one replacing the other, a rolling
        restart's step), the newer once it has sent a heartbeat. One series per slot in the
        memory history and in /metrics, where two would be one series sampled twice."""
        holders: dict[int, WorkerView] = {}
        for worker in self.serving():
            held = holders.get(worker.index)
            if worker.pid in self._latest and (held is None or worker.started_at > held.started_at):
                holders[worker.index] = worker
        return dict(sorted(holders.items()))

    def sample_memory(self) -> None:
        """One memory sample per slot, from the worker that speaks for it."""
        t = round(time.time(), 3)
        for index, worker in self.slot_holders().items():
            self.memory.record(index, self._latest[worker.pid].stats, t)
