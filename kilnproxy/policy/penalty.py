"""Per-source penalties on OpenSSH 9.8's model (PerSourcePenalties, SPEC 4b).

A connection that ends badly (failed authentication, no attempt at all, login grace exceeded)
adds seconds to its source netblock's penalty. A penalty refuses new connections from that
netblock only once more than `min` seconds have built up ("active"), then until it expires; it
never exceeds `max` from now. At most `max_sources` netblocks per address family are tracked,
active or not; when that is exceeded, `permissive` forgets the soonest to expire and
`deny-all` refuses every non-exempt address of the family until one expires.

Two halves: `PenaltyBox` (the master's: the whole table, every event) decides; `PenaltyView` (each
worker's: only the active penalties) refuses. The box says what changed as notices; a worker's
view applies the same notices the box's own view does, so both refuse the same addresses.

Rule: no I/O and no clock; `now` is a monotonic reading passed in. CLOCK_MONOTONIC is one clock
for every process of the host, so deadlines from the master mean the same in its workers.
"""

from __future__ import annotations

import enum
import heapq
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from kilnproxy.policy.admission import (
    IPAddress,
    Netblock,
    NetblockSize,
    Refusal,
    netblock_of,
)


class PenaltyEvent(enum.Enum):
    """How an unauthenticated connection ended badly (an authenticated one is never penalised)."""

    AUTHFAIL = "authfail"  # tried at least one key, none was accepted
    NOAUTH = "noauth"  # left without trying: scanners, ssh-keyscan, load balancer checks
    GRACE_EXCEEDED = "grace_exceeded"  # still unauthenticated when login grace expired


def event_for(*, attempted: bool, grace_expired: bool) -> PenaltyEvent:
    """The event of a connection that closed before authenticating, as sshd classifies it.

    One connection is one event however many keys it offered. `attempted` means at least one
    publickey request (a query for a key counts); the `none` method every client starts with
    does not.
    """
    if grace_expired:
        return PenaltyEvent.GRACE_EXCEEDED
    return PenaltyEvent.AUTHFAIL if attempted else PenaltyEvent.NOAUTH


class Overflow(enum.Enum):
    PERMISSIVE = "permissive"
    DENY_ALL = "deny-all"


@dataclass(frozen=True)
class PenaltySettings:
    """PerSourcePenalties and PerSourcePenaltyExemptList; durations in seconds, 0 = no penalty.

    grace_exceeded is 10 s as in OpenSSH since 9.9: 9.8 shipped 20 s, over `min`, so that one
    forgotten login locked its netblock out.
    """

    enabled: bool = True
    authfail: float = 5.0
    noauth: float = 1.0
    grace_exceeded: float = 10.0
    min: float = 15.0
    max: float = 600.0
    netblock: NetblockSize = field(default_factory=NetblockSize)
    exempt: tuple[Netblock, ...] = ()
    max_sources4: int = 65536
    max_sources6: int = 65536
    overflow4: Overflow = Overflow.PERMISSIVE
    overflow6: Overflow = Overflow.PERMISSIVE

    def seconds(self, event: PenaltyEvent) -> float:
        return {
            PenaltyEvent.AUTHFAIL: self.authfail,
            PenaltyEvent.NOAUTH: self.noauth,
            PenaltyEvent.GRACE_EXCEEDED: self.grace_exceeded,
        }[event]

    def max_sources(self, version: int) -> int:
        return self.max_sources4 if version == 4 else self.max_sources6

    def overflow(self, version: int) -> Overflow:
        return self.overflow4 if version == 4 else self.overflow6

    def is_exempt(self, address: IPAddress) -> bool:
        """Exemption is by the address itself, not its netblock (as in sshd)."""
        return any(address in network for network in self.exempt)


# -- notices: what the box tells the views ---------------------------------------------------------


@dataclass(frozen=True)
class Penalised:
    """New connections from `netblock` are refused through `until`."""

    netblock: Netblock
    until: float
    event: PenaltyEvent


@dataclass(frozen=True)
class Lifted:
    """The penalty of `netblock` was dropped early (to make room in a permissive table)."""

    netblock: Netblock


@dataclass(frozen=True)
class TableFull:
    """Every non-exempt address of IP `version` is refused through `until` (deny-all overflow).

    `until` is the table's soonest expiry: while full, a deny-all table takes no new entry, so
    it can only shrink, and the first expiry ends the overflow.
    """

    version: int
    until: float

    def __post_init__(self) -> None:
        if self.version not in (4, 6):
            raise ValueError(f"IP version {self.version} is neither 4 nor 6")


Notice = Penalised | Lifted | TableFull


# -- deadlines: a dict with a lazy min-heap beside it ----------------------------------------------

K = TypeVar("K")


class Deadlines(Generic[K]):
    """key -> deadline; expiring costs O(expired), not O(all).

    A changed deadline leaves its old heap entry behind, skipped when it surfaces (it no longer
    matches the dict); the heap is rebuilt when such leftovers outnumber the live entries.
    """

    def __init__(self) -> None:
        self._deadline: dict[K, float] = {}
        self._heap: list[tuple[float, int, K]] = []
        self._order = itertools.count()  # ties never compare keys (an IPv4 and an IPv6 network)

    def __len__(self) -> int:
        return len(self._deadline)

    @property
    def heap_size(self) -> int:
        """Heap entries, stale ones included; `set` keeps them under twice the live ones + 64."""
        return len(self._heap)

    def items(self) -> Iterator[tuple[K, float]]:
        return iter(self._deadline.items())

    def get(self, key: K) -> float | None:
        return self._deadline.get(key)

    def set(self, key: K, deadline: float) -> None:
        self._deadline[key] = deadline
        heapq.heappush(self._heap, (deadline, next(self._order), key))
        if len(self._heap) > 2 * len(self._deadline) + 64:
            self._heap = [(d, next(self._order), k) for k, d in self._deadline.items()]
            heapq.heapify(self._heap)

    def remove(self, key: K) -> None:
        del self._deadline[key]

    def _drop_stale(self) -> None:
        while self._heap and self._deadline.get(self._heap[0][2]) != self._heap[0][0]:
            heapq.heappop(self._heap)

    def soonest(self) -> tuple[K, float] | None:
        self._drop_stale()
        if not self._heap:
            return None
        deadline, _, key = self._heap[0]
        return key, deadline

    def pop_expired(self, now: float) -> list[K]:
        """Remove and return the keys whose deadline is before `now` (at `now` still in force)."""
        expired = []
        while (first := self.soonest()) is not None and first[1] < now:
            heapq.heappop(self._heap)
            del self._deadline[first[0]]
            expired.append(first[0])
        return expired


# -- the refusing half -----------------------------------------------------------------------------


class PenaltyView:
    """Active penalties and deny-all overflows, as notices describe them; answers `refusal`."""

    def __init__(self, settings: PenaltySettings) -> None:
        self.settings = settings
        self._refused: Deadlines[Netblock] = Deadlines()
        self._table_full: dict[int, float] = {}

    def __len__(self) -> int:
        return len(self._refused)

    def apply(self, notice: Notice) -> None:
        if isinstance(notice, Penalised):
            self._refused.set(notice.netblock, notice.until)
        elif isinstance(notice, Lifted):
            if self._refused.get(notice.netblock) is not None:
                self._refused.remove(notice.netblock)
        else:
            self._table_full[notice.version] = notice.until

    def expire(self, now: float) -> None:
        self._refused.pop_expired(now)
        for version, until in list(self._table_full.items()):
            if until < now:
                del self._table_full[version]

    def refusal(self, address: IPAddress, now: float) -> Refusal | None:
        """PENALTY or PENALTY_TABLE_FULL while in force; None for an exempt address."""
        if not self.settings.enabled or self.settings.is_exempt(address):
            return None
        self.expire(now)
        if address.version in self._table_full:
            return Refusal.PENALTY_TABLE_FULL
        if self._refused.get(netblock_of(address, self.settings.netblock)) is not None:
            return Refusal.PENALTY
        return None

    def table_full(self) -> dict[int, float]:
        return dict(self._table_full)


# -- the deciding half -----------------------------------------------------------------------------


@dataclass
class _Entry:
    active: bool
    event: PenaltyEvent  # the latest, for the log and the refusal's reason


@dataclass(frozen=True)
class PenaltyStatistics:
    tracked4: int  # IPv4 netblocks in the table, active or not
    tracked6: int
    penalised: int  # netblocks refused right now
    table_full: tuple[int, ...]  # IP versions refused entirely (deny-all overflow)


class PenaltyBox:
    """The host's penalty table: records events, says what changed, refuses through `view`."""

    def __init__(self, settings: PenaltySettings) -> None:
        self.settings = settings
        self.view = PenaltyView(settings)
        self._tables: dict[int, Deadlines[Netblock]] = {4: Deadlines(), 6: Deadlines()}
        self._entries: dict[Netblock, _Entry] = {}
        self._active = 0

    def refusal(self, address: IPAddress, now: float) -> Refusal | None:
        self.expire(now)
        return self.view.refusal(address, now)

    def record(self, address: IPAddress, event: PenaltyEvent, now: float) -> tuple[Notice, ...]:
        """Add the event's seconds to the address's netblock; return the notices for the views.

        As in sshd: seconds add to the time still left (not to now), the total is capped at
        `max` from now, the penalty turns active once more than `min` is left and stays active
        until it expires. A deny-all table that is full takes no event at all.
        """
        seconds = min(self.settings.seconds(event), self.settings.max)
        if not self.settings.enabled or seconds <= 0 or self.settings.is_exempt(address):
            return ()
        self.expire(now)
        version = address.version
        if self._full(version):
            return ()
        netblock = netblock_of(address, self.settings.netblock)
        table = self._tables[version]
        left = table.get(netblock)
        until = now + seconds if left is None else min(left + seconds, now + self.settings.max)
        entry = self._entries.setdefault(netblock, _Entry(active=False, event=event))
        entry.event = event
        table.set(netblock, until)
        if not entry.active and until - now > self.settings.min:
            entry.active = True
            self._active += 1
        notices: list[Notice] = [Penalised(netblock, until, event)] if entry.active else []
        notices += self._overflow(version)
        for notice in notices:
            self.view.apply(notice)
        return tuple(notices)

    def expire(self, now: float) -> None:
        for table in self._tables.values():
            for netblock in table.pop_expired(now):
                self._forget(netblock)
        self.view.expire(now)

    def sync(self, now: float) -> tuple[Notice, ...]:
        """Everything in force: what a new worker's empty view needs to catch up."""
        self.expire(now)
        notices: list[Notice] = []
        for table in self._tables.values():
            for netblock, until in table.items():
                entry = self._entries[netblock]
                if entry.active:
                    notices.append(Penalised(netblock, until, entry.event))
        notices += [TableFull(version, until) for version, until in self.view.table_full().items()]
        return tuple(notices)

    def statistics(self, now: float) -> PenaltyStatistics:
        self.expire(now)
        return PenaltyStatistics(
            tracked4=len(self._tables[4]),
            tracked6=len(self._tables[6]),
            penalised=self._active,
            table_full=tuple(sorted(self.view.table_full())),
        )

    def _full(self, version: int) -> bool:
        return self.settings.overflow(version) is Overflow.DENY_ALL and len(
            self._tables[version]
        ) >= self.settings.max_sources(version)

    def _overflow(self, version: int) -> list[Notice]:
        """deny-all: say the family is refused; permissive: drop the soonest to expire."""
        table, limit = self._tables[version], self.settings.max_sources(version)
        if self._full(version):
            soonest = table.soonest()
            return [TableFull(version, soonest[1])] if soonest else []
        lifted: list[Notice] = []
        while len(table) > limit and (soonest := table.soonest()) is not None:
            table.remove(soonest[0])
            if self._forget(soonest[0]):
                lifted.append(Lifted(soonest[0]))
        return lifted

    def _forget(self, netblock: Netblock) -> bool:
        """Drop the entry; whether it was active."""
        entry = self._entries.pop(netblock)
        if entry.active:
            self._active -= 1
        return entry.active
