"""What a worker lends its SSH sessions and relays: the directory, the backends, the counters,
admission.

Owns `Services`, the one frozen record a session and each of its relays are given, and the small
Protocols that say how little of the worker's parts they use. The ssh package is below the
worker and must never import `kilnproxy.worker`; the worker's `WorkerMetrics` and `Backends`
fit these Protocols as they are, and tests give fakes. This module must hold no state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from kilnproxy.backends import Backend
from kilnproxy.directory import Directory, Route
from kilnproxy.policy.admission import Refusal
from kilnproxy.policy.penalty import PenaltyEvent


class Observer(Protocol):
    """A latency histogram, as far as a session fills it."""

    def observe(self, seconds: float) -> None: ...


class SessionMetrics(Protocol):
    """The counters a session and its relays add to.

    The counters themselves stay the worker's (`kilnproxy.worker.metrics`): what they add up
    to, and how that reaches the master, is the worker's report, not the SSH surface's.
    """

    @property
    def auth_lookup(self) -> Observer:
        """Time from a public key to its identity in the directory."""
        ...

    @property
    def route_lookup(self) -> Observer:
        """Time from an identity and a repository to its route in the directory."""
        ...

    # Bytes relayed, client to backend and back, added as they flow: a clone of hours counts
    # in /metrics while it runs, not at its end.
    bytes_in: int
    bytes_out: int

    def session_ended(self, outcome: str) -> None:
        """Called once per access line: one command, or a connection that ran none."""

    def refused(self, reason: Refusal) -> None:
        """A connection refused before SSH for its PROXY header (admission counts its own)."""


class BackendFinder(Protocol):
    """Where a route's command runs (the worker's `Backends`)."""

    def for_route(self, route: Route) -> Backend: ...


class Startup(Protocol):
    """One admitted connection, counted host-wide as unauthenticated until it authenticates or
    closes, whichever comes first (the second call is ignored)."""

    def authenticated(self) -> None: ...

    def closed(self, event: PenaltyEvent | None) -> None:
        """`event`: how it ended badly before authenticating, for its source's penalty; None
        if it did not (authenticated, or cut by us: a drain, a shutdown, an administrator)."""


class Admission(Protocol):
    """SPEC 4b as the SSH surface asks it (the worker's `WorkerAdmission`)."""

    def admit(self, peer: tuple[str, int]) -> Startup | None:
        """At accept, with the client's address: its `Startup`, or None to close it at once
        (no banner, no key exchange); the refusal is counted and logged already."""
        ...

    def open_session(self, account: str) -> None:
        """At exec: count a session of the account, or raise `TooManySessions`."""

    def close_session(self, account: str) -> None:
        """Once for each `open_session` that did not raise."""


@dataclass(frozen=True)
class Services:
    """The worker's shared parts, as its sessions and relays see them."""

    directory: Directory
    backends: BackendFinder
    metrics: SessionMetrics
    admission: Admission
