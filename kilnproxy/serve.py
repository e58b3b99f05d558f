"""`kilnproxy serve`, single-process form: bind, run one worker in this process, answer status.

This is the stand-in for the pre-fork master (SPEC 6) until it exists: it does the master's
socket binding and status socket, and runs exactly the `Worker` a master would start. Signals
follow SPEC 6: TERM or QUIT drains, INT or a second TERM shuts down fast.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
import socket
import time
from typing import Any

import uvloop

from kilnproxy.config import Address, Config
from kilnproxy.errors import OperatorError
from kilnproxy.status_socket import serve as serve_status
from kilnproxy.version import build_info
from kilnproxy.worker import Worker

log = logging.getLogger("kilnproxy.serve")


def bind(address: Address, backlog: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    try:
        return socket.create_server(
            (address.host, address.port), family=family, backlog=backlog, reuse_port=False
        )
    except OSError as exc:
        raise OperatorError(f"cannot listen on {address}: {exc.strerror}") from None


def format_uptime(seconds: float) -> str:
    """`167h10m2s`, as /info and `kilnproxy status` show it."""
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


class SingleProcess:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.started_at = time.time()
        self.sockets = [bind(a, config.ssh.backlog) for a in config.ssh.listen]
        self.worker = Worker(config, self.sockets)
        self._signals: asyncio.Queue[int] = asyncio.Queue()

    async def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        command = request.get("command")
        if command == "status":
            info = build_info()
            return {
                "version": info.version,
                "started_at": self.started_at,
                "uptime": format_uptime(time.time() - self.started_at),
                "workers": [dataclasses.asdict(self.worker.statistics())],
            }
        if command == "connections":
            rows = [dataclasses.asdict(s) | {"worker": 0} for s in self.worker.connections()]
            return {"connections": rows}
        if command == "kill":
            session = str(request.get("session", ""))
            if not self.worker.kill_session(session):
                return {"error": f"no session {session}"}
            return {"killed": session}
        return {"error": f"unknown command {command!r}"}

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGQUIT, signal.SIGINT):
            loop.add_signal_handler(signum, self._signals.put_nowait, signum)
        await self.worker.start()
        status = await serve_status(self.config.status.socket, self.handle)
        addresses = ", ".join(str(a) for a in self.config.ssh.listen)
        log.info("kilnproxy %s listening on %s", build_info().version, addresses)
        try:
            first = await self._signals.get()
            log.info("received %s", signal.Signals(first).name)
            if first == signal.SIGINT:
                await self.worker.shutdown()
            else:
                await self._drain_unless_hurried()
        finally:
            status.close()
            await self.worker.close()
            for sock in self.sockets:
                sock.close()
            with contextlib.suppress(FileNotFoundError):
                self.config.status.socket.unlink()
        log.info("stopped")

    async def _drain_unless_hurried(self) -> None:
        """Drain; a second TERM, or an INT, while draining turns it into a fast shutdown."""
        drain = asyncio.create_task(self.worker.drain(self.config.timeouts.drain))
        hurry = asyncio.create_task(self._signals.get())
        await asyncio.wait({drain, hurry}, return_when=asyncio.FIRST_COMPLETED)
        if drain.done():
            hurry.cancel()
            return
        log.info("received %s while draining", signal.Signals(hurry.result()).name)
        drain.cancel()
        await self.worker.shutdown()


def serve(config: Config) -> None:
    runner = SingleProcess(config)
    uvloop.run(runner.run())
