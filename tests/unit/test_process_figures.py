"""A worker's fds and RSS for its heartbeat (worker.introspect.ProcessFigures): at the fd limit,
where reading /proc fails, the last figures read stand in, and the heartbeat goes on."""

from __future__ import annotations

import errno
import os
import resource
from dataclasses import dataclass

import psutil
import pytest

from kilnproxy.worker import introspect
from kilnproxy.worker.introspect import HEAP_EVERY, HeapFigure, ProcessFigures


@dataclass
class Memory:
    rss: int


class Process:
    def __init__(self) -> None:
        self.full = False
        self.fds = 12

    def num_fds(self) -> int:
        if self.full:
            raise OSError(errno.EMFILE, "Too many open files")
        return self.fds

    def memory_info(self) -> Memory:
        return Memory(40 << 20)


def test_the_last_figures_stand_in_while_proc_cannot_be_read(
    caplog: pytest.LogCaptureFixture,
) -> None:
    process = Process()
    figures = ProcessFigures(process)
    assert figures.read() == (12, 40 << 20)
    process.full, process.fds = True, 1024
    assert figures.read() == figures.read() == (12, 40 << 20)
    process.full = False
    assert figures.read() == (1024, 40 << 20)
    (line,) = [r.getMessage() for r in caplog.records]  # once while they stand in
    assert line.startswith("cannot read this process's fds and RSS (Too many open files)")


def test_psutil_itself_at_the_fd_limit() -> None:
    """What the fake above stands for: psutil raises OSError when no fd is left to read /proc."""
    figures = ProcessFigures(psutil.Process())
    fds, rss = figures.read()
    assert fds > 0 and rss > 0
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    held: list[int] = []
    resource.setrlimit(resource.RLIMIT_NOFILE, (fds + 16, hard))
    try:
        with pytest.raises(OSError):
            while True:
                held.append(os.open(os.devnull, os.O_RDONLY))
        with pytest.raises(OSError):
            psutil.Process().num_fds()
        assert figures.read() == (fds, rss)
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert figures.read()[0] == psutil.Process().num_fds()


def test_the_heap_is_read_every_few_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    """glibc's figure walks every free chunk of the heap, on the loop: not at every beat."""
    readings = iter([100, 200])
    monkeypatch.setattr(introspect, "heap_in_use", lambda: next(readings))
    heap = HeapFigure()
    assert [heap.read(t) for t in (5.0, 6.0, 5.0 + HEAP_EVERY - 0.1)] == [100, 100, 100]
    assert heap.read(5.0 + HEAP_EVERY) == 200
