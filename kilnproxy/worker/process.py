"""The worker process: what the master fork+execs (SPEC 6).

A fresh interpreter that adopts the listening sockets and the control socketpair it inherited
(by fd number), serves with a `Worker`, and speaks the `control` protocol: READY once serving,
a HEARTBEAT every second, DRAINING when a TERM reaches it directly. It drains when told to, or
when its master is gone. A worker that cannot start exits with WORKER_BOOT_ERROR, so the master
stops instead of restarting it forever.

    python -m kilnproxy.worker.process --index N --listen-fds 3,4 --control-fd 5 [--config P]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import faulthandler
import logging
import signal
import socket
import sys
from typing import IO, Any

import uvloop
from setproctitle import setproctitle

from kilnproxy.config import Config, load
from kilnproxy.control import WORKER_BOOT_ERROR, Channel, Kind, Message
from kilnproxy.errors import OperatorError
from kilnproxy.logs import configure
from kilnproxy.ssh import fast_path
from kilnproxy.worker.introspect import HeapTracer, task_dump
from kilnproxy.worker.service import Worker

log = logging.getLogger("kilnproxy.worker")
HEARTBEAT = 1.0


def title(index: int, sessions: int) -> str:
    return f"kilnproxy: worker {index} ({sessions} sessions)"


class WorkerProcess:
    def __init__(self, config: Config, worker: Worker, control: socket.socket) -> None:
        self.config = config
        self.worker = worker
        self._control_sock = control
        self._channel: Channel | None = None
        self._sent: dict[str, tuple[object, ...]] = {}
        self._events: asyncio.Queue[str] = asyncio.Queue()
        self._heap = HeapTracer()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for signum, event in ((signal.SIGTERM, "drain"), (signal.SIGQUIT, "drain"),
                              (signal.SIGINT, "stop"), (signal.SIGUSR1, "reopen")):  # fmt: skip
            loop.add_signal_handler(signum, self._events.put_nowait, event)
        loop.add_signal_handler(signal.SIGHUP, lambda: None)  # the master's signal, not ours
        self._channel = channel = await Channel.open(self._control_sock)
        self.worker.host.on_close = self._session_closed
        await self.worker.start()
        channel.send(Message(Kind.READY, {"pid": self.worker.statistics().pid}))
        tasks = [
            asyncio.create_task(self._heartbeat()),
            asyncio.create_task(self._listen(channel)),
        ]
        try:
            await self._serve_until_told()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.worker.close()
            channel.close()

    async def _serve_until_told(self) -> None:
        while True:
            event = await self._events.get()
            if event == "reopen":
                configure(self.config.log.format, self.config.log.level, self.config.log.file)
                log.info("worker %d reopened its log", self.worker.index)
                continue
            if event == "stop":
                await self.worker.shutdown()
                return
            if event == "drain" and self._channel is not None:
                self._channel.send(Message(Kind.DRAINING))
            await self._drain_unless_hurried()
            return

    async def _drain_unless_hurried(self) -> None:
        drain = asyncio.create_task(self.worker.drain(self.config.timeouts.drain))
        while not drain.done():
            hurry = asyncio.create_task(self._events.get())
            await asyncio.wait({drain, hurry}, return_when=asyncio.FIRST_COMPLETED)
            if not hurry.done():
                hurry.cancel()
            elif hurry.result() == "stop":
                drain.cancel()
                await self.worker.shutdown()
                return

    async def _listen(self, channel: Channel) -> None:
        """Messages from the master; its end closing means the master is gone."""
        while True:
            message = await channel.receive()
            if message is None:
                log.warning("worker %d: master gone, draining", self.worker.index)
                self._events.put_nowait("orphaned")
                return
            if message.kind is Kind.DRAIN:
                self._events.put_nowait("drained")
            elif message.kind is Kind.STOP:
                self._events.put_nowait("stop")
            elif message.kind is Kind.KILL_SESSION:
                self.worker.kill_session(str(message.body.get("session")))
            elif message.kind is Kind.REQUEST:
                channel.send(self._answer(message.body))

    def _answer(self, request: dict[str, Any]) -> Message:
        """A task dump or a heap profile, for the status page (SPEC 7)."""
        reply: dict[str, Any] = {"id": request.get("id")}
        what = request.get("what")
        try:
            if what == "tasks":
                # Relays run on callbacks, not tasks, while bytes flow: list sessions as well.
                sessions = [dataclasses.asdict(row) for row in self.worker.connections()]
                reply["data"] = {"tasks": task_dump(), "sessions": sessions}
            elif what == "heap":
                top, limit = int(request.get("top", 25)), float(request.get("seconds", 60))
                stop, peek = bool(request.get("stop")), bool(request.get("peek"))
                reply["data"] = self._heap.report(top, limit, stop, peek)
            else:
                reply["error"] = f"unknown request {what!r}"
        except (TypeError, ValueError) as exc:
            reply["error"] = f"bad request: {exc}"
        return Message(Kind.REPLY, reply)

    async def _heartbeat(self) -> None:
        while True:
            stats = self.worker.statistics()
            setproctitle(title(self.worker.index, stats.sessions))
            changed = []
            for row in self.worker.connections():
                key = (row.bytes_in, row.bytes_out, row.account, row.repo, row.state)
                if self._sent.get(row.session) != key:
                    self._sent[row.session] = key
                    changed.append(dataclasses.asdict(row))
            if self._channel is not None:
                body = {
                    "stats": dataclasses.asdict(stats),
                    "metrics": self.worker.host.metrics.snapshot(),
                    "pools": self.worker.host.backends.statistics(),
                    "sessions": changed,
                }
                self._channel.send(Message(Kind.HEARTBEAT, body))
            await asyncio.sleep(HEARTBEAT)

    def _session_closed(self, session_id: str) -> None:
        self._sent.pop(session_id, None)
        if self._channel is not None:
            self._channel.send(Message(Kind.SESSION_CLOSE, {"session": session_id}))


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="kilnproxy-worker")
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--listen-fds", required=True)
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--config")
    return parser.parse_args(argv)


def fault_log(config: Config) -> IO[str]:
    """Where faulthandler writes stacks on SIGABRT: the log file, or standard error."""
    if config.log.file is None:
        return sys.stderr
    return config.log.file.open("a")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    setproctitle(title(args.index, 0))
    try:
        config = load(args.config)
        configure(config.log.format, config.log.level, config.log.file)
        faulthandler.enable(file=fault_log(config), all_threads=True)
        fast_path.apply(config.ssh.fast_path)  # process-wide, before any connection exists
        sockets = [socket.socket(fileno=int(fd)) for fd in args.listen_fds.split(",")]
        control = socket.socket(fileno=args.control_fd)
        for sock in (*sockets, control):
            sock.set_inheritable(False)  # never into git, hg or ssh children
        worker = Worker(config, sockets, args.index)
    except (OperatorError, OSError, ValueError) as exc:
        print(f"kilnproxy: worker {args.index} cannot start: {exc}", file=sys.stderr)
        return WORKER_BOOT_ERROR
    try:
        uvloop.run(WorkerProcess(config, worker, control).run())
    except OperatorError as exc:  # raised by Worker.start: host keys, algorithms
        log.error("worker %d cannot start: %s", args.index, exc)
        return WORKER_BOOT_ERROR
    finally:
        with contextlib.suppress(OSError):
            control.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
