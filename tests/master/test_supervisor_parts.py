"""Parts of the supervisor without a running master: what systemd hears of a HUP, and a worker
whose spawn fails half-way (the whole master is in test_master)."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from pathlib import Path

import psutil
import pytest

from kilnproxy.config import from_mapping
from master.board import StatusBoard
from master.supervisor import Supervisor
from master.workers import spawn


class Told:
    def __init__(self) -> None:
        self.said: list[str] = []

    def ready(self) -> None:
        self.said.append("READY=1")

    def reloading(self) -> None:
        self.said.append("RELOADING=1")


def test_a_refused_hup_says_ready_only_after_the_start_did(tmp_path: Path) -> None:
    """SPEC 6: RELOADING=1, then READY=1 once the reload is over or refused; and nothing while
    the start is under way, whose READY=1 waits for every worker."""
    path = tmp_path / "kilnproxy.toml"
    path.write_text('[timeouts]\nidle = "forever"\n')  # what a HUP refuses
    told = Told()
    config = from_mapping({}, tmp_path)
    supervisor = Supervisor(config, path, StatusBoard(), told)  # type: ignore[arg-type]
    supervisor.handle_sighup()  # workers are still booting: systemd waits for the start
    assert told.said == []
    supervisor._ready_announced = True  # every worker was ready, and READY=1 said so
    supervisor.handle_sighup()
    assert told.said == ["RELOADING=1", "READY=1"]


def test_a_spawn_that_fails_after_the_fork_leaves_no_worker_nor_descriptor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker started and not watched (its pidfd could not be opened: EMFILE) would serve on
    unseen, in the slot of the startup table the next one is given: it is killed."""
    sleeper = tmp_path / "python"
    sleeper.write_text("#!/bin/sh\nexec sleep 60\n")  # stands for the worker's interpreter
    sleeper.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(sleeper))

    def no_more_files(pid: int) -> int:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(os, "pidfd_open", no_more_files)
    listener = socket.create_server(("127.0.0.1", 0))
    table = os.memfd_create("startups")
    fds = len(os.listdir("/proc/self/fd"))
    children = {child.pid for child in psutil.Process().children()}
    with pytest.raises(OSError, match="Too many open files"):
        asyncio.run(spawn(0, 0, [listener], None, (table, 0), None))
    assert {child.pid for child in psutil.Process().children()} <= children  # killed, reaped
    assert len(os.listdir("/proc/self/fd")) == fds  # its socketpair's end closed too
    listener.close()
    os.close(table)


def test_workers_wanted_stay_within_the_startup_table(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Each worker holds a slot of the table sized at the master's start, and one beside it
    during a rolling restart: a TTIN or HUP past half of it is held there, in one line (past
    the table, every restart would TERM draining workers, cutting their sessions)."""
    path = tmp_path / "kilnproxy.toml"
    path.write_text("[workers]\ncount = 40\n")
    config = from_mapping({"workers": {"count": 4}}, tmp_path)
    supervisor = Supervisor(config, path, StatusBoard(slots=64), Told())  # type: ignore[arg-type]
    supervisor.handle_sighup()
    assert supervisor.desired == 32
    supervisor.handle_sigttin()
    assert supervisor.desired == 32
    supervisor.handle_sigttou()
    supervisor.handle_sigttin()
    assert supervisor.desired == 32
    assert "workers wanted: 40, but 32 is the most this master runs" in caplog.text
