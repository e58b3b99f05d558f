"""Supervision: keep the right workers running, and act on signals (SPEC 6).

Signal handlers only enqueue; one loop takes them in order and runs `handle_<signal>`, then
reconciles: as many serving workers as wanted, all of the current generation (a HUP starts a
new one, and old workers are replaced one at a time: the replacement is READY before the old
one is told to drain), heartbeats fresh (a silent worker gets SIGABRT, then SIGKILL: see
`liveness`). Nothing here blocks: spawning is fork+exec, exits arrive through pidfds, worker
messages through their channels, decoded by `kilnproxy.control`.

The supervisor feeds the `StatusBoard` and serves `WorkerActions`; it never reads the board's
readers (HTTP, metrics, status socket) and never imports asyncssh. It carries admission's
messages (SPEC 4b) between the workers and the board's `HostAdmission`: counts are passed on
once per pass of the loop, penalties as they are recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from kilnproxy import control
from kilnproxy.config import Config, format_duration, load
from kilnproxy.errors import OperatorError
from kilnproxy.logs import configure, reopen
from master.actions import (
    NoSession,
    NoWorker,
    WorkerBusy,
    WorkerExited,
    WorkerFailed,
    WorkerTimeout,
)
from master.board import StatusBoard
from master.liveness import BOOT_TIMEOUT, Escalation, Liveness, escalation
from master.notify import Notifier
from master.recycle import due, host_quiet, observe
from master.workers import WorkerHandle, WorkerState, spawn

log = logging.getLogger("kilnproxy.master")

FAST_STOP_GRACE = 1.8  # SPEC 6: a fast shutdown is over within 2 s
REQUEST_TIMEOUT = 10.0  # a task dump asked of a worker (it holds the worker's loop)
# A heap profile: its snapshot is taken beside the loop, seconds over a busy worker's traces.
HEAP_TIMEOUT = 60.0
BACKOFF_FIRST, BACKOFF_MAX, BACKOFF_RESET = 0.1, 30.0, 60.0
MAX_BOOT_FAILURES = 3
OPERATOR_EXIT = 2  # the CLI's status for an operator's error, which systemd does not restart
TICK = 0.1
LAST_WORDS = 0.5  # how long a worker's channel is read after it exited
SIGNALS = (signal.SIGTERM, signal.SIGQUIT, signal.SIGINT, signal.SIGHUP, signal.SIGTTIN,
           signal.SIGTTOU, signal.SIGUSR1)  # fmt: skip


class Stopping(enum.Enum):
    NOTICE = "notice"  # serving on, failing health checks, for [timeouts] drain_notice
    DRAIN = "drain"
    FAST = "fast"

    @property
    def message(self) -> control.MasterMessage:
        """What every worker is told, including one that becomes ready during the stop."""
        if self is Stopping.NOTICE:
            return control.DrainNotice()
        return control.Drain(stopping=True) if self is Stopping.DRAIN else control.Stop()


Vet = Callable[[Config], None]  # raises OperatorError for what no worker could start with


class Supervisor:
    def __init__(
        self,
        config: Config,
        config_path: Path | None,
        board: StatusBoard,
        notifier: Notifier,
        vet: Vet | None = None,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.vet = vet  # asks what the master cannot (host keys: asyncssh's, not the master's)
        self.board = board
        self.notifier = notifier
        self.desired = config.workers.count
        self.generation = 0
        self.workers: list[WorkerHandle] = []
        self.stopping: Stopping | None = None
        self.stop_deadline = 0.0
        self.exit_status = 0
        self._signals: asyncio.Queue[int] = asyncio.Queue()
        self._listeners: list[socket.socket] = []
        self._spawning = 0
        self._backoff: dict[int, float] = {}
        self._not_before: dict[int, float] = {}
        self._boot_failures = 0
        self._ready_announced = False
        self._reloading = False
        self._stalled_generation = -1  # the rolling restart whose stall was last told
        self._tasks: set[asyncio.Task[None]] = set()
        self._request_ids = itertools.count(1)
        self._counts_due = False  # a pass of the loop will tell workers what changed

    # -- the loop ----------------------------------------------------------------------------------

    def catch_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for handled in SIGNALS:
            loop.add_signal_handler(handled, self._signals.put_nowait, int(handled))

    async def run(self, listeners: list[socket.socket]) -> int:
        """Supervise until stopped and every worker is gone; the master's exit status."""
        self._listeners = listeners
        try:
            while not self._finished():
                self.reconcile()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(TICK):
                        signum = await self._signals.get()
                        log.info("received %s", signal.Signals(signum).name)
                        getattr(self, f"handle_{signal.Signals(signum).name.lower()}")()
        finally:
            for task in self._tasks:
                task.cancel()
            self._close_listeners()
        return self.exit_status

    def _finished(self) -> bool:
        return self.stopping is not None and not self.workers and self._spawning == 0

    def _background(self, coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- signals -----------------------------------------------------------------------------------

    def handle_sigterm(self) -> None:
        if self.stopping is not None:
            self._begin_stop(Stopping.FAST)  # a second TERM
        elif self.config.timeouts.drain_notice > 0:
            self._begin_notice(self.config.timeouts.drain_notice)
        else:
            self._begin_stop(Stopping.DRAIN)

    handle_sigquit = handle_sigterm

    def handle_sigint(self) -> None:
        self._begin_stop(Stopping.FAST)

    def handle_sighup(self) -> None:
        if self.stopping is not None:
            return
        # systemd hears of a reload only once it has heard READY=1: before, it still waits
        # for the start, which READY=1 ends only once every worker is ready.
        announced = self._ready_announced
        if announced:
            self.notifier.reloading()
        try:
            config = load(str(self.config_path) if self.config_path else None)
            if self.vet is not None:
                self.vet(config)
            if config.log != self.config.log:
                # The master's own log first: a [log] file it cannot open, no worker could.
                configure(config.log.format, config.log.level, config.log.file)
        except OperatorError as exc:
            log.error("reload refused, nothing changed: %s", exc)
            if announced and not self._reloading:  # else when the restart under way completes
                self.notifier.ready()
            return
        fixed = self.config.fixed_until_restart(config)
        if fixed:
            log.warning("reload: %s changed, in force only after a restart", ", ".join(fixed))
        if config.workers.count != self.config.workers.count:
            self.desired = self._at_most_the_table_allows(config.workers.count)
        self.config = config
        self.board.admission.reconfigure(config.limits.penalty_settings())
        self.generation += 1
        self.board.generation = self.generation
        self._reloading = True
        log.info("rolling restart to generation %d", self.generation)

    def handle_sigttin(self) -> None:
        self.desired = self._at_most_the_table_allows(self.desired + 1)
        log.info("workers wanted: %d", self.desired)

    def _at_most_the_table_allows(self, count: int) -> int:
        """`count` workers, if the startup table has a slot for each and for a replacement
        beside each (a rolling restart runs both): a slot sized at the master's start. Else
        as many as it has, said in one line: more take a restart."""
        most: int = self.board.admission.table.slots // 2
        if count > most:
            log.warning("workers wanted: %d, but %d is the most this master runs (its startup "
                        "table, sized at its start); more take a restart", count, most)  # fmt: skip
        return min(count, most)

    def handle_sigttou(self) -> None:
        self.desired = max(1, self.desired - 1)
        log.info("workers wanted: %d", self.desired)

    def handle_sigusr1(self) -> None:
        reopen(self.config.log.format, self.config.log.level, self.config.log.file)
        for worker in self.workers:
            self._signal(worker, signal.SIGUSR1)

    def _begin_notice(self, seconds: float) -> None:
        """Keep the listeners open and serving while the load balancer's health checks fail,
        so that it stops sending connections here; then drain (`reconcile`). Closing at once
        would reset the connections queued on the socket, which a balancer cannot retry."""
        self.stopping = Stopping.NOTICE
        self.board.stopping = True
        self.notifier.stopping()
        self.stop_deadline = time.monotonic() + seconds  # when the drain proper begins
        log.info("drain in %s: failing health checks meanwhile", format_duration(seconds))
        for worker in self.workers:
            if worker.channel is not None:
                worker.channel.send(control.DrainNotice())

    def _begin_stop(self, mode: Stopping) -> None:
        if self.stopping is Stopping.FAST:
            return
        self.stopping = mode
        self.board.stopping = True
        self.notifier.stopping()
        self._close_listeners()  # new connections are refused from now on
        grace = self.config.timeouts.drain + 10 if mode is Stopping.DRAIN else FAST_STOP_GRACE
        self.stop_deadline = time.monotonic() + grace
        log.info("%s stop of %d workers", mode.value, len(self.workers))
        for worker in self.workers:
            if worker.channel is not None:
                worker.channel.send(mode.message)
            if worker.state is not WorkerState.EXITED:
                worker.state = WorkerState.DRAINING

    def _close_listeners(self) -> None:
        for sock in self._listeners:
            sock.close()
        self._listeners = []

    # -- keeping the right workers -----------------------------------------------------------------

    def reconcile(self) -> None:
        now = time.monotonic()
        self._check_heartbeats(now)
        if self.stopping is Stopping.NOTICE and now >= self.stop_deadline:
            self._begin_stop(Stopping.DRAIN)
        if self.stopping is Stopping.DRAIN or self.stopping is Stopping.FAST:
            if now > self.stop_deadline:
                for worker in self.workers:
                    self._signal(worker, signal.SIGKILL)
            return
        serving = [w for w in self.workers if w.serving]
        starting = [w for w in serving if w.state is WorkerState.STARTING]
        if len(serving) + self._spawning < self.desired:
            self._spawn_missing(serving, now)  # in a drain notice too: the host serves on
        elif self.stopping is Stopping.NOTICE:
            return  # nothing else changes before the drain
        elif len(serving) > self.desired and not starting:
            self._drain_one(self._surplus(serving))
        elif not starting and self._spawning == 0:
            old = [w for w in serving if self._stale(w)]
            if old and self._not_before.get(old[0].index, 0.0) <= now:
                self._start(old[0].index)  # the replacement; old[0] drains once it is READY
            elif self._reloading and not old:
                self._reloading = False
                self.notifier.ready()
                log.info("rolling restart to generation %d complete", self.generation)

    def _stale(self, worker: WorkerHandle) -> bool:
        """To be replaced: of an older generation (HUP), or recycled for its memory."""
        return worker.generation < self.generation or worker.recycling

    def _spawn_missing(self, serving: list[WorkerHandle], now: float) -> None:
        """Fill the lowest free slots. A slot in backoff is waited for, never skipped: taking
        the next index instead would restart a crashing worker with no backoff at all."""
        taken = {w.index for w in serving}
        for index in range(self.desired + len(serving)):
            if len(serving) + self._spawning >= self.desired:
                return
            if index in taken:
                continue
            if self._not_before.get(index, 0.0) > now:
                return
            self._start(index)

    def _surplus(self, serving: list[WorkerHandle]) -> WorkerHandle:
        """Which worker goes: an old (or recycled) one whose slot has its replacement READY,
        else an old one, else the highest index (TTOU)."""
        current = {w.index for w in serving if not self._stale(w)}

        def order(w: WorkerHandle) -> tuple[bool, bool, int, int]:
            replaced = self._stale(w) and w.index in current
            return (not replaced, not self._stale(w), w.generation, -w.index)

        return min(serving, key=order)

    def _start(self, index: int) -> None:
        if not self._starts_allowed():
            return
        self._spawning += 1
        self._background(self._spawn(index, self.generation))

    def _starts_allowed(self) -> bool:
        """Not once a stop has begun, but during a drain notice: the host serves on."""
        return self.stopping in (None, Stopping.NOTICE) and bool(self._listeners)

    async def _spawn(self, index: int, generation: int) -> None:
        if not self._starts_allowed():  # a stop came since `_start`
            self._spawning -= 1
            return
        admission = self.board.admission
        slot = admission.claim_slot()
        try:
            if slot is None:
                self._hurry_a_drain()
                raise OSError(f"all {admission.table.slots} slots of the startup table are taken")
            startups = (admission.table.fileno(), slot)
            handle = await spawn(
                index, generation, self._listeners, self.config_path, startups, self.config.text
            )
        except OSError as exc:
            log.error("cannot start worker %d: %s", index, exc)
            if slot is not None:
                admission.release_slot(slot)
            self._not_before[index] = time.monotonic() + self._next_backoff(index)
            return
        finally:
            self._spawning -= 1
        self.workers.append(handle)
        self.board.joined(handle)
        for message in admission.joined(handle.pid, slot):
            assert handle.channel is not None
            handle.channel.send(message)
        asyncio.get_running_loop().add_reader(handle.pidfd, self._exited, handle)
        handle.listener = self._background(self._listen(handle))
        log.info("started worker %d (pid %d, generation %d)", index, handle.pid, generation)
        if self.stopping in (Stopping.DRAIN, Stopping.FAST) and handle.channel is not None:
            handle.state = WorkerState.DRAINING  # the stop came while it started: it stops too
            handle.channel.send(self.stopping.message)

    def _hurry_a_drain(self) -> None:
        """Every slot is held, by replaced workers waiting for their sessions (a HUP cuts none):
        the oldest of them gets a TERM, as a worker restarted alone does, which cuts what it
        has left at the drain timeout; its slot is free when it exits. One at a time."""
        waiting = [w for w in self.workers if w.state is WorkerState.DRAINING and not w.hurried]
        if waiting and not any(w.hurried for w in self.workers):
            oldest = min(waiting, key=lambda w: w.started_at)
            oldest.hurried = True
            log.warning("no free slot: worker %d (pid %d) cuts what is left in %s",
                        oldest.index, oldest.pid,
                        format_duration(self.config.timeouts.drain))  # fmt: skip
            self._signal(oldest, signal.SIGTERM)

    def _drain_one(self, worker: WorkerHandle) -> None:
        log.info("draining worker %d (pid %d)", worker.index, worker.pid)
        worker.state = WorkerState.DRAINING
        if worker.channel is not None:
            worker.channel.send(control.Drain(stopping=False))

    # -- what workers say, and how they end --------------------------------------------------------

    async def _listen(self, worker: WorkerHandle) -> None:
        assert worker.channel is not None
        while (message := await worker.channel.receive()) is not None:
            worker.last_heartbeat = time.monotonic()
            try:  # a bug on one message must not leave the worker unheard, then killed
                self._on_message(worker, message)
            except Exception:
                log.exception("failed on worker %d's %s", worker.index, message.kind.value)

    def _on_message(self, worker: WorkerHandle, message: control.WorkerMessage) -> None:
        match message:
            case control.Ready():
                self._on_ready(worker)
            case control.Heartbeat():
                self.board.heard(worker, message)
                self._watch_memory(worker, message.stats.rss)
            case control.Reply():
                waiter = worker.pending.pop(message.id, None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(message)
            case control.Draining() if worker.state is not WorkerState.EXITED:
                log.info("worker %d (pid %d) drains on its own", worker.index, worker.pid)
                worker.state = WorkerState.DRAINING  # its replacement starts at once
            case control.SessionClosed():
                self.board.sessions_closed(worker, message.sessions)
            case control.CountsChanged():
                self.board.admission.changed(worker.pid, message)
                self._tell_counts()
            case control.Offences():
                for penalties in self.board.admission.offences(message):
                    self._broadcast(penalties)

    def _watch_memory(self, worker: WorkerHandle, rss: int) -> None:
        """Recycle `worker` once its memory is due (`master.recycle`), if no other worker is
        being replaced: at most one recycle at a time, and none during a rolling restart."""
        factor = self.config.workers.recycle_rss_factor
        now = time.monotonic()
        serving = [w for w in self.workers if w.serving]
        quiet = host_quiet(self.board.admission.statistics().unauthenticated, len(serving))
        ready = worker.state is WorkerState.READY
        worker.memory = observe(worker.memory, rss, ready, quiet, now, factor)
        if not due(worker.memory, now) or worker.recycling:
            return
        # One recycle at a time, its old worker's drain included. A worker a HUP replaced holds
        # up none: it may wait for its sessions for hours.
        busy = any(w.recycling for w in self.workers) or any(
            w.state is not WorkerState.READY or self._stale(w) for w in serving
        )
        if busy or self._spawning or self._reloading or self.stopping is not None:
            return
        worker.recycling = True
        self.board.recycles += 1
        log.info("recycling worker %d (pid %d): RSS %d MiB over %.1fx its %d MiB after start",
                 worker.index, worker.pid, rss >> 20, factor,
                 worker.memory.baseline >> 20)  # fmt: skip

    def _tell_counts(self) -> None:
        """Pass the workers' changed counts on at the end of this pass: one message per
        worker for whatever this pass brought, from however many workers."""
        if not self._counts_due:
            self._counts_due = True
            asyncio.get_running_loop().call_soon(self._send_counts)

    def _send_counts(self) -> None:
        self._counts_due = False
        told = self.board.admission.outbox()
        for worker in self.workers:
            message = told.get(worker.pid)
            if message is not None and worker.channel is not None:
                worker.channel.send(message)

    def _broadcast(self, message: control.MasterMessage) -> None:
        for worker in self.workers:
            if worker.channel is not None and worker.state is not WorkerState.EXITED:
                worker.channel.send(message)

    def _on_ready(self, worker: WorkerHandle) -> None:
        worker.ready_at = time.monotonic()
        if worker.state is WorkerState.STARTING:
            worker.state = WorkerState.READY
        self._boot_failures = 0
        log.info("worker %d (pid %d) ready", worker.index, worker.pid)
        if self.stopping is not None and worker.channel is not None:
            worker.channel.send(self.stopping.message)
        if not self._ready_announced and self._all_ready():
            self._ready_announced = True
            self.notifier.ready()
            log.info("all %d workers ready", self.desired)

    def _all_ready(self) -> bool:
        ready = [w for w in self.workers if w.state is WorkerState.READY]
        return len(ready) >= self.desired

    def _exited(self, worker: WorkerHandle) -> None:
        """Its pidfd says the worker exited. What it said last (the heartbeat a worker sends as
        it goes, sessions closed) may still be unread on its channel: that is read to its end
        (a moment; at most LAST_WORDS, and never past a fast stop's deadline) before the worker
        is accounted for as gone, so that none of its counts is lost."""
        asyncio.get_running_loop().remove_reader(worker.pidfd)
        self._background(self._reap(worker))

    async def _reap(self, worker: WorkerHandle) -> None:
        try:
            within = LAST_WORDS
            if self.stopping is Stopping.FAST:
                within = min(within, max(0.0, self.stop_deadline - time.monotonic()))
            if worker.listener is not None:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(within):
                        await asyncio.shield(worker.listener)
        finally:  # whatever happened above, the worker is gone: a stop waits for none
            self._gone(worker)

    def _gone(self, worker: WorkerHandle) -> None:
        status = worker.proc.poll()  # its exit status (a heartbeat check may have reaped it)
        if status is None:  # not what a pidfd says: not left running untracked
            log.error("worker %d (pid %d) reported gone, still running: killed", worker.index,
                      worker.pid)  # fmt: skip
            self._signal(worker, signal.SIGKILL)
            status = -signal.SIGKILL
        os.close(worker.pidfd)
        if worker.channel is not None:
            worker.channel.close()
        expected = worker.state is WorkerState.DRAINING
        was_ready = worker.ready_at is not None
        worker.state = WorkerState.EXITED
        self.workers.remove(worker)
        self.board.left(worker, died=not expected)
        self.board.admission.left(worker.pid)
        self._tell_counts()
        for waiter in worker.pending.values():
            if not waiter.done():
                waiter.set_exception(WorkerExited(worker.index))
        if expected:
            log.info(
                "worker %d (pid %d) exited %d after draining", worker.index, worker.pid, status
            )
            return
        log.warning("worker %d (pid %d) died with status %d", worker.index, worker.pid, status)
        if not was_ready:
            self._boot_failure(worker, status)
        elif worker.ready_at is not None and time.monotonic() - worker.ready_at >= BACKOFF_RESET:
            self._backoff.pop(worker.index, None)
        self._not_before[worker.index] = time.monotonic() + self._next_backoff(worker.index)

    def _boot_failure(self, worker: WorkerHandle, status: int) -> None:
        """A worker died before it was ready. With none serving (the master's start, or every
        worker gone), MAX_BOOT_FAILURES in a row stop the master: a host key or a file it
        cannot read will not mend itself. While others serve, they serve on: the slot is tried
        again with its backoff (a rolling restart or a recycle waits), and a stall is logged."""
        self._boot_failures += 1
        operators = status == control.WORKER_BOOT_ERROR
        reason = "cannot boot" if operators else f"exited {status} while booting"
        serving = sum(w.state is WorkerState.READY for w in self.workers)
        if serving:
            log.error("worker %d %s (%d in a row); %d worker(s) serve on, and it is tried "
                      "again", worker.index, reason, self._boot_failures, serving)  # fmt: skip
            stalled = self._boot_failures >= MAX_BOOT_FAILURES and self._reloading
            if stalled and self._stalled_generation != self.generation:
                self._stalled_generation = self.generation  # said once per HUP
                log.error("rolling restart to generation %d stalled: its workers cannot boot; "
                          "the old ones serve on until one can", self.generation)  # fmt: skip
                if self._ready_announced:  # else the start's READY=1 is still to come
                    self.notifier.ready()  # the reload is over, as far as systemd waits for it
            return
        log.error("worker %d %s (%d of %d tries)", worker.index, reason,
                  self._boot_failures, MAX_BOOT_FAILURES)  # fmt: skip
        if self._boot_failures >= MAX_BOOT_FAILURES and self.stopping is None:
            log.error("workers cannot boot; the master gives up")
            # An operator's problem (exit 2: systemd does not restart it), or a crash (1).
            self.exit_status = OPERATOR_EXIT if operators else 1
            self._begin_stop(Stopping.FAST)

    def _next_backoff(self, index: int) -> float:
        delay = min(BACKOFF_MAX, self._backoff.get(index, BACKOFF_FIRST / 2) * 2)
        self._backoff[index] = delay
        return delay

    def _check_heartbeats(self, now: float) -> None:
        for worker in self.workers:
            if worker.proc.poll() is not None:
                continue
            step = escalation(worker, now)
            if step is Escalation.KILL_UNBOOTED:
                log.error("worker %d (pid %d) not ready after %.0fs: SIGKILL",
                          worker.index, worker.pid, BOOT_TIMEOUT)  # fmt: skip
                worker.liveness = Liveness.KILLED
                self._signal(worker, signal.SIGKILL)
            elif step is Escalation.ABORT:
                log.error("worker %d (pid %d) silent for %.0fs: SIGABRT for its stacks",
                          worker.index, worker.pid, now - worker.last_heartbeat)  # fmt: skip
                worker.liveness, worker.aborted_at = Liveness.ABORTED, now
                self._signal(worker, signal.SIGABRT)
                self._signal(worker, signal.SIGCONT)  # a stopped worker must run to dump them
            elif step is Escalation.KILL:
                log.error("worker %d (pid %d) still there: SIGKILL", worker.index, worker.pid)
                worker.liveness = Liveness.KILLED
                self._signal(worker, signal.SIGKILL)

    def _signal(self, worker: WorkerHandle, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            worker.proc.send_signal(signum)

    # -- what the read side may ask (actions.WorkerActions) ----------------------------------------

    def end_session(self, session: str) -> None:
        pid = self.board.table.owner(session)
        worker = next((w for w in self.workers if w.pid == pid), None)
        if worker is None or worker.channel is None:
            raise NoSession(session)
        worker.channel.send(control.KillSession(session))

    async def dump_tasks(self, index: int, pid: int | None = None) -> dict[str, Any]:
        return await self._ask(index, pid, control.TaskDumpRequest)

    async def profile_heap(
        self, index: int, top: int, seconds: float, stop: bool, peek: bool, pid: int | None = None
    ) -> dict[str, Any]:
        return await self._ask(
            index, pid, lambda i: control.HeapProfileRequest(i, top, seconds, stop, peek),
            HEAP_TIMEOUT,
        )  # fmt: skip

    async def _ask(
        self,
        index: int,
        pid: int | None,
        request: Callable[[int], control.MasterMessage],
        within: float = REQUEST_TIMEOUT,
    ) -> dict[str, Any]:
        """Ask worker `index` (the request is made with its id); wait a bounded time. Without
        `pid`, the worker that speaks for the slot (the newer of two in a rolling restart's
        step); with it, that one, draining too (a drain that does not end is worth a dump).
        The answer names the pid that gave it."""
        live = [w for w in self.workers if w.index == index and w.state is not WorkerState.EXITED]
        if pid is not None:
            worker = next((w for w in live if w.pid == pid), None)
        else:
            worker = max((w for w in live if w.serving), key=lambda w: w.started_at, default=None)
        if worker is None or worker.channel is None:
            raise NoWorker(index)
        if worker.pending:
            raise WorkerBusy(index)
        request_id = next(self._request_ids)
        waiter: asyncio.Future[control.Reply] = asyncio.get_running_loop().create_future()
        worker.pending[request_id] = waiter
        worker.channel.send(request(request_id))
        try:
            async with asyncio.timeout(within):
                reply = await waiter
        except TimeoutError:
            raise WorkerTimeout(index, within) from None
        finally:
            worker.pending.pop(request_id, None)
        if reply.data is None:
            raise WorkerFailed(reply.error or f"worker {index} sent no data")
        return {"pid": worker.pid, **reply.data}
