"""A worker's own counters and latency histograms, reported in its heartbeat (SPEC 7).

Cumulative since the worker started; the master adds up every worker's, and keeps those of
workers that are gone, so that its Prometheus counters never go backwards. Label values are
bounded (outcomes, verbs, admission refusals, backend names from the directory); never addresses
or repositories.
Recording is a list increment on the session's path; the frozen `control.MetricsSnapshot` is
made once per heartbeat. Which histograms exist is declared once, by that snapshot's fields.
"""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass, field

from kilnproxy.control import BUCKETS, Histogram, MetricsSnapshot
from kilnproxy.policy.admission import Refusal


class LatencyRecorder:
    """Counts latencies into the buckets of `control.BUCKETS`."""

    __slots__ = ("_counts", "_total")

    def __init__(self) -> None:
        self._counts = [0] * (len(BUCKETS) + 1)
        self._total = 0.0

    def observe(self, seconds: float) -> None:
        self._counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        self._total += seconds

    def snapshot(self) -> Histogram:
        return Histogram(tuple(self._counts), self._total)


@dataclass
class WorkerMetrics:
    outcomes: Counter[str] = field(default_factory=Counter)
    refusals: Counter[str] = field(default_factory=Counter)  # by Refusal value
    bytes_in: int = 0
    bytes_out: int = 0
    # One recorder per histogram of control.MetricsSnapshot, of the same name.
    auth_lookup: LatencyRecorder = field(default_factory=LatencyRecorder)  # key -> identity
    route_lookup: LatencyRecorder = field(default_factory=LatencyRecorder)  # repo -> route
    backend_dial: LatencyRecorder = field(default_factory=LatencyRecorder)

    def session_ended(self, outcome: str) -> None:
        self.outcomes[outcome] += 1

    def refused(self, reason: Refusal) -> None:
        self.refusals[reason.value] += 1

    def snapshot(self) -> MetricsSnapshot:
        return MetricsSnapshot(
            outcomes=dict(self.outcomes),
            refusals=dict(self.refusals),
            bytes_in=self.bytes_in,
            bytes_out=self.bytes_out,
            auth_lookup=self.auth_lookup.snapshot(),
            route_lookup=self.route_lookup.snapshot(),
            backend_dial=self.backend_dial.snapshot(),
        )
