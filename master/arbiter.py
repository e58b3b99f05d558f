"""The master's loop: keep the right workers running, and act on signals (SPEC 6).

Signal handlers only enqueue; one loop takes them in order and runs `handle_<signal>`, then
reconciles: as many serving workers as wanted, all of the current generation (a HUP starts a
new one, and old workers are replaced one at a time: the replacement is READY before the old
one is told to drain), heartbeats fresh (a silent worker gets SIGABRT, then SIGKILL). Nothing here
blocks: spawning is fork+exec, exits arrive through pidfds, worker messages through streams.
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
from pathlib import Path
from typing import Any

from setproctitle import setproctitle

from kilnproxy.config import Address, Config, format_uptime, load
from kilnproxy.control import WORKER_BOOT_ERROR, Kind, Message
from kilnproxy.errors import OperatorError
from kilnproxy.logs import configure
from kilnproxy.status_socket import serve as serve_status
from kilnproxy.version import build_info
from master.history import MemoryHistory, RetiredTotals
from master.http import start as start_http
from master.notify import Notifier
from master.sockets import listeners
from master.table import ConnectionTable
from master.workers import WorkerHandle, WorkerState, spawn

log = logging.getLogger("kilnproxy.master")

HEARTBEAT_TIMEOUT = 10.0  # then SIGABRT (stacks to the log)
BOOT_TIMEOUT = 30.0  # a worker not READY by then is killed, and counts as a failed boot
ABORT_GRACE = 2.0  # then SIGKILL
HEALTHY_HEARTBEAT = 3.0  # watchdog pings pause when a worker is quieter than this
FAST_STOP_GRACE = 1.8  # SPEC 6: a fast shutdown is over within 2 s
REQUEST_TIMEOUT = 10.0  # a task dump or heap profile asked of a worker
BACKOFF_FIRST, BACKOFF_MAX, BACKOFF_RESET = 0.1, 30.0, 60.0
MAX_BOOT_FAILURES = 3
TICK = 0.1


class Stopping(enum.Enum):
    DRAIN = "drain"
    FAST = "fast"

    @property
    def message(self) -> Message:
        """What every worker is told, including one that becomes ready during the stop."""
        return Message(Kind.DRAIN if self is Stopping.DRAIN else Kind.STOP)


class Master:
    def __init__(self, config: Config, config_arg: str | None) -> None:
        self.config = config
        self.config_path = Path(config_arg).absolute() if config_arg else None
        self.desired = config.workers.count
        self.generation = 0
        self.workers: list[WorkerHandle] = []
        self.table = ConnectionTable()
        self.notifier = Notifier()
        self.started_at = time.time()
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
        self._tasks: set[asyncio.Task[None]] = set()
        self.retired = RetiredTotals()  # what workers that are gone had counted
        self.restarts = 0  # workers that died and were replaced
        self.memory = MemoryHistory()
        self._request_ids = itertools.count(1)

    # -- the loop ----------------------------------------------------------------------------------

    async def run(self) -> int:
        setproctitle("kilnproxy: master")
        loop = asyncio.get_running_loop()
        for handled in (signal.SIGTERM, signal.SIGQUIT, signal.SIGINT, signal.SIGHUP,
                        signal.SIGTTIN, signal.SIGTTOU, signal.SIGUSR1):  # fmt: skip
            loop.add_signal_handler(handled, self._signals.put_nowait, int(handled))
        self._listeners = listeners(self.config.ssh.listen, self.config.ssh.backlog)
        status = await serve_status(self.config.status.socket, self.handle_request)
        http = await start_http(self, self.config.status.http)
        addresses = ", ".join(str(Address(*sock.getsockname()[:2])) for sock in self._listeners)
        log.info("kilnproxy %s master %d listening on %s", build_info().version, os.getpid(),
                 addresses)  # fmt: skip
        self._background(self._report())
        try:
            while not self._finished():
                self.reconcile()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(TICK):
                        signum = await self._signals.get()
                        log.info("received %s", signal.Signals(signum).name)
                        getattr(self, f"handle_{signal.Signals(signum).name.lower()}")()
        finally:
            status.close()
            await http.cleanup()
            for task in self._tasks:
                task.cancel()
            self._close_listeners()
            with contextlib.suppress(FileNotFoundError):
                self.config.status.socket.unlink()
            self.notifier.close()
        log.info("master exits %d", self.exit_status)
        return self.exit_status

    def _finished(self) -> bool:
        return self.stopping is not None and not self.workers and self._spawning == 0

    def _background(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- signals -----------------------------------------------------------------------------------

    def handle_sigterm(self) -> None:
        if self.stopping is None:
            self._begin_stop(Stopping.DRAIN)
        else:
            self._begin_stop(Stopping.FAST)  # a second TERM

    handle_sigquit = handle_sigterm

    def handle_sigint(self) -> None:
        self._begin_stop(Stopping.FAST)

    def handle_sighup(self) -> None:
        if self.stopping is not None:
            return
        self.notifier.reloading()
        try:
            config = load(str(self.config_path) if self.config_path else None)
        except OperatorError as exc:
            log.error("reload refused, nothing changed: %s", exc)
            self.notifier.ready()
            return
        if config.workers.count != self.config.workers.count:
            self.desired = config.workers.count
        self.config = config
        self.generation += 1
        self._reloading = True
        log.info("rolling restart to generation %d", self.generation)

    def handle_sigttin(self) -> None:
        self.desired += 1
        log.info("workers wanted: %d", self.desired)

    def handle_sigttou(self) -> None:
        self.desired = max(1, self.desired - 1)
        log.info("workers wanted: %d", self.desired)

    def handle_sigusr1(self) -> None:
        configure(self.config.log.format, self.config.log.level, self.config.log.file)
        for worker in self.workers:
            self._signal(worker, signal.SIGUSR1)

    def _begin_stop(self, mode: Stopping) -> None:
        if self.stopping is Stopping.FAST:
            return
        self.stopping = mode
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
        if self.stopping is not None:
            if now > self.stop_deadline:
                for worker in self.workers:
                    self._signal(worker, signal.SIGKILL)
            return
        serving = [w for w in self.workers if w.serving]
        starting = [w for w in serving if w.state is WorkerState.STARTING]
        if len(serving) + self._spawning < self.desired:
            self._spawn_missing(serving, now)
        elif len(serving) > self.desired and not starting:
            self._drain_one(self._surplus(serving))
        elif not starting and self._spawning == 0:
            old = [w for w in serving if w.generation < self.generation]
            if old:
                self._start(old[0].index)  # the replacement; old[0] drains once it is READY
            elif self._reloading:
                self._reloading = False
                self.notifier.ready()
                log.info("rolling restart to generation %d complete", self.generation)

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
        """Which worker goes: an old one whose slot has its replacement READY, else an old
        one, else the highest index (TTOU)."""
        current = {w.index for w in serving if w.generation == self.generation}

        def order(w: WorkerHandle) -> tuple[bool, bool, int, int]:
            replaced = w.generation < self.generation and w.index in current
            return (not replaced, w.generation == self.generation, w.generation, -w.index)

        return min(serving, key=order)

    def _start(self, index: int) -> None:
        if self.stopping is not None or not self._listeners:
            return
        self._spawning += 1
        self._background(self._spawn(index, self.generation))

    async def _spawn(self, index: int, generation: int) -> None:
        try:
            handle = await spawn(index, generation, self._listeners, self.config_path)
        except OSError as exc:
            log.error("cannot start worker %d: %s", index, exc)
            self._not_before[index] = time.monotonic() + self._next_backoff(index)
            return
        finally:
            self._spawning -= 1
        self.workers.append(handle)
        asyncio.get_running_loop().add_reader(handle.pidfd, self._reap, handle)
        self._background(self._listen(handle))
        log.info("started worker %d (pid %d, generation %d)", index, handle.pid, generation)

    def _drain_one(self, worker: WorkerHandle) -> None:
        log.info("draining worker %d (pid %d)", worker.index, worker.pid)
        worker.state = WorkerState.DRAINING
        if worker.channel is not None:
            worker.channel.send(Message(Kind.DRAIN))

    # -- what workers say, and how they end --------------------------------------------------------

    async def _listen(self, worker: WorkerHandle) -> None:
        assert worker.channel is not None
        while (message := await worker.channel.receive()) is not None:
            worker.last_heartbeat = time.monotonic()
            if message.kind is Kind.READY:
                self._on_ready(worker)
            elif message.kind is Kind.HEARTBEAT:
                worker.stats = message.body.get("stats", {})
                worker.metrics = message.body.get("metrics", {})
                worker.pools = message.body.get("pools", {})
                self.table.update(worker.pid, worker.index, message.body.get("sessions", []))
            elif message.kind is Kind.REPLY:
                waiter = worker.pending.pop(int(message.body.get("id", -1)), None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(message.body)
            elif message.kind is Kind.DRAINING and worker.state is not WorkerState.EXITED:
                log.info("worker %d (pid %d) drains on its own", worker.index, worker.pid)
                worker.state = WorkerState.DRAINING  # its replacement starts at once
            elif message.kind is Kind.SESSION_CLOSE:
                self.table.remove(str(message.body.get("session")))

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

    def _reap(self, worker: WorkerHandle) -> None:
        status = worker.proc.poll()
        if status is None:
            return
        loop = asyncio.get_running_loop()
        loop.remove_reader(worker.pidfd)
        os.close(worker.pidfd)
        if worker.channel is not None:
            worker.channel.close()
        expected = worker.state is WorkerState.DRAINING
        was_ready = worker.ready_at is not None
        worker.state = WorkerState.EXITED
        self.workers.remove(worker)
        self.table.drop_worker(worker.pid)
        self.retired.add(worker.metrics)
        for waiter in worker.pending.values():
            if not waiter.done():
                waiter.set_result({"error": f"worker {worker.index} exited"})
        if expected:
            log.info(
                "worker %d (pid %d) exited %d after draining", worker.index, worker.pid, status
            )
            return
        log.warning("worker %d (pid %d) died with status %d", worker.index, worker.pid, status)
        self.restarts += 1
        if not was_ready:
            self._boot_failure(worker, status)
        elif worker.ready_at is not None and time.monotonic() - worker.ready_at >= BACKOFF_RESET:
            self._backoff.pop(worker.index, None)
        self._not_before[worker.index] = time.monotonic() + self._next_backoff(worker.index)

    def _boot_failure(self, worker: WorkerHandle, status: int) -> None:
        self._boot_failures += 1
        reason = "cannot boot" if status == WORKER_BOOT_ERROR else f"exited {status} while booting"
        log.error("worker %d %s (%d of %d tries)", worker.index, reason,
                  self._boot_failures, MAX_BOOT_FAILURES)  # fmt: skip
        if self._boot_failures >= MAX_BOOT_FAILURES and self.stopping is None:
            log.error("workers cannot boot; the master gives up")
            self.exit_status = 1
            self._begin_stop(Stopping.FAST)

    def _next_backoff(self, index: int) -> float:
        delay = min(BACKOFF_MAX, self._backoff.get(index, BACKOFF_FIRST / 2) * 2)
        self._backoff[index] = delay
        return delay

    def _check_heartbeats(self, now: float) -> None:
        for worker in self.workers:
            if worker.proc.poll() is not None:
                continue
            if worker.state is WorkerState.STARTING:
                if now - worker.started_at > BOOT_TIMEOUT and worker.aborted_at is None:
                    log.error("worker %d (pid %d) not ready after %.0fs: SIGKILL",
                              worker.index, worker.pid, BOOT_TIMEOUT)  # fmt: skip
                    worker.aborted_at = now + 3600
                    self._signal(worker, signal.SIGKILL)
                continue
            silent = now - worker.last_heartbeat
            if worker.aborted_at is None and silent > HEARTBEAT_TIMEOUT:
                log.error("worker %d (pid %d) silent for %.0fs: SIGABRT for its stacks",
                          worker.index, worker.pid, silent)  # fmt: skip
                worker.aborted_at = now
                self._signal(worker, signal.SIGABRT)
                self._signal(worker, signal.SIGCONT)  # a stopped worker must run to dump them
            elif worker.aborted_at is not None and now - worker.aborted_at > ABORT_GRACE:
                log.error("worker %d (pid %d) still there: SIGKILL", worker.index, worker.pid)
                self._signal(worker, signal.SIGKILL)
                worker.aborted_at = now + 3600  # once

    def _signal(self, worker: WorkerHandle, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            worker.proc.send_signal(signum)

    # -- reporting ---------------------------------------------------------------------------------

    def healthy(self) -> bool:
        now = time.monotonic()
        ready = [w for w in self.workers if w.state is WorkerState.READY]
        fresh = all(now - w.last_heartbeat < HEALTHY_HEARTBEAT for w in ready)
        return bool(ready) and fresh

    async def _report(self) -> None:
        """STATUS= every second; WATCHDOG=1 only while every worker is healthy."""
        interval = self.notifier.watchdog_interval
        last_ping = 0.0
        while True:
            sessions = sum(int(w.stats.get("sessions", 0)) for w in self.workers)
            serving = sum(1 for w in self.workers if w.serving)
            self.notifier.status(f"{serving} workers, {sessions} sessions")
            self.memory.sample([w for w in self.workers if w.serving])
            now = time.monotonic()
            if interval and now - last_ping >= interval and self.healthy() and not self.stopping:
                self.notifier.watchdog()
                last_ping = now
            await asyncio.sleep(min(1.0, interval or 1.0))

    async def handle_request(self, request: dict[str, Any]) -> dict[str, Any]:
        command = request.get("command")
        if command == "status":
            return {
                "version": build_info().version,
                "started_at": self.started_at,
                "uptime": format_uptime(time.time() - self.started_at),
                "master_pid": os.getpid(),
                "generation": self.generation,
                "workers": [w.statistics() for w in sorted(self.workers, key=lambda w: w.index)],
            }
        if command == "connections":
            return {"connections": self.table.rows()}
        if command == "kill":
            return self.kill(str(request.get("session", "")))
        return {"error": f"unknown command {command!r}"}

    async def ask(self, index: int, what: str, **args: Any) -> dict[str, Any]:
        """Ask serving worker `index` for a task dump or heap profile; wait a bounded time."""
        worker = next((w for w in self.workers if w.index == index and w.serving), None)
        if worker is None or worker.channel is None:
            return {"error": f"no worker {index}"}
        request_id = next(self._request_ids)
        waiter: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        worker.pending[request_id] = waiter
        worker.channel.send(Message(Kind.REQUEST, {"id": request_id, "what": what, **args}))
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                return await waiter
        except TimeoutError:
            return {"error": f"worker {index} did not answer in {REQUEST_TIMEOUT:.0f}s"}
        finally:
            worker.pending.pop(request_id, None)

    def kill(self, session: str) -> dict[str, Any]:
        pid = self.table.owner(session)
        worker = next((w for w in self.workers if w.pid == pid), None)
        if worker is None or worker.channel is None:
            return {"error": f"no session {session}"}
        worker.channel.send(Message(Kind.KILL_SESSION, {"session": session}))
        return {"killed": session}


def serve(config: Config, config_arg: str | None) -> int:
    return asyncio.run(Master(config, config_arg).run())
