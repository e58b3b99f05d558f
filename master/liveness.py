"""How the master ends a worker that stopped answering (SPEC 6), decided without side effects.

A worker not READY within BOOT_TIMEOUT is killed. A ready worker silent for HEARTBEAT_TIMEOUT
gets SIGABRT (faulthandler writes its stacks to the log), and SIGKILL ABORT_GRACE later if it is
still there. Each step is taken once: `Liveness` says how far the master has gone, so a worker
is never signalled twice for the same silence. This module decides; the supervisor signals.
"""

from __future__ import annotations

import enum
from typing import Protocol

HEARTBEAT_TIMEOUT = 10.0  # then SIGABRT (stacks to the log)
BOOT_TIMEOUT = 30.0  # a worker not READY by then is killed, and counts as a failed boot
ABORT_GRACE = 2.0  # then SIGKILL


class Liveness(enum.Enum):
    ANSWERING = "answering"  # nothing done yet
    ABORTED = "aborted"  # SIGABRT sent at `aborted_at`: SIGKILL follows after ABORT_GRACE
    KILLED = "killed"  # SIGKILL sent: only its exit is awaited now


class Escalation(enum.Enum):
    KILL_UNBOOTED = "kill unbooted"  # not READY after BOOT_TIMEOUT: SIGKILL
    ABORT = "abort"  # silent for HEARTBEAT_TIMEOUT: SIGABRT, for its stacks
    KILL = "kill"  # still there ABORT_GRACE after the SIGABRT: SIGKILL


class Watched(Protocol):
    """What the decision reads of a worker; times are monotonic."""

    @property
    def booting(self) -> bool: ...
    @property
    def started_at(self) -> float: ...
    @property
    def last_heartbeat(self) -> float: ...
    @property
    def liveness(self) -> Liveness: ...
    @property
    def aborted_at(self) -> float: ...


def escalation(worker: Watched, now: float) -> Escalation | None:
    """The next step against a running worker at `now`, or None if it is answering."""
    if worker.liveness is Liveness.KILLED:
        return None
    if worker.booting:
        if now - worker.started_at > BOOT_TIMEOUT and worker.liveness is Liveness.ANSWERING:
            return Escalation.KILL_UNBOOTED
        return None
    if worker.liveness is Liveness.ABORTED:
        return Escalation.KILL if now - worker.aborted_at > ABORT_GRACE else None
    if now - worker.last_heartbeat > HEARTBEAT_TIMEOUT:
        return Escalation.ABORT
    return None
