"""The worker process: what the master fork+execs (SPEC 6).

A fresh interpreter that adopts the listening sockets and the control socketpair it inherited
(by fd number), serves with a `Worker`, and speaks the `control` protocol: `Ready` once serving,
a `Heartbeat` every second, `Draining` when a TERM reaches it directly, and admission's counts
and offences as they change (the master answers with the rest of the host's, and penalties).
Its signals and its master's messages become `Event`s that one loop acts on: it drains when
told to, or when its master is gone. A worker that cannot start exits with WORKER_BOOT_ERROR,
so the master stops instead of restarting it forever.

    python -m kilnproxy.worker.process --index N --listen-fds 3,4 --control-fd 5
        --startups-fd 6 --startups-slot K [--config P]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import enum
import faulthandler
import logging
import os
import signal
import socket
import sys
from typing import IO

import uvloop
from setproctitle import setproctitle

from kilnproxy import control
from kilnproxy.config import Config, format_duration, load
from kilnproxy.control import StartupTable
from kilnproxy.errors import CutReason, OperatorError
from kilnproxy.logs import configure, reopen
from kilnproxy.ssh import fast_path, kex_offer
from kilnproxy.worker.introspect import HeapBusy, HeapTracer, first_within, task_dump
from kilnproxy.worker.service import Worker

log = logging.getLogger("kilnproxy.worker")
HEARTBEAT = 1.0
LAST_BEAT_TIMEOUT = 0.3  # for a master that reads nothing: a fast stop is over in 2 s (SPEC 6)
BEAT_FAILURES_LOGGED = 60  # after the first failed heartbeat, one line per this many
# Unread bytes to the master past which what the worker tells it is held (see `_tell_master`).
MASTER_BACKLOG = 4 << 20
# Bytes of tasks, and of sessions, in a task dump: both well under the control line's limit.
DUMP_BUDGET = control.MAX_LINE // 4


def title(index: int, sessions: int) -> str:
    return f"kilnproxy: worker {index} ({sessions} sessions)"


class Event(enum.Enum):
    """What the worker's loop acts on: its own signals, and what its master says."""

    DRAIN = "drain"  # TERM or QUIT reached this worker: drain, and tell the master so
    REPLACED = "replaced"  # the master said control.Drain(stopping=False): drain, cutting none
    SERVER_STOPPING = "server stopping"  # control.Drain(stopping=True): the server's drain
    ORPHANED = "orphaned"  # the master is gone: drain
    STOP = "stop"  # INT, or the master said control.Stop: cut every session now
    REOPEN = "reopen"  # USR1: reopen the log file


SIGNALS = {
    signal.SIGTERM: Event.DRAIN,
    signal.SIGQUIT: Event.DRAIN,
    signal.SIGINT: Event.STOP,
    signal.SIGUSR1: Event.REOPEN,
}


class WorkerProcess:
    def __init__(
        self,
        config: Config,
        worker: Worker,
        control_sock: socket.socket,
        stacks: IO[str] | None = None,
    ) -> None:
        self.config = config
        self._stacks = stacks  # where faulthandler writes: reopened with the log
        self.worker = worker
        self._control_sock = control_sock
        self._channel: control.ToMaster | None = None
        # The rows the master has, as it has them: a session not in it is not in its table.
        self._sent: dict[str, tuple[object, ...]] = {}
        self._held_beats = 0  # heartbeats not sent while the master read nothing
        self._closed: list[str] = []  # told the master at the end of this pass, or once it reads
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self._heap = HeapTracer()
        self._answering: set[asyncio.Task[None]] = set()  # heap profiles being taken

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for signum, event in SIGNALS.items():
            loop.add_signal_handler(signum, self._events.put_nowait, event)
        loop.add_signal_handler(signal.SIGHUP, lambda: None)  # the master's signal, not ours
        signal.pthread_sigmask(signal.SIG_UNBLOCK, control.BOOT_HELD_SIGNALS)  # acted on now
        self._channel = channel = await control.ToMaster.open(self._control_sock)
        self.worker.host.on_close = self._session_closed
        self.worker.admission.report_to(self._tell_master)
        await self.worker.start()
        channel.send(control.Ready(pid=self.worker.statistics().pid))
        tasks = [
            asyncio.create_task(self._heartbeat(channel)),
            asyncio.create_task(self._listen(channel)),
        ]
        try:
            await self._serve_until_told()
        finally:
            tasks += self._answering
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.worker.close()
            self._last_beat(channel)
            await channel.close_sent(LAST_BEAT_TIMEOUT)

    def _last_beat(self, channel: control.ToMaster) -> None:
        """One more heartbeat as the worker goes: what it counted since the last one (the
        sessions that ended its drain, or were cut at its end, and their bytes) reaches the
        master's totals, which keep a gone worker's last figures."""
        try:
            self._beat(channel, last=True)
        except Exception:
            log.exception("worker %d: the last heartbeat failed", self.worker.index)

    async def _serve_until_told(self) -> None:
        while True:
            event = await self._events.get()
            if event is Event.REOPEN:
                self._reopen_log()
                continue
            if event is Event.STOP:
                await self.worker.shutdown()
                return
            if event is Event.DRAIN and self._channel is not None:
                self._channel.send(control.Draining())
            await self._drain_unless_hurried(event)
            return

    def _drain_terms(self, event: Event) -> tuple[float, CutReason]:
        """How long a drain for `event` waits before it cuts, and what the cut tells clients.
        A worker replaced (HUP, TTOU, its memory) cuts nothing (SPEC 6): every session ends by
        itself, by `max_session` at the latest. A TERM to this worker alone is a restart; a
        stop of the server, or a master gone, is the server's end."""
        timeouts = self.config.timeouts
        if event is Event.REPLACED:
            return max(timeouts.max_session, timeouts.drain), CutReason.DRAIN
        if event is Event.DRAIN:
            return timeouts.drain, CutReason.DRAIN
        return timeouts.drain, CutReason.DRAIN_STOP

    async def _drain_unless_hurried(self, event: Event) -> None:
        """Drain; INT or the master's Stop cuts every session now. What comes meanwhile may
        bring the cut closer, never put it off: a replaced worker's wait for its sessions is
        shortened to the drain timeout when the server stops, the master goes or a TERM comes
        (the master kills what is left after it), and a drain the server's end overtakes tells
        its clients so."""
        loop = asyncio.get_running_loop()
        within, reason = self._drain_terms(event)
        deadline = loop.time() + within
        drain = asyncio.create_task(self.worker.drain(within, reason))
        while not drain.done():
            hurry = asyncio.create_task(self._events.get())
            await asyncio.wait({drain, hurry}, return_when=asyncio.FIRST_COMPLETED)
            if not hurry.done():
                hurry.cancel()
            elif hurry.result() is Event.REOPEN:  # a drain takes minutes: logs rotate meanwhile
                self._reopen_log()
            elif hurry.result() is Event.STOP:
                drain.cancel()
                await self.worker.shutdown()
                return
            else:
                later, later_reason = self._drain_terms(hurry.result())
                now = loop.time()
                closer = min(deadline, now + later)
                stop = CutReason.DRAIN_STOP in (reason, later_reason)
                if (closer, stop) == (deadline, reason is CutReason.DRAIN_STOP):
                    continue
                deadline, reason = closer, CutReason.DRAIN_STOP if stop else reason
                left = deadline - now
                log.info("worker %d: %s: cutting what is left in %s", self.worker.index,
                         hurry.result().value,
                         format_duration(round(left) if left >= 1 else round(left, 3)))  # fmt: skip
                drain.cancel()
                await asyncio.gather(drain, return_exceptions=True)
                drain = asyncio.create_task(self.worker.drain(left, reason))

    def _reopen_log(self) -> None:
        settings = self.config.log
        if not reopen(settings.format, settings.level, settings.file):
            return
        log.info("worker %d reopened its log", self.worker.index)
        if settings.file is not None and self._stacks is not None:
            try:
                self._stacks = stacks_to(self.config, self._stacks)
            except OSError as exc:  # just opened by the log: a race with the rotation
                log.error("worker %d: stacks still go to the rotated log: %s", self.worker.index,
                          exc)  # fmt: skip

    async def _listen(self, channel: control.ToMaster) -> None:
        """Messages from the master; its end closing means the master is gone."""
        while True:
            message = await channel.receive()
            if message is None:
                log.warning("worker %d: master gone, draining", self.worker.index)
                self._events.put_nowait(Event.ORPHANED)
                return
            try:  # one message's failure (a bug) must not leave the worker deaf to the next
                self._heard(channel, message)
            except Exception:
                log.exception("worker %d: failed on the master's %s", self.worker.index,
                              type(message).__name__)  # fmt: skip
            await asyncio.sleep(0)  # lines already read come at once: let the loop run between

    def _heard(self, channel: control.ToMaster, message: control.MasterMessage) -> None:
        match message:
            case control.Drain(stopping=stopping):
                self._events.put_nowait(Event.SERVER_STOPPING if stopping else Event.REPLACED)
            case control.DrainNotice():
                self.worker.drain_notice()
            case control.Stop():
                self._events.put_nowait(Event.STOP)
            case control.KillSession(session=session):
                self.worker.kill_session(session)
            case control.TaskDumpRequest():
                channel.send(self._answer_tasks(message))
            case control.HeapProfileRequest():
                task = asyncio.create_task(self._answer_heap(channel, message))
                self._answering.add(task)
                task.add_done_callback(self._answering.discard)
            case control.OthersChanged():
                self.worker.admission.others_changed(message)
            case control.Penalties():
                self.worker.admission.penalties(message)

    def _answer_tasks(self, request: control.TaskDumpRequest) -> control.Reply:
        """A task dump, for the status page (SPEC 7)."""
        try:  # the isolation boundary of one request: a failure is its reply, not the worker's
            # Relays run on callbacks, not tasks, while bytes flow: list sessions as well.
            sessions = [dataclasses.asdict(row) for row in self.worker.connections()]
            tasks = task_dump()
            data = {
                "tasks": first_within(tasks, DUMP_BUDGET),
                "tasks_total": len(tasks),
                "sessions": first_within(sessions, DUMP_BUDGET),
                "sessions_total": len(sessions),
            }
        except Exception as exc:
            return self._failed(request, exc)
        return control.Reply(request.id, data=data)

    async def _answer_heap(
        self, channel: control.ToMaster, request: control.HeapProfileRequest
    ) -> None:
        """A heap profile, for the status page, in a task: its snapshot is taken off the loop
        (`HeapTracer`)."""
        try:  # the isolation boundary of one request, as in `_answer_tasks`
            report = await self._heap.report(
                request.top, request.seconds, request.stop, request.peek
            )
        except HeapBusy as exc:
            reply = control.Reply(request.id, error=f"worker {self.worker.index}: {exc}")
        except Exception as exc:
            reply = self._failed(request, exc)
        else:
            reply = control.Reply(request.id, data=report)
        try:  # in a task nobody awaits: a failure is logged here or nowhere
            channel.send(reply)
        except Exception:
            log.exception("worker %d cannot send its heap profile", self.worker.index)

    def _failed(
        self, request: control.TaskDumpRequest | control.HeapProfileRequest, exc: Exception
    ) -> control.Reply:
        log.exception("worker %d cannot answer %s", self.worker.index, request.kind.value)
        return control.Reply(request.id, error=f"worker {self.worker.index} failed: {exc}")

    async def _heartbeat(self, channel: control.ToMaster) -> None:
        failures = 0
        while True:
            try:  # a beat that fails (a bug) is logged, and the next one comes all the same
                self._beat(channel)
            except Exception:
                failures += 1
                self._sent = dict.fromkeys(self._sent, ())  # rows may be lost: send them all
                if failures == 1 or failures % BEAT_FAILURES_LOGGED == 0:
                    log.exception("worker %d: heartbeat failed (%d so far)", self.worker.index,
                                  failures)  # fmt: skip
            await asyncio.sleep(HEARTBEAT)

    def _beat(self, channel: control.ToMaster, last: bool = False) -> None:
        stats = self.worker.statistics()
        setproctitle(title(self.worker.index, stats.sessions))
        if channel.backlog() > MASTER_BACKLOG:
            # The master reads nothing (stopped, or its loop stuck): a beat a second, with the
            # rows of every active session, would pile up here. Beats wait; the first one the
            # master can take again carries every row that changed meanwhile.
            if not self._held_beats:
                log.warning("worker %d: the master has not read %d bytes; holding what it is "
                            "told", self.worker.index, channel.backlog())  # fmt: skip
            self._held_beats += 1
            return
        if self._held_beats:
            log.info("worker %d: the master reads again; %d heartbeat(s) were held",
                     self.worker.index, self._held_beats)  # fmt: skip
            self._held_beats = 0
        # Whatever was held since the last beat (the master may have read nothing only between
        # two beats), before the rows: in the order it happened.
        self._report_closed()
        self.worker.admission.resume()
        beat = control.Heartbeat(
            stats=stats,
            metrics=self.worker.metrics.snapshot(),
            pools=self.worker.pool_statistics(),
            sessions=self._changed_sessions(),
        )
        channel.send(beat)
        # After the beat: a release blocks the loop a while, and the master's watchdog counts
        # from the last beat it had. Not as the worker exits: nothing is left to give back.
        if not last and self.worker.settle_memory():
            self._sent = dict(self._sent)  # a dict never shrinks its table: a flood's

    def _changed_sessions(self) -> tuple[control.SessionStats, ...]:
        """The rows the master has not seen as they are now."""
        return tuple(self.worker.changed_connections(self._sent))

    def _session_closed(self, session_id: str) -> None:
        """One message for all that close in one pass: sent one by one, 10,000 connections
        dropped at once were 10,000 writes to the socketpair in one pass of the loop. A session
        that no heartbeat carried (it lasted under a second, or the master read nothing) is
        not in the master's table: nothing to tell."""
        if self._sent.pop(session_id, None) is None or self._channel is None:
            return
        if not self._closed:
            asyncio.get_running_loop().call_soon(self._report_closed)
        self._closed.append(session_id)

    def _report_closed(self) -> None:
        if self._closed and self._tell_master(control.SessionClosed(tuple(self._closed))):
            self._closed = []

    def _tell_master(self, message: control.WorkerMessage) -> bool:
        """Send `message`, unless the master has left MASTER_BACKLOG bytes unread: then say so
        (False), and the caller holds it, merged with what comes next, until the master reads
        again (the next heartbeat that goes). Held, the closed sessions are at most those of
        its table, the admission counts one per account."""
        if self._channel is None or self._channel.backlog() > MASTER_BACKLOG:
            return False
        self._channel.send(message)
        return True


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="kilnproxy-worker")
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--listen-fds", required=True)
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--startups-fd", type=int, required=True)
    parser.add_argument("--startups-slot", type=int, required=True)
    parser.add_argument("--config")
    parser.add_argument("--config-fd", type=int)  # the file's text, as the master read it
    return parser.parse_args(argv)


def stacks_to(config: Config, before: IO[str] | None = None) -> IO[str]:
    """Point faulthandler's stacks (on SIGABRT) at the log: the log file, opened anew (after a
    rotation, the new one; `before`, where they went until now, is closed), or standard
    error. OSError if the file cannot be opened: they go on where they went."""
    target = sys.stderr if config.log.file is None else config.log.file.open("a")
    faulthandler.enable(file=target, all_threads=True)
    if before is not None and before is not sys.stderr:
        before.close()
    return target


def given_config(fd: int | None) -> str | None:
    """The configuration's text the master handed over (in a memory file), if it did."""
    if fd is None:
        return None
    with open(fd, encoding="utf-8") as given:
        return given.read()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    setproctitle(title(args.index, 0))
    try:
        config = load(args.config, text=given_config(args.config_fd))
        configure(config.log.format, config.log.level, config.log.file)
        stacks = stacks_to(config)
        # Process-wide, before any connection exists.
        fast_path.apply(config.ssh.fast_path)
        kex_offer.apply(config.ssh.fallback_encryption_algs)
        sockets = [socket.socket(fileno=int(fd)) for fd in args.listen_fds.split(",")]
        control_sock = socket.socket(fileno=args.control_fd)
        for sock in (*sockets, control_sock):
            sock.set_inheritable(False)  # never into git, hg or ssh children
        os.set_inheritable(args.startups_fd, False)
        startups = StartupTable.attach(args.startups_fd)
        worker = Worker(config, sockets, args.index, (startups, args.startups_slot))
    except (OperatorError, OSError, ValueError) as exc:
        print(f"kilnproxy: worker {args.index} cannot start: {exc}", file=sys.stderr)
        return control.WORKER_BOOT_ERROR
    try:
        uvloop.run(WorkerProcess(config, worker, control_sock, stacks).run())
    except OperatorError as exc:  # raised by Worker.start: host keys, algorithms
        log.error("worker %d cannot start: %s", args.index, exc)
        return control.WORKER_BOOT_ERROR
    finally:
        with contextlib.suppress(OSError):
            control_sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
