"""Work that may block, run off the event loop in a daemon thread of its own: a worker's heap
snapshot, the checks of a repository's path on its disk (`DiskChecks`: the storage agent's and
the local backend's; a disk that does not answer). Here because `backends` is the lowest package
that both the worker and the agent import.

A thread of its own, not an executor's: a thread that never ends (a stat on a hung mount) holds
no pool that later work would queue for, and the process's exit does not wait for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
from collections.abc import Callable
from typing import TypeVar

from kilnproxy.errors import KilnproxyError

T = TypeVar("T")
# A repository on a disk that has stopped answering (a hung NFS mount) must hold its own request
# only, not the loop that serves every other.
CHECK_WITHIN = 5.0  # seconds before such a check is given up
STUCK_AT_MOST = 8  # checks left waiting on a disk; past them a check is refused at once


def in_daemon_thread(
    work: Callable[[], T], name: str, ended: Callable[[], None] | None = None
) -> asyncio.Future[T]:
    """`work()` in a new daemon thread; its result (or exception) in the running loop, where
    `ended` is also called once the thread has ended, whether anyone still waits or not. If
    the loop is closed before it ends, the result is dropped: nobody waits for it any more."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(outcome: Callable[[], None]) -> None:
        if ended is not None:
            ended()
        if not future.done():  # not cancelled meanwhile
            outcome()

    def run() -> None:
        try:
            result = work()
        except BaseException as exc:  # whatever ends the thread ends the wait, as an error
            # there (a SystemExit raised in the loop would stop it)
            error = exc if isinstance(exc, Exception) else RuntimeError(f"{name}: {exc!r}")
            done = functools.partial(future.set_exception, error)
        else:
            done = functools.partial(future.set_result, result)
        with contextlib.suppress(RuntimeError):  # the loop is closed
            loop.call_soon_threadsafe(settle, done)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future


class StuckDisk(KilnproxyError):
    """A check the disk did not answer in time, or one refused while too many still wait."""


class DiskChecks:
    """Work that reads a disk, each in a daemon thread of its own: one that the disk never
    answers is given up after `within` seconds and left behind (it holds no pool that another
    check would queue for, and the process's exit does not wait for it). At most `stuck` of
    those left behind at once: a disk that answers none is not left to pile up threads, while
    any number of checks that it answers run side by side (a burst of clones)."""

    def __init__(self, within: float = CHECK_WITHIN, stuck: int = STUCK_AT_MOST) -> None:
        self.within = within
        self.stuck = stuck
        self.left = 0  # checks given up (timed out, or their caller gone) whose thread runs on

    async def run(self, work: Callable[[], T]) -> T:
        if self.left >= self.stuck:
            raise StuckDisk(f"{self.left} check(s) still wait on the disk")
        ended = abandoned = False

        def end() -> None:  # on the loop, once the thread has ended
            nonlocal ended
            ended = True
            if abandoned:
                self.left -= 1

        checked = in_daemon_thread(work, "disk check", ended=end)
        try:
            async with asyncio.timeout(self.within):
                return await checked
        except BaseException as exc:
            if not ended:  # its thread runs on: counted until it ends
                abandoned = True
                self.left += 1
            if isinstance(exc, TimeoutError):
                raise StuckDisk(f"the disk did not answer within {self.within:g}s") from None
            raise
