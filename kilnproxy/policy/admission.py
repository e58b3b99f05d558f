"""Admission decisions (SPEC 4b): may a new connection start, may a new session open.

Owns OpenSSH's MaxStartups random early drop, its PerSourceMaxStartups limit over sources grouped
into netblocks (PerSourceNetBlockSize), the per-account session cap, the bounded set of refusal
reasons that /metrics counts, and the rate limit on refusal log lines. Penalties are in
`kilnproxy.policy.penalty`; `admit` reaches them through the `PenaltyCheck` protocol.

Rule 1: no I/O and no clock. Time comes in as `now` (a monotonic reading, seconds), randomness as
a `random.Random`; so every decision is replayed exactly in a unit test.
Rule 2: counts are supplied, never gathered. A worker passes the host-wide counts it read from
the startup table its master shares with it; nothing here knows there are processes.
"""

from __future__ import annotations

import enum
import hashlib
import ipaddress
import random
import re
from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from typing import Protocol

from kilnproxy.errors import ClientError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Netblock = ipaddress.IPv4Network | ipaddress.IPv6Network


class Refusal(enum.Enum):
    """Why a connection or a session was refused; the values are the /metrics `reason` labels."""

    FULL = "max_startups_full"
    RANDOM_EARLY_DROP = "max_startups_random"
    PER_SOURCE = "max_startups_per_source"
    PENALTY = "penalty"
    PENALTY_TABLE_FULL = "penalty_table_full"
    ACCOUNT_SESSIONS = "max_sessions_per_account"
    # Behind a load balancer ([ssh] proxy_protocol): a connection refused for its header.
    PROXY_NOT_ALLOWED = "proxy_not_allowed"  # a peer outside proxy_allowed sent one, or connected
    PROXY_HEADER = "proxy_header"  # malformed, truncated, or missing where it is required
    PROXY_TIMEOUT = "proxy_timeout"  # not complete within proxy_timeout


# -- sources and netblocks -------------------------------------------------------------------------


@dataclass(frozen=True)
class NetblockSize:
    """How many leading bits of a source address make one source (OpenSSH's default: 32:128)."""

    ipv4: int = 32
    ipv6: int = 128

    def __post_init__(self) -> None:
        if not 0 <= self.ipv4 <= 32 or not 0 <= self.ipv6 <= 128:
            raise ValueError(f"{self} must be 0-32 bits for IPv4 and 0-128 for IPv6")

    def __str__(self) -> str:
        return f"{self.ipv4}:{self.ipv6}"


def parse_netblock_size(text: str) -> NetblockSize:
    """`32:128`, `24:64`, or `24` alone (IPv6 then stays at 128), like PerSourceNetBlockSize."""
    match = re.fullmatch(r"(\d{1,3})(?::(\d{1,3}))?", text.strip())
    if not match:
        raise ValueError(f"{text!r} is not a netblock size like 32:128 or 24:64")
    ipv4, ipv6 = int(match.group(1)), int(match.group(2) or 128)
    if ipv4 > 32 or ipv6 > 128:
        raise ValueError(f"{text!r}: at most 32 bits for IPv4 and 128 for IPv6")
    return NetblockSize(ipv4, ipv6)


def source_address(host: str) -> IPAddress | None:
    """The peer's address as admission sees it, or None when the peer is not an IP address.

    An IPv4 client of a dual-stack listener arrives as `::ffff:a.b.c.d`; it is unmapped, else
    an IPv6 netblock such as /64 would put every IPv4 client of the host into one source. A
    zone (`%eth0`) is dropped: it names our interface, not the peer.
    """
    try:
        address = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def netblock_of(address: IPAddress, size: NetblockSize) -> Netblock:
    """The source an address belongs to: the address with its host bits cleared."""
    if isinstance(address, ipaddress.IPv4Address):
        bits, width = size.ipv4, 32
        mask = ((1 << bits) - 1) << (width - bits)
        return ipaddress.IPv4Network((int(address) & mask, bits))
    bits, width = size.ipv6, 128
    mask = ((1 << bits) - 1) << (width - bits)
    return ipaddress.IPv6Network((int(address) & mask, bits))


BUCKETS_PER_SOURCE = 2


def source_buckets(netblock: Netblock, key: bytes, buckets: int) -> tuple[int, ...]:
    """Which of `buckets` counters a source netblock is counted in, host-wide: a count-min
    sketch. Each of its buckets is shared with whatever other sources hash there, so each holds
    at least the source's own count, and the smallest is its estimate: a per-source limit may
    refuse early, when every one of its buckets is full of other sources, and never late. With
    one bucket each, any two sources in one bucket shared one limit (20 sources in 4096: a
    chance in 22 that two do); with two, a source is refused early only if both its buckets
    are full of others (20 sources: about one chance in 600 that any is).

    Every process of the host must agree, so not Python's `hash`; keyed (the master draws the
    key), so that a client cannot choose sources that share a victim's buckets. Two equal
    buckets count as one.
    """
    data = bytes((netblock.version, netblock.prefixlen)) + netblock.network_address.packed
    digest = hashlib.blake2b(data, digest_size=8 * BUCKETS_PER_SOURCE, key=key).digest()
    each = (int.from_bytes(digest[i : i + 8], "little") % buckets for i in range(0, len(digest), 8))
    return tuple(dict.fromkeys(each))


def parse_exempt(items: Iterable[str]) -> tuple[Netblock, ...]:
    """CIDRs (or single addresses); host bits set is an error, as in PerSourcePenaltyExemptList."""
    networks = []
    for item in items:
        try:
            networks.append(ipaddress.ip_network(item.strip(), strict=True))
        except ValueError as exc:
            raise ValueError(f"{item!r} is not a CIDR like 192.0.2.0/24: {exc}") from None
    return tuple(networks)


# -- MaxStartups -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class StartupLimits:
    """OpenSSH's MaxStartups `start:rate:full` (the single form `N` is `N:100:N`)."""

    start: int = 10
    rate: int = 30  # percent
    full: int = 100

    def __post_init__(self) -> None:
        if not 1 <= self.start <= self.full or not 1 <= self.rate <= 100:
            raise ValueError(f"{self} needs 1 <= start <= full and a rate of 1 to 100")

    def __str__(self) -> str:
        return f"{self.start}:{self.rate}:{self.full}"


def parse_max_startups(text: str) -> StartupLimits:
    match = re.fullmatch(r"(\d{1,9})(?::(\d{1,9}):(\d{1,9}))?", text.strip())
    if not match:
        raise ValueError(f"{text!r} is not start:rate:full like 10:30:100, or one number")
    if match.group(2) is None:
        full = int(match.group(1))
        start, rate = full, 100
    else:
        start, rate, full = (int(group) for group in match.groups())
    if not 1 <= start <= full:
        raise ValueError(f"{text!r}: start must be at least 1 and at most full")
    if not 1 <= rate <= 100:
        raise ValueError(f"{text!r}: rate is a percentage from 1 to 100")
    return StartupLimits(start, rate, full)


class StartupGate:
    """Accept or drop one new unauthenticated connection, given how many are already in flight.

    `startups` counts the host's unauthenticated connections (TCP accept until authenticated or
    closed), not counting the new one. From `start` on, a connection is dropped with a
    probability rising linearly from `rate`% to 100% at `full`; at `full` and above every one
    is. A source (netblock) already holding `per_source` of them is refused (0: no such limit).
    """

    def __init__(self, limits: StartupLimits, per_source: int, rng: random.Random) -> None:
        self.limits = limits
        self.per_source = per_source
        self._rng = rng

    def drop_percent(self, startups: int) -> int:
        """The chance, in whole percent, that the next connection is dropped."""
        start, rate, full = self.limits.start, self.limits.rate, self.limits.full
        if startups < start:
            return 0
        if startups >= full:
            return 100
        # Integer arithmetic as in sshd's should_drop_connection: the same steps, the same drops.
        return rate + (100 - rate) * (startups - start) // (full - start)

    def decide(self, startups: int, source_startups: int = 0) -> Refusal | None:
        """None to accept. The per-source limit comes before the draw, so that a source over
        its limit is counted as such rather than as bad luck (either way it is dropped)."""
        if startups >= self.limits.full:
            return Refusal.FULL
        if self.per_source and source_startups >= self.per_source:
            return Refusal.PER_SOURCE
        percent = self.drop_percent(startups)
        if percent and self._rng.randrange(100) < percent:
            return Refusal.RANDOM_EARLY_DROP
        return None


class PenaltyCheck(Protocol):
    """What admission needs of the penalty table: whether this address is refused right now."""

    def refusal(self, address: IPAddress, now: float) -> Refusal | None: ...


def admit(
    address: IPAddress | None,
    now: float,
    *,
    gate: StartupGate,
    penalties: PenaltyCheck,
    startups: int,
    source_startups: int,
) -> Refusal | None:
    """The whole accept-time decision, in sshd's order: penalties first, then MaxStartups.

    A peer without an IP address (a Unix socket) has no source: only the host-wide count applies.
    """
    if address is not None:
        refused = penalties.refusal(address, now)
        if refused is not None:
            return refused
    return gate.decide(startups, source_startups if address is not None else 0)


# -- sessions per account --------------------------------------------------------------------------


class TooManySessions(ClientError):
    """A new session over `max_sessions_per_account`: one line to the client, exit 1."""

    def __init__(self, account: str) -> None:
        super().__init__(f"too many concurrent sessions for account '{account}'")
        self.account = account


class AccountSessions:
    """Concurrent sessions per account, against a cap (0: no cap).

    `elsewhere` is what the rest of the host holds for that account, as last heard from the
    master; the cap is on the sum. Accounts with no session have no entry.
    """

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._open: dict[str, int] = {}

    def open(self, account: str, elsewhere: int = 0) -> None:
        """Count one more session of the account, or raise TooManySessions."""
        count = self._open.get(account, 0)
        if self.cap and count + elsewhere >= self.cap:
            raise TooManySessions(account)
        self._open[account] = count + 1

    def close(self, account: str) -> None:
        count = self._open.get(account, 0)
        if count == 0:
            raise ValueError(f"account {account!r} has no open session to close")
        if count == 1:
            del self._open[account]
        else:
            self._open[account] = count - 1

    def of(self, account: str) -> int:
        return self._open.get(account, 0)

    def statistics(self) -> dict[str, int]:
        return dict(self._open)


# -- refusal log lines -----------------------------------------------------------------------------


class RefusalLog:
    """Whether to log one more refusal: at most `burst` lines per reason (any hashable kind of
    refusal), refilled over `period`.

    A flood of refusals is counted exactly in /metrics; the log only needs enough lines to show
    what is happening, and the count of the lines it held back.
    """

    def __init__(self, burst: int = 5, period: float = 60.0) -> None:
        self.burst = burst
        self.period = period
        self._tokens: dict[Hashable, float] = {}
        self._last: dict[Hashable, float] = {}
        self._held: dict[Hashable, int] = {}

    def should_log(self, reason: Hashable, now: float) -> int | None:
        """None: do not log this one. Else log it, saying how many were held back before it."""
        elapsed = now - self._last.get(reason, now)
        tokens = min(
            self.burst, self._tokens.get(reason, self.burst) + elapsed * self.burst / self.period
        )
        self._last[reason] = now
        if tokens < 1:
            self._tokens[reason] = tokens
            self._held[reason] = self._held.get(reason, 0) + 1
            return None
        self._tokens[reason] = tokens - 1
        return self._held.pop(reason, 0)
