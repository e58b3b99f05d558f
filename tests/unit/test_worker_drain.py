"""How long a worker's drain waits, and what its cut tells clients (worker.process): a worker
replaced (HUP, TTOU, its memory) cuts no session (SPEC 6), until the server stops, its master
goes or a TERM comes, which shorten the wait to the drain timeout; what comes later brings the
cut closer, never puts it off; INT cuts at once."""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import pytest

from kilnproxy.config import from_mapping
from kilnproxy.errors import CutReason
from kilnproxy.worker.process import Event, WorkerProcess
from kilnproxy.worker.service import Worker

DRAIN, MAX_SESSION = 10.0, 6 * 3600.0


@dataclass
class FakeWorker:
    """Records each drain it is asked for, which lasts until cancelled."""

    index: int = 0
    drains: list[tuple[float, CutReason]] = field(default_factory=list)
    shut_down: bool = False
    reopened: int = 0

    async def drain(self, within: float, reason: CutReason) -> None:
        self.drains.append((within, reason))
        await asyncio.sleep(3600)

    async def shutdown(self) -> None:
        self.shut_down = True


def drains(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, first: Event, *then: Event
) -> FakeWorker:
    """The drains a worker asked to drain by `first` runs as `then` come, and an INT last."""
    config = from_mapping({"timeouts": {"drain": "10s", "max_session": "6h"}}, tmp_path)
    fake = FakeWorker()

    def reopen() -> None:  # USR1: the log reopened, the drain as it was
        fake.reopened += 1

    async def body(ours: socket.socket) -> None:
        worker = WorkerProcess(config, cast(Worker, fake), ours)
        monkeypatch.setattr(worker, "_reopen_log", reopen)
        draining = asyncio.create_task(worker._drain_unless_hurried(first))
        for event in (*then, Event.STOP):
            await asyncio.sleep(0.01)
            worker._events.put_nowait(event)
        async with asyncio.timeout(5):
            await draining

    ours, theirs = socket.socketpair()
    with ours, theirs:
        asyncio.run(body(ours))
    assert fake.shut_down  # the INT: every session cut now
    fake.drains = [(round(within), reason) for within, reason in fake.drains]  # ms pass between
    return fake


@pytest.mark.parametrize(
    ("then", "shortened"),
    [
        (Event.SERVER_STOPPING, (DRAIN, CutReason.DRAIN_STOP)),
        (Event.ORPHANED, (DRAIN, CutReason.DRAIN_STOP)),
        (Event.DRAIN, (DRAIN, CutReason.DRAIN)),  # a TERM to it: a restart of its own
    ],
)
def test_a_replaced_worker_waits_for_its_sessions_until_told_otherwise(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, then: Event, shortened: tuple[float, CutReason]
) -> None:
    fake = drains(monkeypatch, tmp_path, Event.REPLACED, Event.REOPEN, then, Event.REPLACED, then)
    assert fake.drains == [(MAX_SESSION, CutReason.DRAIN), shortened]  # shortened once
    assert fake.reopened == 1


@pytest.mark.parametrize(
    ("first", "then"),
    [
        (Event.SERVER_STOPPING, []),
        (Event.ORPHANED, []),
        # A TERM's drain, which the server's then overtakes: the same deadline, told why.
        (Event.DRAIN, [(DRAIN, CutReason.DRAIN_STOP)]),
    ],
)
def test_every_other_drain_cuts_at_the_drain_timeout(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, first: Event, then: list[object]
) -> None:
    fake = drains(monkeypatch, tmp_path, first, Event.REPLACED, Event.SERVER_STOPPING, Event.DRAIN)
    terms = (DRAIN, CutReason.DRAIN if first is Event.DRAIN else CutReason.DRAIN_STOP)
    assert fake.drains == [terms, *then]
