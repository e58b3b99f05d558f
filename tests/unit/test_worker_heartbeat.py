"""What a worker tells its master (worker.process.WorkerProcess) when the master reads nothing: a
stopped master must not make every worker pile up a beat a second, with the rows of every
active session, nor one `SessionClosed` a pass, without bound. Both wait until it reads again:
then the sessions that closed meanwhile come in one message, and the beat carries the rows that
changed. A session the master never heard of is never told closed."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from dataclasses import dataclass, field
from typing import cast

import pytest

from kilnproxy import control
from kilnproxy.config import Config
from kilnproxy.worker import process
from kilnproxy.worker.introspect import first_within
from kilnproxy.worker.process import MASTER_BACKLOG, WorkerProcess
from kilnproxy.worker.service import Worker


@dataclass
class Stats:
    sessions: int = 2


@dataclass
class FakeAdmission:
    resumed: int = 0

    def resume(self) -> None:
        self.resumed += 1


@dataclass
class FakeWorker:
    index: int = 0
    rows: dict[str, int] = field(default_factory=lambda: {"3f9c2a1b": 0, "deadbeef": 0})
    admission: FakeAdmission = field(default_factory=FakeAdmission)

    def statistics(self) -> Stats:
        return Stats()

    def pool_statistics(self) -> dict[str, object]:
        return {}

    def changed_connections(self, seen: dict[str, tuple[object, ...]]) -> list[str]:
        """Session ids for rows: a row changes when its number does."""
        changed = [row for row, n in self.rows.items() if seen.get(row) != (n,)]
        seen.update((row, (self.rows[row],)) for row in changed)
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
    sent: list[control.WorkerMessage] = field(default_factory=list)

    def backlog(self) -> int:
        return self.unread

    def send(self, message: control.WorkerMessage) -> None:
        self.sent.append(message)


def said(channel: FakeChannel) -> list[tuple[str, ...]]:
    """What the master was told: a beat's rows (session ids), or the sessions closed."""
    return [
        ("closed", *m.sessions)
        if isinstance(m, control.SessionClosed)
        else tuple(cast(tuple[str, ...], m.sessions))  # the fake worker's rows are ids
        for m in channel.sent
        if isinstance(m, control.SessionClosed | control.Heartbeat)
    ]


def test_what_the_master_is_told_waits_while_it_reads_nothing(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(process, "setproctitle", lambda title: None)
    caplog.set_level(logging.INFO)

    async def body(ours: socket.socket) -> None:
        fake = FakeWorker()
        worker = WorkerProcess(cast(Config, None), cast(Worker, fake), ours)
        channel = FakeChannel()
        worker._channel = to_master = cast(control.ToMaster, channel)

        def close(session: str) -> None:
            del fake.rows[session]
            worker._session_closed(session)

        worker._beat(to_master)
        fake.rows["0b0e"] = 0
        close("0b0e")  # opened and closed between two beats: the master never heard of it
        await asyncio.sleep(0)
        worker._beat(to_master)
        assert said(channel) == [("3f9c2a1b", "deadbeef"), ()]
        channel.unread = MASTER_BACKLOG + 1
        worker._beat(to_master)
        close("deadbeef")
        fake.rows["3f9c2a1b"] = 1
        fake.rows["c0ffee"] = 0
        await asyncio.sleep(0)
        worker._beat(to_master)
        assert len(channel.sent) == 2  # held
        channel.unread = 0
        worker._beat(to_master)
        assert said(channel)[2:] == [("closed", "deadbeef"), ("3f9c2a1b", "c0ffee")]
        assert fake.admission.resumed == 3  # with every beat that went
        close("c0ffee")
        await asyncio.sleep(0)
        assert said(channel)[4:] == [("closed", "c0ffee")]

    ours, theirs = socket.socketpair()
    with ours, theirs:
        asyncio.run(body(ours))
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("worker 0: the master has not read")
    assert lines[1:] == ["worker 0: the master reads again; 2 heartbeat(s) were held"]


@dataclass
class FakeSession:
    id: str
    sent: int = 0

    def row_key(self) -> tuple[object, ...]:
        return (self.sent,)

    def statistics(self) -> str:
        return self.id


@dataclass
class FakeHost:
    sessions: dict[str, FakeSession]


@dataclass
class RowsOf:
    """The part of a `Worker` that `changed_connections` uses."""

    host: FakeHost
    _rows_from: int = 0


def test_a_beat_carries_at_most_its_rows_and_every_session_has_its_turn() -> None:
    """However many sessions changed, a heartbeat stays under the control channel's line limit
    (over it, the master would stop reading the worker, and kill it). With more sessions
    changing every second than a beat carries, each one's row still goes, in turn."""
    sessions = {f"{n:08x}": FakeSession(f"{n:08x}") for n in range(5)}
    rows = RowsOf(FakeHost(sessions))
    seen: dict[str, tuple[object, ...]] = {}

    def beat() -> list[str]:
        changed = Worker.changed_connections(cast(Worker, rows), seen, limit=2)
        return cast(list[str], changed)

    assert beat() == ["00000000", "00000001"]
    assert beat() == ["00000002", "00000003"]
    for session in sessions.values():  # every one changes before each beat from now on
        session.sent += 1
    assert beat() == ["00000004", "00000000"]
    for session in sessions.values():
        session.sent += 1
    assert beat() == ["00000001", "00000002"]
    assert beat() == ["00000003", "00000004"]
    assert beat() == ["00000000"]
    assert beat() == []


def test_a_task_dump_of_a_busy_worker_fits_the_control_line() -> None:
    rows = [{"session": f"{n:08x}", "repo": "aviato/website" * 20} for n in range(20_000)]
    kept = first_within(rows, control.MAX_LINE // 4)
    assert 0 < len(kept) < len(rows) and kept == rows[: len(kept)]
    assert len(json.dumps(kept)) <= control.MAX_LINE // 4 < len(json.dumps(rows[: len(kept) + 1]))
    assert first_within(rows[:3], control.MAX_LINE // 4) == rows[:3]


def test_what_was_held_between_two_beats_goes_with_the_next(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The master read nothing only for a moment, between two beats: no beat was held, and
    what was held then goes with the next beat all the same."""
    monkeypatch.setattr(process, "setproctitle", lambda title: None)

    async def body(ours: socket.socket) -> None:
        fake = FakeWorker()
        worker = WorkerProcess(cast(Config, None), cast(Worker, fake), ours)
        channel = FakeChannel()
        worker._channel = to_master = cast(control.ToMaster, channel)
        worker._beat(to_master)
        channel.unread = MASTER_BACKLOG + 1
        del fake.rows["deadbeef"]
        worker._session_closed("deadbeef")
        await asyncio.sleep(0)
        assert len(channel.sent) == 1  # held
        channel.unread = 0
        worker._beat(to_master)
        assert said(channel)[1:] == [("closed", "deadbeef"), ()]
        assert fake.admission.resumed == 2  # with every beat that goes

    ours, theirs = socket.socketpair()
    with ours, theirs:
        asyncio.run(body(ours))
