"""Looking inside a running worker: its tasks with their stacks, its heap (SPEC 7); and
handing back the memory a flood of closed connections left (`release_memory`).

Nothing here changes how sessions run. Allocation tracing (tracemalloc) costs memory and time,
so it runs only on demand and stops by itself after a time limit.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import itertools
import json
import linecache
import logging
import math
import tracemalloc
from types import FrameType
from typing import Any, Protocol, TypeVar

from kilnproxy.backends.threads import in_daemon_thread
from kilnproxy.errors import KilnproxyError

HEAP_FRAMES = 25
HEAP_EVERY = 10.0  # seconds between two readings of the heap in use (`HeapFigure`)
T = TypeVar("T")
log = logging.getLogger("kilnproxy.worker")


class _Memory(Protocol):
    rss: int


class _Process(Protocol):
    """What ProcessFigures reads of a psutil.Process."""

    def num_fds(self) -> int: ...

    def memory_info(self) -> _Memory: ...


class ProcessFigures:
    """The process's open fds and RSS, read from /proc, which takes an fd of its own: at the fd
    limit (EMFILE, a worker full of sessions) the last figures read stand in, and the heartbeat
    that carries them goes on. A worker whose heartbeat stopped would be killed by the master,
    with every session on it, when its sessions alone were about to free the fds."""

    def __init__(self, process: _Process) -> None:
        self._process = process
        self._last = (0, 0)
        self._stale = False

    def read(self) -> tuple[int, int]:
        """(fds, rss in bytes)"""
        try:
            self._last = (self._process.num_fds(), self._process.memory_info().rss)
        except OSError as exc:
            if not self._stale:  # once, until /proc can be read again
                log.warning("cannot read this process's fds and RSS (%s): the heartbeat "
                            "carries the last figures read", exc.strerror)  # fmt: skip
            self._stale = True
        else:
            self._stale = False
        return self._last


def _frames(task: asyncio.Task[Any]) -> list[FrameType]:
    """The whole await chain of a suspended task, outermost first.

    Task.get_stack() gives only the outermost frame of a suspended coroutine; following
    cr_await (and a generator's gi_yieldfrom) down the chain gives the frame that waits.
    """
    frames: list[FrameType] = []
    awaited: Any = task.get_coro()
    while awaited is not None:
        frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "gi_frame", None)
        if frame is None:
            break
        frames.append(frame)
        awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "gi_yieldfrom", None)
    return frames or task.get_stack()


def task_dump() -> list[dict[str, Any]]:
    """Every asyncio task of this loop with its stack, innermost frame last (a goroutine dump)."""
    tasks = []
    for task in asyncio.all_tasks():
        frames = []
        for frame in _frames(task):
            code = frame.f_code
            line = linecache.getline(code.co_filename, frame.f_lineno).strip()
            frames.append(f"{code.co_filename}:{frame.f_lineno} in {code.co_name}: {line}")
        coro = task.get_coro()
        tasks.append({
            "name": task.get_name(),
            "coro": getattr(coro, "__qualname__", repr(coro)),
            "done": task.done(),
            "stack": frames,
        })  # fmt: skip
    return sorted(tasks, key=lambda t: str(t["name"]))


def first_within(items: list[dict[str, Any]], budget: int) -> list[dict[str, Any]]:
    """The first of `items` whose JSON together takes at most `budget` bytes: a dump of a worker
    with 10,000 sessions must still fit the control channel's line (control.MAX_LINE)."""
    used = 0
    for count, item in enumerate(items):
        used += len(json.dumps(item)) + 2
        if used > budget:
            return items[:count]
    return items


Sites = list[dict[str, Any]]


class HeapTracer:
    """tracemalloc on demand: started by the first request, stopped after `limit` seconds.

    A report's snapshot is taken and summed up in a thread of its own: over the few hundred
    thousand traces of a busy worker that takes seconds (10.9 s once, on a loaded machine),
    which the event loop, its sessions and its heartbeats must not wait (the master kills a
    worker silent for 10 s). The thread is a daemon: a worker that exits meanwhile does not
    wait for it. One snapshot at a time, and tracing is never stopped while one is taken:
    `tracemalloc.stop()` frees the tracebacks the snapshot thread is reading (a stop asked
    meanwhile, or the time limit, takes effect once it is done)."""

    def __init__(self) -> None:
        self._stop_timer: asyncio.TimerHandle | None = None
        self._snapshot: asyncio.Future[tuple[Sites, int, int] | None] | None = None
        self._stop_after_snapshot = False

    async def report(
        self, top: int, limit: float, stop: bool, peek: bool = False
    ) -> dict[str, Any]:
        if stop:
            self.stop()
            return {"tracing": False, "sites": []}
        if peek:  # is it tracing? without starting it
            return {"tracing": tracemalloc.is_tracing(), "sites": []}
        if self._snapshot is not None:
            raise HeapBusy("a heap snapshot is still being taken")
        loop = asyncio.get_running_loop()
        started = not tracemalloc.is_tracing()
        if started:
            tracemalloc.start(HEAP_FRAMES)
        if self._stop_timer is not None:
            self._stop_timer.cancel()
        self._stop_timer = loop.call_later(limit, self.stop)
        self._stop_after_snapshot = False
        self._snapshot = snapshot = in_daemon_thread(lambda: heap_summary(top), "heap snapshot")
        snapshot.add_done_callback(self._snapshot_done)  # when the thread is, cancelled or not
        summary = await asyncio.shield(snapshot)
        if summary is None:  # not tracing (another stop than ours)
            return {"tracing": False, "sites": []}
        sites, traced, peak = summary
        return {
            "tracing": tracemalloc.is_tracing(),
            "just_started": started,
            "stops_in": limit,
            "traced": traced,
            "peak": peak,
            "sites": sites,
        }

    def stop(self) -> None:
        if self._stop_timer is not None:
            self._stop_timer.cancel()
            self._stop_timer = None
        if self._snapshot is not None:
            self._stop_after_snapshot = True
        else:
            tracemalloc.stop()

    def _snapshot_done(self, _: asyncio.Future[Any]) -> None:
        self._snapshot = None
        if self._stop_after_snapshot:
            self._stop_after_snapshot = False
            tracemalloc.stop()


class HeapBusy(KilnproxyError):
    """A heap report was asked while the last one's snapshot is still being taken."""


_REPORTING = frozenset({__file__, tracemalloc.__file__})  # what a heap report allocates in


def heap_summary(top: int) -> tuple[Sites, int, int] | None:
    """The `top` allocation sites by size, with their tracebacks, and the bytes traced now and
    at most; None if nothing is traced."""
    try:
        snapshot = tracemalloc.take_snapshot()
    except RuntimeError:  # not tracing
        return None
    traced, peak = tracemalloc.get_traced_memory()
    stats = (stat for stat in snapshot.statistics("traceback") if not _ours(stat.traceback))
    sites = [
        {
            "size": stat.size,
            "count": stat.count,
            "traceback": [f"{f.filename}:{f.lineno}" for f in reversed(stat.traceback)],
        }
        for stat in itertools.islice(stats, top)
    ]
    return sites, traced, peak


def _ours(traceback: tracemalloc.Traceback) -> bool:
    """Allocated for the report itself (this thread, its result, tracemalloc's snapshot): not
    what an operator looks for. Asked of each site, not of each trace (a filter over every
    frame of every trace took the report from 1.3 s to 7.7 s over 50,000 traces, and a filter
    on tracemalloc's own file from 3.4 s to 19 s over 700,000)."""
    return any(frame.filename in _REPORTING for frame in traceback)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
        "fsmblks", "uordblks", "fordblks", "keepcost",
    )]  # fmt: skip


_LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def _mallinfo2() -> Any:
    function = getattr(_LIBC, "mallinfo2", None)
    if function is not None:
        function.restype = _MallInfo2
    return function


_MALLINFO2 = _mallinfo2()


def heap_in_use() -> int:
    """Bytes glibc's malloc has handed out (buffers, large objects), or 0 if unknown. Python's
    small objects live in arenas that CPython maps itself and are not counted: RSS is the whole."""
    if _MALLINFO2 is None:
        return 0
    info = _MALLINFO2()
    return int(info.uordblks + info.hblkhd)


class HeapFigure:
    """`heap_in_use`, read at most every HEAP_EVERY seconds: glibc's figure walks every free
    chunk of the heap, on the loop, and a flood leaves hundreds of thousands (81 ms a reading
    over 500,000), where a heartbeat asks for it every second."""

    def __init__(self) -> None:
        self._value = 0
        self._read_at = -math.inf

    def read(self, now: float) -> int:
        if now - self._read_at >= HEAP_EVERY:
            self._value, self._read_at = heap_in_use(), now
        return self._value


def release_memory() -> None:
    """Collect reference cycles now, and hand the heap they held back to the system.

    A closed SSH connection is a web of cycles (asyncssh's connection, its channels, their
    callbacks) that only the cyclic collector frees, and it runs as objects are allocated: a
    worker gone quiet after a flood never allocates enough to run it, so the flood's memory
    stayed held. glibc keeps freed heap below its top; malloc_trim returns it."""
    gc.collect()
    trim = getattr(_LIBC, "malloc_trim", None)
    if trim is not None:
        trim(0)
