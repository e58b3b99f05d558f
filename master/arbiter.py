"""The master process (SPEC 6): wires supervision to what reports on it, and runs them.

`serve` binds the listening sockets (or adopts systemd's), makes the `StatusBoard`, the
`Supervisor` that feeds it, and its readers: the status socket (`status`), the HTTP server
(`http`, with the Prometheus collector) and the sd_notify reports below. It runs the supervisor
until it is done, then closes every reader. The readers reach the supervisor only through
`actions.WorkerActions`; nothing imports this module but the CLI, so no import cycle can pass
through it. It must never import asyncssh.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from pathlib import Path

from setproctitle import setproctitle

from kilnproxy.config import Address, Config
from kilnproxy.status_socket import serve as serve_status
from kilnproxy.version import build_info
from master.admission import MIN_SLOTS
from master.board import StatusBoard
from master.http import start as start_http
from master.notify import Notifier
from master.sockets import listeners
from master.status import StatusAnswers
from master.supervisor import Supervisor, Vet

log = logging.getLogger("kilnproxy.master")
# Blocked from the start of `kilnproxy serve` until the supervisor's handlers take them.
HELD_SIGNALS = {signal.SIGHUP, signal.SIGUSR1, signal.SIGTTIN, signal.SIGTTOU}


def serve(config: Config, vet: Vet | None = None) -> int:
    """`vet`: what a HUP's configuration must pass besides loading (Supervisor.vet). A HUP
    reads the file `config` was read from, the default one included: were it gone by then,
    the reload is refused, rather than made with the defaults (an empty directory, say)."""
    notifier = Notifier()  # takes NOTIFY_SOCKET out of the environment before any worker starts
    return asyncio.run(_run(config, config.source, notifier, vet))


async def _run(
    config: Config, config_path: Path | None, notifier: Notifier, vet: Vet | None
) -> int:
    setproctitle("kilnproxy: master")
    # Slots of the startup table: a rolling restart runs each old worker beside its new one.
    board = StatusBoard(config.limits.penalty_settings(), max(MIN_SLOTS, 4 * config.workers.count))
    supervisor = Supervisor(config, config_path, board, notifier, vet)
    supervisor.catch_signals()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD_SIGNALS)  # what came meanwhile is acted on
    sockets = listeners(config.ssh.listen, config.ssh.backlog)
    status = await serve_status(config.status.socket, StatusAnswers(board, supervisor).answer)
    try:  # a reload moves neither
        http = await start_http(board, supervisor, config.status)
    except BaseException:
        status.close()
        raise
    addresses = ", ".join(str(Address(*sock.getsockname()[:2])) for sock in sockets)
    log.info("kilnproxy %s master %d listening on %s", build_info().version, os.getpid(),
             addresses)  # fmt: skip
    reports = asyncio.get_running_loop().create_task(report(board, notifier))
    try:
        exit_status = await supervisor.run(sockets)
    finally:
        status.close()
        await http.cleanup()
        reports.cancel()
        notifier.close()
    log.info("master exits %d", exit_status)
    return exit_status


async def report(board: StatusBoard, notifier: Notifier) -> None:
    """STATUS= and a memory sample every second; WATCHDOG=1 only while every worker is healthy."""
    interval = notifier.watchdog_interval
    last_ping = 0.0
    while True:
        notifier.status(f"{len(board.serving())} workers, {board.sessions_open()} sessions")
        board.sample_memory()
        now = time.monotonic()
        if interval and now - last_ping >= interval and board.healthy(now) and not board.stopping:
            notifier.watchdog()
            last_ping = now
        await asyncio.sleep(min(1.0, interval or 1.0))
