"""A worker's own counters and latency histograms, reported in its heartbeat (SPEC 7).

Cumulative since the worker started; the master adds up every worker's, and keeps those of
workers that are gone, so that its Prometheus counters never go backwards. Label values are
bounded (outcomes, verbs, backend names from the directory); never addresses or repositories.
"""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

# Seconds: from a sub-millisecond SQLite lookup to a slow backend handshake.
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass
class Histogram:
    counts: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))
    total: float = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.total += seconds

    def snapshot(self) -> dict[str, Any]:
        return {"counts": list(self.counts), "sum": self.total}


@dataclass
class WorkerMetrics:
    outcomes: Counter[str] = field(default_factory=Counter)
    bytes_in: int = 0
    bytes_out: int = 0
    auth_lookup: Histogram = field(default_factory=Histogram)  # key -> identity
    route_lookup: Histogram = field(default_factory=Histogram)  # identity, repo -> route
    backend_dial: Histogram = field(default_factory=Histogram)

    def session_ended(self, outcome: str, bytes_in: int, bytes_out: int) -> None:
        self.outcomes[outcome] += 1
        self.bytes_in += bytes_in
        self.bytes_out += bytes_out

    def snapshot(self) -> dict[str, Any]:
        return {
            "outcomes": dict(self.outcomes),
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "auth_lookup": self.auth_lookup.snapshot(),
            "route_lookup": self.route_lookup.snapshot(),
            "backend_dial": self.backend_dial.snapshot(),
        }
