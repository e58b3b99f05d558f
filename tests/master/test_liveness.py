"""How the master ends a silent worker: each step decided once, in order (no processes)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from master.liveness import (
    ABORT_GRACE,
    BOOT_TIMEOUT,
    HEARTBEAT_TIMEOUT,
    Escalation,
    Liveness,
    escalation,
)

NOW = 1000.0


@dataclass
class Watched:
    booting: bool = False
    started_at: float = NOW - 99
    last_heartbeat: float = NOW
    liveness: Liveness = Liveness.ANSWERING
    aborted_at: float = 0.0


@pytest.mark.parametrize(
    ("worker", "expected"),
    [
        (Watched(booting=True, started_at=NOW - BOOT_TIMEOUT + 1, last_heartbeat=0), None),
        (Watched(booting=True, started_at=NOW - BOOT_TIMEOUT - 1), Escalation.KILL_UNBOOTED),
        (Watched(booting=True, started_at=0, liveness=Liveness.KILLED), None),
        (Watched(last_heartbeat=NOW - HEARTBEAT_TIMEOUT + 1), None),
        (Watched(last_heartbeat=NOW - HEARTBEAT_TIMEOUT - 1), Escalation.ABORT),
        (Watched(liveness=Liveness.ABORTED, aborted_at=NOW - ABORT_GRACE + 1), None),
        (Watched(liveness=Liveness.ABORTED, aborted_at=NOW - ABORT_GRACE - 1), Escalation.KILL),
        (Watched(liveness=Liveness.KILLED, last_heartbeat=0), None),
    ],
)
def test_each_step_in_its_time(worker: Watched, expected: Escalation | None) -> None:
    assert escalation(worker, NOW) is expected


def test_abort_then_kill_then_nothing_more() -> None:
    worker = Watched(last_heartbeat=NOW - HEARTBEAT_TIMEOUT - 1)
    steps = []
    for now in (NOW, NOW + 1, NOW + ABORT_GRACE + 0.5, NOW + 60, NOW + 7200):
        step = escalation(worker, now)
        steps.append(step)
        if step is Escalation.ABORT:
            worker.liveness, worker.aborted_at = Liveness.ABORTED, now
        elif step is not None:
            worker.liveness = Liveness.KILLED
    assert steps == [Escalation.ABORT, None, Escalation.KILL, None, None]
