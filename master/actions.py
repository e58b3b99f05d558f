"""What the read side may ask of the supervisor, and how each request fails.

The status page and the status socket read the `StatusBoard`; the few things they ask a worker
to do (end a session, dump its tasks, profile its heap) go through `WorkerActions`, a Protocol
the supervisor implements, so that neither imports the supervisor. A request that cannot be
served raises one of the `StatusError`s below; http.py maps each to an HTTP status, the status
socket sends its message. This module must never import asyncssh.
"""

from __future__ import annotations

from typing import Any, Protocol

from kilnproxy.errors import KilnproxyError


class StatusError(KilnproxyError):
    """A status request the master cannot serve; the message is one line for a person."""


class NoSession(StatusError):
    def __init__(self, session: str) -> None:
        super().__init__(f"no session {session}")


class NoWorker(StatusError):
    def __init__(self, index: int) -> None:
        super().__init__(f"no worker {index}")


class WorkerTimeout(StatusError):
    def __init__(self, index: int, seconds: float) -> None:
        super().__init__(f"worker {index} did not answer in {seconds:.0f}s")


class WorkerBusy(StatusError):
    """A task dump or heap profile is under way there: a worker answers one at a time (a dump
    holds its loop while it runs, and a heap snapshot a thread beside it), so that requests
    cannot pile up in it."""

    def __init__(self, index: int) -> None:
        super().__init__(f"worker {index} is answering another request; try again")


class WorkerExited(StatusError):
    def __init__(self, index: int) -> None:
        super().__init__(f"worker {index} exited")


class WorkerFailed(StatusError):
    """The worker answered with an error of its own."""


class WorkerActions(Protocol):
    def end_session(self, session: str) -> None:
        """Tell the session's worker to cut it (the client is told why); NoSession if unknown."""

    async def dump_tasks(self, index: int, pid: int | None = None) -> dict[str, Any]:
        """Worker `index`'s tasks with their stacks, and its sessions: the one serving its slot,
        or the one of that `pid` (draining, say)."""

    async def profile_heap(
        self, index: int, top: int, seconds: float, stop: bool, peek: bool, pid: int | None = None
    ) -> dict[str, Any]:
        """Worker `index`'s top allocation sites (tracing for `seconds` from now on); `pid` as
        for `dump_tasks`."""
