"""A worker's own counters and latency histograms, reported in its heartbeat (SPEC 7).

Cumulative since the worker started; the master adds up every worker's, and keeps those of
workers that are gone, so that its Prometheus counters never go backwards. Label values are
bounded (outcomes, verbs, backend names from the directory); never addresses or repositories.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from kilnproxy.control import Histogram


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
