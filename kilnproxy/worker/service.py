"""A worker: serves SSH on the sockets it is handed, until it is told to drain or stop.

The worker is the unit the master starts (SPEC 6). It owns its sessions, its directory handle,
its backend connections and its side of admission (`WorkerAdmission`), and reports
`statistics()` (the `control.WorkerStats` of its heartbeat). It knows nothing of supervision: it
serves on whatever sockets it is given and drains when asked.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from typing import Any

import asyncssh
import psutil

from kilnproxy.backends import Backends
from kilnproxy.config import Config
from kilnproxy.control import PoolStats, SessionStats, StartupTable, WorkerStats
from kilnproxy.directory import directory_for
from kilnproxy.errors import CutReason
from kilnproxy.ssh.fast_path import fast_path_state
from kilnproxy.ssh.server import listen, serving_options
from kilnproxy.ssh.services import Services
from kilnproxy.ssh.session import CUT_GRACE, SessionHost
from kilnproxy.worker.admission import WorkerAdmission
from kilnproxy.worker.introspect import HeapFigure, ProcessFigures, release_memory
from kilnproxy.worker.metrics import WorkerMetrics

log = logging.getLogger("kilnproxy.worker")
SHUTDOWN_GRACE = 1.5  # SPEC 6: a fast shutdown is over within 2 s
HANG_UP_GRACE = 0.3  # for the connections aborted then to end (their callbacks, a pass or two)
RELEASE_AFTER = 1000  # closed connections between two releases of memory, at least
# Session rows per heartbeat: a row is at most about 1 KiB, so a beat stays well under the
# control channel's line limit (control.MAX_LINE) however many sessions changed.
ROWS_PER_BEAT = 2000


def _log_loop_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """Errors no task awaited (a callback of a transport or protocol): logged, never fatal."""
    exc = context.get("exception")
    owner = context.get("protocol") or context.get("transport") or context.get("task")
    log.error("unhandled error in %r: %s", owner, context.get("message"),
              exc_info=(type(exc), exc, exc.__traceback__) if exc else None)  # fmt: skip


class Worker:
    def __init__(
        self,
        config: Config,
        sockets: list[socket.socket],
        index: int = 0,
        startups: tuple[StartupTable, int] | None = None,
    ) -> None:
        """`startups`: the host's startup table and this worker's slot (else one of its own)."""
        self.config = config
        self.index = index
        self.started_at = time.time()
        self._sockets = sockets
        self._acceptors: list[asyncssh.SSHAcceptor] = []
        self._closing: list[asyncssh.SSHAcceptor] = []  # closed, maybe still handing over
        self._process = ProcessFigures(psutil.Process())
        self._heap = HeapFigure()
        # The worker's own: its sessions see them only through the Protocols of `Services`.
        self.metrics = WorkerMetrics()
        self.directory = directory_for(config)
        self.backends = Backends(
            config.home / "state",
            config.backend_ssh,
            config.backend_agent,
            config.timeouts.dial,
            self.metrics.backend_dial.observe,
        )
        table, slot = startups or (None, 0)
        self.admission = WorkerAdmission(
            config.limits, self.metrics.refused, table=table, slot=slot
        )
        services = Services(self.directory, self.backends, self.metrics, self.admission)
        self.host = SessionHost(config, services)
        self._closed_at_release = 0
        self._rows_from = 0  # where the next `changed_connections` starts
        self._closed_seen = 0  # closed since the last release, as of the last settle_memory
        self._flood_tail = False  # released for a flood: once more when its closes stop

    async def start(self) -> None:
        asyncio.get_running_loop().set_exception_handler(_log_loop_error)
        options = serving_options(self.config)
        for sock in self._sockets:
            self._acceptors.append(await listen(sock, self.host, options))
        log.info("worker %d serving (pid %d)", self.index, os.getpid())

    def drain_notice(self) -> None:
        """A drain is coming: serve on, but fail the load balancer's health checks now."""
        self.host.failing_health_checks = True
        log.info("worker %d fails health checks: a drain is coming", self.index)

    def stop_accepting(self) -> None:
        """Stop accepting, and let go of the listening sockets: uvloop serves on duplicates of
        them, and while any process holds one the kernel keeps queueing connections nobody
        will accept (a drain must refuse them)."""
        self.host.accepting = False
        for acceptor in self._acceptors:
            acceptor.close()
        self._closing, self._acceptors = self._acceptors, []
        for sock in self._sockets:
            sock.close()

    async def drain(self, within: float, reason: CutReason = CutReason.DRAIN) -> None:
        """Let every session finish; after `within` seconds cut the rest, telling them `reason`
        (SPEC 6)."""
        self.stop_accepting()
        await self._handed_over()
        log.info("worker %d draining %d sessions", self.index, len(self.host.sessions))
        for session in list(self.host.sessions.values()):
            session.drain()
        if not await self._sessions_ended(within):
            self.cut_all(reason)
            if not await self._sessions_ended(CUT_GRACE + 1):
                await self._hang_up_on_the_rest()

    async def shutdown(self) -> None:
        """Cut every session now (SPEC 6: INT, or a second TERM)."""
        self.stop_accepting()
        self.cut_all(CutReason.SHUTDOWN)
        if not await self._sessions_ended(SHUTDOWN_GRACE):
            await self._hang_up_on_the_rest()

    async def _hang_up_on_the_rest(self) -> None:
        """Sessions that a cut did not end (a client that reads nothing has not taken its
        message) are aborted before the worker exits: each still ends, and logs its line."""
        left = list(self.host.sessions.values())
        log.warning("worker %d hangs up on %d session(s) that a cut did not end", self.index,
                    len(left))  # fmt: skip
        for session in left:
            session.abort()
        await self._sessions_ended(HANG_UP_GRACE)

    def cut_all(self, reason: CutReason) -> None:
        for session in list(self.host.sessions.values()):
            session.cut(reason)

    def kill_session(self, session_id: str) -> bool:
        session = self.host.sessions.get(session_id)
        if session is None:
            return False
        session.cut(CutReason.ADMIN)
        return True

    async def _handed_over(self) -> None:
        """Wait until connections accepted before the listeners closed have become sessions
        (a PROXY header still being read; bounded by `proxy_timeout`)."""
        if not self._closing:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.config.ssh.proxy_timeout + 1):
                await asyncio.gather(*(acceptor.wait_closed() for acceptor in self._closing))
        self._closing = []

    async def _sessions_ended(self, within: float) -> bool:
        """Wait up to `within` seconds for the last session to end; say whether it did."""
        if not self.host.sessions:
            return True
        try:
            async with asyncio.timeout(within):
                await self.host.no_sessions.wait()
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        self.stop_accepting()
        self.host.close_logs.run_all()  # the last sessions' lines, before the loop ends
        await self.backends.close()
        self.directory.close()

    def settle_memory(self) -> bool:
        """After many connections have closed, free what they held (`release_memory`);
        whether it did. Called once a second: only once more connections have closed since
        the last release than are open now, so that its cost (a full collection, in
        proportion to what is alive) is spread over the connections that made it needed;
        and once more when a flood's closes have stopped, for the last of them (short of
        `RELEASE_AFTER`, their cycles would wait for a collection a quiet worker never
        makes, each pinning an arena of the flood's memory)."""
        live = len(self.host.sessions)
        closed = self.host.total - live - self._closed_at_release
        closing, self._closed_seen = closed != self._closed_seen, closed
        if closed >= RELEASE_AFTER and closed > live:
            self._flood_tail = True
        elif self._flood_tail and not closing:
            self._flood_tail = False
            if not closed:
                return False
        else:
            return False
        started = time.monotonic()
        # A dict never shrinks its table: the flood's would stay, in the heap just trimmed.
        self.host.sessions = dict(self.host.sessions)
        release_memory()
        self._closed_at_release += closed
        self._closed_seen = 0
        log.info("worker %d released the memory of %d closed connections in %.2fs",
                 self.index, closed, time.monotonic() - started)  # fmt: skip
        return True

    def connections(self) -> list[SessionStats]:
        return [session.statistics() for session in self.host.sessions.values()]

    def changed_connections(
        self, seen: dict[str, tuple[object, ...]], limit: int = ROWS_PER_BEAT
    ) -> list[SessionStats]:
        """The rows whose `row_key` differs from `seen` (which is updated), at most `limit`:
        the rest are still changed next time, and the next call starts where this one
        stopped, so that with more than `limit` sessions changing every second each row still
        goes in turn. A session that has not changed costs a tuple, not a row: 10,000 idle
        connections made every heartbeat build 10,000 rows (0.1-0.3 s of the loop each second)
        to send none."""
        sessions = list(self.host.sessions.values())
        start = self._rows_from % len(sessions) if sessions else 0
        self._rows_from = 0
        changed: list[SessionStats] = []
        for offset, session in enumerate(sessions[start:] + sessions[:start]):
            key = session.row_key()
            if seen.get(session.id) != key:
                if len(changed) == limit:
                    self._rows_from = start + offset
                    break
                seen[session.id] = key
                changed.append(session.statistics())
        return changed

    def statistics(self) -> WorkerStats:
        fds, rss = self._process.read()
        return WorkerStats(
            index=self.index,
            pid=os.getpid(),
            started_at=self.started_at,
            sessions=len(self.host.sessions),
            sessions_total=self.host.total,
            tasks=len(asyncio.all_tasks()),
            fds=fds,
            rss=rss,
            heap=self._heap.read(time.monotonic()),
            accepting=self.host.accepting,
            backend_connections=sum(p.connections for p in self.pool_statistics().values()),
            fast_path=fast_path_state(),
        )

    def pool_statistics(self) -> dict[str, PoolStats]:
        """Each backend's pool of SSH connections, by backend name."""
        return {
            name: PoolStats(pool["connections"], pool["channels"], pool["dials"])
            for name, pool in self.backends.statistics().items()
        }
