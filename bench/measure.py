"""Measuring one path: wall time, CPU seconds of a process tree, memory of processes."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

import psutil


def cpu_seconds(pids: Iterable[int], children: bool = False) -> float:
    """CPU time used so far by these processes (and, with `children`, by the children they
    have reaped: how a forking sshd's per-connection processes are counted)."""
    total = 0.0
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
        if children:
            total += times.children_user + times.children_system
    return total


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
    total = 0
    for pid in pids:
        try:
            total += psutil.Process(pid).memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total


def uss(pids: Iterable[int]) -> int:
    """Memory only these processes use (for forked sshd children, RSS double-counts)."""
    total = 0
    for pid in pids:
        try:
            total += psutil.Process(pid).memory_full_info().uss
        except psutil.NoSuchProcess:
            continue
    return total
