"""The host's side of admission (SPEC 4b): the penalty table, and every worker's counts.

Owns the host's `PenaltyBox` (every offence of every worker is recorded here, once), the
`StartupTable` that every worker decides its accepts on and the status page reads (the master
creates it and gives each worker process a slot of its own: never one a live process still has,
and zeroed once its worker is gone, however it went), and the sessions per account of each
worker, as the workers' `CountsChanged` say. Workers
decide at accept on their own; this keeps them told of sessions: a worker's changes are passed
on to every other worker, summed until the supervisor asks for the `outbox` (once per pass of
the master's event loop), and the box's notices to every worker. A new worker gets the whole
view at once (`joined`).

Rules: it never sends anything and never touches a process: the supervisor feeds it and sends
what it returns; the status board's readers read its `statistics()`. Workers are known by pid (an
index is shared by a worker and its replacement). A worker that has left is forgotten, and what it
still says (a line read after its exit) is not counted again.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from kilnproxy.control import CountsChanged, Offences, OthersChanged, Penalties, StartupTable
from kilnproxy.policy.admission import Refusal, RefusalLog
from kilnproxy.policy.penalty import Notice, Penalised, PenaltyBox, PenaltySettings

log = logging.getLogger("kilnproxy.admission")
# Slots of the startup table: room for a rolling restart (each old worker drains beside its
# replacement) and for workers added by TTIN, at 16 KiB each.
MIN_SLOTS = 64


@dataclass(frozen=True)
class AdmissionStats:
    unauthenticated: int  # connections of the host, accepted and not yet authenticated
    penalised: int  # source netblocks refused right now
    tracked: int  # netblocks in the penalty table, penalised or not yet


class HostAdmission:
    def __init__(
        self,
        penalties: PenaltySettings,
        clock: Callable[[], float] = time.monotonic,
        slots: int = MIN_SLOTS,
    ) -> None:
        self.box = PenaltyBox(penalties)
        self._clock = clock
        self.table = StartupTable.create(slots)
        self._free_slots = list(range(slots - 1, -1, -1))  # the lowest is taken first
        self._slots: dict[int, int] = {}  # by pid: the slot of every worker that has joined
        self._sessions: dict[int, Counter[str]] = {}  # by pid: every worker that has joined
        self._outbox: dict[int, Counter[str]] = {}
        self._log = RefusalLog()

    def claim_slot(self) -> int | None:
        """A slot of the table for a worker about to start; None if every one is taken."""
        return self._free_slots.pop() if self._free_slots else None

    def release_slot(self, slot: int) -> None:
        """Its worker is gone (or never started): zeroed, then free for another."""
        self.table.clear(slot)
        self._free_slots.append(slot)
        self._free_slots.sort(reverse=True)

    def joined(self, worker: int, slot: int | None = None) -> list[OthersChanged | Penalties]:
        """What a new worker is told first: the rest of the host, and the penalties in force.
        `slot` is its slot of the table, released when it leaves."""
        if slot is not None:
            self._slots[worker] = slot
        self._sessions[worker] = Counter()
        sessions: Counter[str] = Counter()
        for other in self._sessions.values():
            sessions.update(other)
        view = OthersChanged(_nonzero(sessions))
        return [view, *Penalties.of(self.box.sync(self._clock()))]

    def left(self, worker: int) -> None:
        """A worker exited: what it held is taken from the table and every other worker's
        view. Called once its process is gone, so nothing writes its slot any more."""
        slot = self._slots.pop(worker, None)
        if slot is not None:
            self.release_slot(slot)
        sessions = self._sessions.pop(worker, None)
        if sessions is None:
            return
        self._outbox.pop(worker, None)
        self._pass_on(worker, {account: -n for account, n in sessions.items()})

    def changed(self, worker: int, message: CountsChanged) -> None:
        sessions = self._sessions.get(worker)
        if sessions is None:
            return  # it has left: what it held was taken away then
        sessions.update(message.sessions)
        for account in [a for a, n in sessions.items() if not n]:
            del sessions[account]
        self._pass_on(worker, message.sessions)

    def _pass_on(self, source: int, sessions: Mapping[str, int]) -> None:
        if not sessions:
            return
        for worker in self._sessions:
            if worker != source:
                self._outbox.setdefault(worker, Counter()).update(sessions)

    def outbox(self) -> dict[int, OthersChanged]:
        """What each worker is to be told of the others since the last call, by pid."""
        told = {}
        for worker, accounts in self._outbox.items():
            if sessions := _nonzero(accounts):
                told[worker] = OthersChanged(sessions)
        self._outbox.clear()
        return told

    def offences(self, message: Offences) -> list[Penalties]:
        """Record them; what every worker is to be told of the table's changes."""
        now = self._clock()
        notices: list[Notice] = []
        for offence in message.offences:
            was_refused = self.box.refusal(offence.address, now) is not None
            recorded = self.box.record(offence.address, offence.event, now)
            penalised = [n for n in recorded if isinstance(n, Penalised)]
            if penalised and not was_refused:
                self._penalised(penalised[0], now)
            notices.extend(recorded)
        return Penalties.of(tuple(notices))

    def _penalised(self, notice: Penalised, now: float) -> None:
        held = self._log.should_log(Refusal.PENALTY, now)
        if held is not None:
            more = f" ({held} more not logged)" if held else ""
            log.warning("source %s penalised for %.0fs (last: %s)%s", notice.netblock,
                        notice.until - now, notice.event.value, more)  # fmt: skip

    def reconfigure(self, penalties: PenaltySettings) -> None:
        """A reload changed the penalty settings: a new table (the old one's netblocks, exempt
        list and durations may not be the new ones'). Old workers keep refusing what they were
        told until it expires; new ones are told the new table only."""
        if penalties != self.box.settings:
            log.info("penalty table reset: [limits] penalty settings changed")
            self.box = PenaltyBox(penalties)

    def statistics(self) -> AdmissionStats:
        penalties = self.box.statistics(self._clock())
        return AdmissionStats(
            unauthenticated=self.table.total(),
            penalised=penalties.penalised,
            tracked=penalties.tracked4 + penalties.tracked6,
        )


def _nonzero(counts: Mapping[str, int]) -> dict[str, int]:
    return {key: n for key, n in counts.items() if n}
