"""A worker's admission (SPEC 4b): who may connect and who may open one more session, decided
in the worker, on the host-wide view.

Owns its slot of the host's `control.StartupTable` (the unauthenticated connections of every
worker, in all and by source, as they are now), its sessions per account and its view of
the rest of the host's (the sum of the master's `OthersChanged`), its `PenaltyView`, the refusal
counters of /metrics and the rate-limited refusal log. The decisions
are `kilnproxy.policy`'s; this is their shell: it reads the monotonic clock, draws the random
early drop, and tells the master what changed, at most one `CountsChanged` and one `Offences`
per pass of the event loop (a burst of accepts is one message, not one each). While the master
reads nothing, what it is owed is held, merged: the counts by account, and at most
HELD_OFFENCES offences (the oldest go first).

Rules: `admit` is on the accept path of every connection, so it never awaits and never waits
for the master: it decides on the startup table (read and counted under its lock, so that two
workers accepting at once are decided in turn) and the penalties the master last sent. A
refused connection is never counted nor penalised. An admitted one is counted from accept until
it authenticates or closes, whichever comes first, and is penalised at most once: when it closes
without having authenticated (`Startup.closed`).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter, deque
from collections.abc import Callable

from kilnproxy.config import LimitSettings
from kilnproxy.control import (
    CountsChanged,
    Offence,
    Offences,
    OthersChanged,
    Penalties,
    StartupTable,
)
from kilnproxy.control import WorkerMessage as Message
from kilnproxy.policy.admission import (
    AccountSessions,
    IPAddress,
    Netblock,
    Refusal,
    RefusalLog,
    StartupGate,
    TooManySessions,
    admit,
    netblock_of,
    source_address,
)
from kilnproxy.policy.penalty import PenaltyEvent, PenaltyView

log = logging.getLogger("kilnproxy.admission")
# Offences held while the master reads nothing: beyond them the oldest are dropped (a flood of
# bad connections meanwhile would otherwise hold memory without bound).
HELD_OFFENCES = 10_000

Peer = tuple[str, int]


class Startup:
    """One admitted connection, counted as a startup until it authenticates or closes."""

    __slots__ = ("_admission", "_counted", "address", "buckets", "netblock")

    def __init__(
        self,
        admission: WorkerAdmission,
        address: IPAddress | None,
        netblock: Netblock | None,
        buckets: tuple[int, ...] = (),
    ) -> None:
        self._admission = admission
        self.address = address
        self.netblock = netblock
        self.buckets = buckets  # the netblock's in the startup table
        self._counted = netblock is not None

    def authenticated(self) -> None:
        """No longer a startup; never penalised from now on."""
        if self._counted:
            self._counted = False
            self._admission.ended(self, None)

    def closed(self, event: PenaltyEvent | None) -> None:
        """Closed: `event` is how, if it ended badly and had not authenticated (else None)."""
        if self._counted:
            self._counted = False
            self._admission.ended(self, event)


class WorkerAdmission:
    """The `ssh.services.Admission` of one worker: `admit` at accept, `open_session` at exec."""

    def __init__(
        self,
        limits: LimitSettings,
        count_refusal: Callable[[Refusal], None],
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        table: StartupTable | None = None,
        slot: int = 0,
    ) -> None:
        """`table` and `slot`: the host's, from the master; without, a table of its own."""
        self.limits = limits
        self._table = table or StartupTable.create(slots=1)
        self._slot = slot
        self._penalty_settings = limits.penalty_settings()
        self._gate = StartupGate(
            limits.max_startups, limits.max_startups_per_source, rng or random.Random()
        )
        self._penalties = PenaltyView(self._penalty_settings)
        self._sessions = AccountSessions(limits.max_sessions_per_account)
        self._sessions_elsewhere: Counter[str] = Counter()
        self._count_refusal = count_refusal
        self._clock = clock
        self._log = RefusalLog()
        # Told the master at the end of this pass of the event loop (`_flush`), once it can be.
        self._send: Callable[[Message], bool] | None = None
        self._sessions_changed: Counter[str] = Counter()
        self._offences: deque[Offence] = deque(maxlen=HELD_OFFENCES)
        self._offences_dropped = 0  # by the deque's bound, since the master last read
        self._flush_scheduled = False

    # -- the accept path -----------------------------------------------------------------------

    def admit(self, peer: Peer) -> Startup | None:
        """A startup to count, or None: close the connection now (counted and logged here).

        `peer` is the client's address: the PROXY header's when one was accepted."""
        address = source_address(peer[0])
        now = self._clock()
        if address is None:  # not an IP peer (no TCP listener has one): nothing to count by
            return Startup(self, None, None)
        netblock = netblock_of(address, self.limits.penalty_netblock)
        table, buckets = self._table, self._table.buckets_of(netblock)
        with table.exclusive():
            startups, from_source = table.total(), table.from_source(buckets)
            refusal = admit(address, now, gate=self._gate, penalties=self._penalties,
                            startups=startups, source_startups=from_source)  # fmt: skip
            if refusal is None:
                table.add(self._slot, buckets, 1)
        if refusal is not None:
            why = self._why(refusal, startups, from_source, netblock)
            self._refused(refusal, now, f"connection from {peer[0]}:{peer[1]}", why)
            return None
        return Startup(self, address, netblock, buckets)

    def ended(self, startup: Startup, event: PenaltyEvent | None) -> None:
        """`startup` authenticated (event None) or closed; called once for each, by it."""
        assert startup.netblock is not None and startup.address is not None
        self._table.add(self._slot, startup.buckets, -1)  # no lock: a late -1 only refuses more
        if event is not None and self._send and self._penalised_for(startup.address, event):
            if len(self._offences) == HELD_OFFENCES:
                self._offences_dropped += 1
            self._offences.append(Offence(startup.address, event))
            self._schedule()

    def _penalised_for(self, address: IPAddress, event: PenaltyEvent) -> bool:
        """Whether the master would record it: no message for what it would drop at once."""
        settings = self._penalty_settings
        return settings.enabled and settings.seconds(event) > 0 and not settings.is_exempt(address)

    def _why(self, refusal: Refusal, startups: int, from_source: int, netblock: Netblock) -> str:
        limits = self._gate.limits
        if refusal is Refusal.FULL:
            return f"max_startups: {startups} unauthenticated connections, full at {limits.full}"
        if refusal is Refusal.RANDOM_EARLY_DROP:
            return (f"max_startups: random early drop at {startups} unauthenticated "
                    f"connections ({self._gate.drop_percent(startups)}%)")  # fmt: skip
        if refusal is Refusal.PER_SOURCE:
            return f"max_startups_per_source: {from_source} unauthenticated from {netblock}"
        if refusal is Refusal.PENALTY:
            return f"source {netblock} is penalised"
        return f"the IPv{netblock.version} penalty table is full (penalty_overflow = deny-all)"

    def _refused(self, refusal: Refusal, now: float, what: str, why: str) -> None:
        self._count_refusal(refusal)
        held = self._log.should_log(refusal, now)
        if held is not None:
            more = f" ({held} more of these not logged)" if held else ""
            log.warning("refused %s: %s%s", what, why, more)

    # -- sessions per account ------------------------------------------------------------------

    def open_session(self, account: str) -> None:
        """Count one more session of `account`, or raise TooManySessions (counted, logged)."""
        cap = self._sessions.cap
        try:
            self._sessions.open(account, self._sessions_elsewhere[account])
        except TooManySessions:
            why = f"max_sessions_per_account is {cap}"
            what = f"a session of account {account!r}"
            self._refused(Refusal.ACCOUNT_SESSIONS, self._clock(), what, why)
            raise
        if cap:  # without a cap, nobody needs the host's count
            self._session_changed(account, 1)

    def close_session(self, account: str) -> None:
        self._sessions.close(account)
        if self._sessions.cap:
            self._session_changed(account, -1)

    # -- what the master says ------------------------------------------------------------------

    def others_changed(self, message: OthersChanged) -> None:
        """The other workers' sessions per account (their startups are in the table)."""
        for account, change in message.sessions.items():
            self._sessions_elsewhere[account] += change
            if not self._sessions_elsewhere[account]:
                del self._sessions_elsewhere[account]

    def penalties(self, message: Penalties) -> None:
        for notice in message.notices():
            self._penalties.apply(notice)

    # -- telling the master, once per pass -----------------------------------------------------

    def report_to(self, send: Callable[[Message], bool]) -> None:
        """Tell the master from now on. `send` says whether a message went: False while the
        master reads nothing, and what it was is held here, merged, until `resume`. What changed
        before (nothing, if the worker has not accepted yet) is told at the end of this pass.
        Offences from before are lost."""
        self._send = send
        if self._sessions_changed:
            self._schedule()

    def resume(self) -> None:
        """Tell the master what was held, if anything (with every heartbeat that goes)."""
        if self._sessions_changed or self._offences:
            self._schedule()

    def _session_changed(self, account: str, change: int) -> None:
        self._sessions_changed[account] += change
        self._schedule()

    def _schedule(self) -> None:
        if self._send is not None and not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        assert self._send is not None, "scheduled only once there is a master to tell"
        sessions = {account: n for account, n in self._sessions_changed.items() if n}
        if sessions and not self._send(CountsChanged(sessions)):
            return  # held: what changes meanwhile adds to it
        self._sessions_changed.clear()
        if self._offences and self._send(Offences(tuple(self._offences))):
            if self._offences_dropped:
                log.warning("%d offence(s) were dropped, the oldest, while the master read "
                            "nothing", self._offences_dropped)  # fmt: skip
            self._offences.clear()
            self._offences_dropped = 0
