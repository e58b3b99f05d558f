"""A worker's heartbeat (worker.process.WorkerProcess._beat) when the master reads nothing: a
stopped master must not make every worker pile up a beat a second, with the rows of every
active session, without bound. Beats wait until it reads again, and the first one then carries
every row."""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass, field
from typing import cast

import pytest

from kilnproxy import control
from kilnproxy.config import Config
from kilnproxy.worker import process
from kilnproxy.worker.process import MASTER_BACKLOG, WorkerProcess
from kilnproxy.worker.service import Worker


@dataclass
class Stats:
    sessions: int = 2


@dataclass
class FakeWorker:
    index: int = 0
    rows: list[str] = field(default_factory=lambda: ["3f9c2a1b", "deadbeef"])

    def statistics(self) -> Stats:
        return Stats()

    def pool_statistics(self) -> dict[str, object]:
        return {}

    def changed_connections(self, seen: dict[str, tuple[object, ...]]) -> list[str]:
        changed = [row for row in self.rows if row not in seen]
        seen.update((row, ()) for row in changed)
        return changed

    def settle_memory(self) -> bool:
        return False

    @property
    def metrics(self) -> FakeWorker:
        return self

    def snapshot(self) -> None:
        return None


@dataclass
class FakeChannel:
    unread: int = 0
    sent: list[control.Heartbeat] = field(default_factory=list)

    def backlog(self) -> int:
        return self.unread

    def send(self, message: control.Heartbeat) -> None:
        self.sent.append(message)


def rows(beat: control.Heartbeat) -> tuple[object, ...]:
    return tuple(beat.sessions)  # the fake worker's rows are session ids


def test_beats_wait_while_the_master_reads_nothing(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(process, "setproctitle", lambda title: None)
    caplog.set_level(logging.INFO)
    ours, theirs = socket.socketpair()
    with ours, theirs:
        worker = WorkerProcess(cast(Config, None), cast(Worker, FakeWorker()), ours)
        channel = FakeChannel()
        to_master = cast(control.ToMaster, channel)
        worker._beat(to_master)
        assert [rows(beat) for beat in channel.sent] == [("3f9c2a1b", "deadbeef")]
        worker._beat(to_master)
        assert rows(channel.sent[-1]) == ()  # nothing changed
        channel.unread = MASTER_BACKLOG + 1
        worker._beat(to_master)
        worker._beat(to_master)
        assert len(channel.sent) == 2  # held
        channel.unread = 0
        worker._beat(to_master)
        assert rows(channel.sent[-1]) == ("3f9c2a1b", "deadbeef")  # every row again
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("worker 0: the master has not read")
    assert lines[1:] == ["worker 0: the master reads again; 2 heartbeat(s) were held"]
