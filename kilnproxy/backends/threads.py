"""Work that may block, run off the event loop in a daemon thread of its own: a worker's heap
snapshot, the storage agent's path checks (a disk that does not answer). Here because
`backends` is the lowest package that both the worker and the agent import.

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

T = TypeVar("T")


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
