"""Worker processes as the master sees them: a pid, a socketpair, a state, a heartbeat.

Spawning is fork+exec (`subprocess.Popen` with the listening sockets and one end of a fresh
socketpair passed by fd number), so each worker is a fresh interpreter with the code on disk
now. Exits are noticed through a pidfd, without SIGCHLD handlers.
"""

from __future__ import annotations

import asyncio
import enum
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kilnproxy.control import Channel


class WorkerState(enum.Enum):
    STARTING = "starting"  # spawned, not yet READY
    READY = "ready"
    DRAINING = "draining"  # told to drain, or draining on its own; replaced already
    EXITED = "exited"


@dataclass
class WorkerHandle:
    index: int
    generation: int
    proc: subprocess.Popen[bytes]
    channel: Channel | None = None
    state: WorkerState = WorkerState.STARTING
    started_at: float = field(default_factory=time.monotonic)
    ready_at: float | None = None
    last_heartbeat: float = field(default_factory=time.monotonic)
    stats: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)  # cumulative, from its heartbeat
    pools: dict[str, dict[str, int]] = field(default_factory=dict)
    pending: dict[int, asyncio.Future[dict[str, Any]]] = field(default_factory=dict)
    aborted_at: float | None = None  # when SIGABRT was sent for missed heartbeats
    pidfd: int = -1

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def serving(self) -> bool:
        return self.state in (WorkerState.STARTING, WorkerState.READY)

    def statistics(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "pid": self.pid,
            "state": self.state.value,
            "generation": self.generation,
            "sessions": int(self.stats.get("sessions", 0)),
            "sessions_total": int(self.stats.get("sessions_total", 0)),
            "rss": int(self.stats.get("rss", 0)),
            "heap": int(self.stats.get("heap", 0)),
            "tasks": int(self.stats.get("tasks", 0)),
            "fds": int(self.stats.get("fds", 0)),
            "backend_connections": int(self.stats.get("backend_connections", 0)),
            "heartbeat_age": round(time.monotonic() - self.last_heartbeat, 3),
        }


async def spawn(
    index: int, generation: int, listeners: list[socket.socket], config: Path | None
) -> WorkerHandle:
    """Start one worker process and connect to its end of the socketpair."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fds = [sock.fileno() for sock in listeners]
    argv = [
        sys.executable, "-m", "kilnproxy.worker.process", "--index", str(index),
        "--listen-fds", ",".join(map(str, fds)), "--control-fd", str(theirs.fileno()),
    ]  # fmt: skip
    if config is not None:
        argv += ["--config", str(config)]
    try:
        # A plain fork+exec (milliseconds); its exit is watched through a pidfd, so asyncio's
        # child watcher must not reap it.
        proc = subprocess.Popen(  # noqa: ASYNC220
            argv, pass_fds=[*fds, theirs.fileno()], stdin=subprocess.DEVNULL
        )
    finally:
        theirs.close()
    handle = WorkerHandle(index, generation, proc)
    handle.pidfd = os.pidfd_open(proc.pid)
    handle.channel = await Channel.open(ours)
    return handle
