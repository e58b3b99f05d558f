"""Measuring one path: wall time, CPU seconds of a process tree, syscalls and memory of
processes."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import psutil


def _total(pids: Iterable[int], read: Callable[[psutil.Process], float]) -> float:
    """`read` summed over the processes that still exist."""
    total = 0.0
    for pid in pids:
        try:
            total += read(psutil.Process(pid))
        except psutil.NoSuchProcess:
            continue
    return total


def cpu_seconds(pids: Iterable[int], children: bool = False) -> float:
    """CPU time used so far by these processes (and, with `children`, by the children they
    have reaped: how a forking sshd's per-connection processes are counted)."""

    def used(process: psutil.Process) -> float:
        times = process.cpu_times()
        reaped = times.children_user + times.children_system if children else 0.0
        return float(times.user + times.system + reaped)

    return _total(pids, used)


def io_calls(pids: Iterable[int]) -> tuple[int, int]:
    """Write and read syscalls made so far by these processes' live threads: syscw and syscr of
    /proc/PID/task/TID/io, which count write/writev and read/readv (how libuv, under uvloop,
    writes and reads sockets and pipes) but not send/sendmsg/recv. Per thread, because
    /proc/PID/io also adds the children the process has reaped (a local backend's git)."""
    writes = reads = 0
    for pid in pids:
        for io in Path(f"/proc/{pid}/task").glob("*/io"):
            try:
                fields = dict(line.split(": ") for line in io.read_text().splitlines())
            except OSError:  # the thread has ended
                continue
            writes, reads = writes + int(fields["syscw"]), reads + int(fields["syscr"])
    return writes, reads


def tree(pid: int) -> list[int]:
    """A process and all its descendants now."""
    root = psutil.Process(pid)
    return [root.pid, *(child.pid for child in root.children(recursive=True))]


def clone(argv: list[str], env: dict[str, str], target: Path) -> float:
    """Wall seconds of one clone into a fresh directory."""
    shutil.rmtree(target, ignore_errors=True)
    started = time.perf_counter()
    argv = [*argv, str(target)]
    done = subprocess.run(argv, env=env, capture_output=True, timeout=900, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{argv[:2]} {argv[-1]} failed: {done.stderr.decode()[-500:]}")
    return time.perf_counter() - started


def rss(pids: Iterable[int]) -> int:
    return int(_total(pids, lambda process: process.memory_info().rss))


def uss(pids: Iterable[int]) -> int:
    """Memory only these processes use (for forked sshd children, RSS double-counts)."""
    return int(_total(pids, lambda process: process.memory_full_info().uss))
