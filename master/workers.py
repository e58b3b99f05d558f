"""Worker processes as the supervisor sees them: a pid, a socketpair, a state, a heartbeat.

Spawning is fork+exec (`subprocess.Popen` with the listening sockets and one end of a fresh
socketpair passed by fd number), so each worker is a fresh interpreter with the code on disk
now. Exits are noticed through a pidfd, without SIGCHLD handlers.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from kilnproxy.control import BOOT_HELD_SIGNALS, Reply, ToWorker
from master.liveness import Liveness
from master.recycle import MemoryWatch


class WorkerState(enum.Enum):
    STARTING = "starting"  # spawned, not yet READY
    READY = "ready"
    DRAINING = "draining"  # told to drain, or draining on its own; replaced already
    EXITED = "exited"


@dataclass(eq=False)
class WorkerHandle:
    """The supervisor's record of one worker process; the status board reads it as a view."""

    index: int
    generation: int
    proc: subprocess.Popen[bytes]
    channel: ToWorker | None = None
    state: WorkerState = WorkerState.STARTING
    started_at: float = field(default_factory=time.monotonic)
    ready_at: float | None = None
    last_heartbeat: float = field(default_factory=time.monotonic)  # any message counts
    pending: dict[int, asyncio.Future[Reply]] = field(default_factory=dict)  # requests asked
    liveness: Liveness = Liveness.ANSWERING
    aborted_at: float = 0.0  # when SIGABRT was sent, once liveness is ABORTED
    pidfd: int = -1
    memory: MemoryWatch = field(default_factory=MemoryWatch)  # its RSS against its baseline
    recycling: bool = False  # to be replaced for its memory, as a rolling restart would
    hurried: bool = False  # replaced, and sent a TERM: its slot is needed
    listener: asyncio.Task[None] | None = None  # reads its channel until the worker's end closes

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def serving(self) -> bool:
        return self.state in (WorkerState.STARTING, WorkerState.READY)

    @property
    def booting(self) -> bool:
        return self.state is WorkerState.STARTING


def _memory_file(data: bytes) -> int:
    """A file in memory holding `data`, read from its start: a descriptor to hand a child."""
    fd = os.memfd_create("kilnproxy.toml")
    try:
        os.write(fd, data)  # a config file: far below what one write may take
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


async def spawn(
    index: int,
    generation: int,
    listeners: list[socket.socket],
    config: Path | None,
    startups: tuple[int, int],
    text: str | None,
) -> WorkerHandle:
    """Start one worker process and connect to its end of the socketpair. `startups` is the
    admission's startup table (its fd) and the worker's slot of it; `text` the configuration
    file's text as the master read it (None: there was none), which the worker takes instead
    of reading the file."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fds = [sock.fileno() for sock in listeners]
    table, slot = startups
    argv = [
        sys.executable, "-m", "kilnproxy.worker.process", "--index", str(index),
        "--listen-fds", ",".join(map(str, fds)), "--control-fd", str(theirs.fileno()),
        "--startups-fd", str(table), "--startups-slot", str(slot),
    ]  # fmt: skip
    if config is not None:
        argv += ["--config", str(config)]
    given = _memory_file((text or "").encode())  # no file: the defaults, as the master's
    argv += ["--config-fd", str(given)]
    # The child inherits the signal mask: it boots with BOOT_HELD_SIGNALS blocked. One that
    # comes for the master meanwhile waits the few milliseconds, and is acted on after.
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, BOOT_HELD_SIGNALS)
    started = False
    try:
        # A plain fork+exec (milliseconds); its exit is watched through a pidfd, so asyncio's
        # child watcher must not reap it.
        proc = subprocess.Popen(  # noqa: ASYNC220
            argv,
            pass_fds=[*fds, theirs.fileno(), table, given],
            stdin=subprocess.DEVNULL,
        )
        started = True
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        theirs.close()
        os.close(given)
        if not started:
            ours.close()
    handle = WorkerHandle(index, generation, proc)
    try:
        handle.pidfd = os.pidfd_open(proc.pid)
        handle.channel = await ToWorker.open(ours)
    except BaseException:
        # A worker nobody watches would serve on in the slot the next one is given.
        proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(1)  # killed: milliseconds
        if handle.pidfd >= 0:
            os.close(handle.pidfd)
        ours.close()
        raise
    return handle
