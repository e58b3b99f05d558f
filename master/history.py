"""What the master remembers about workers over time: memory samples, and retired counters."""

from __future__ import annotations

import time
from collections import Counter, deque
from typing import Any

from master.workers import WorkerHandle

HOUR = 3600


class MemoryHistory:
    """One sample per second per worker slot (index), the last hour of them (SPEC 7)."""

    def __init__(self, keep: int = HOUR) -> None:
        self._keep = keep
        self._samples: dict[int, deque[dict[str, Any]]] = {}

    def sample(self, workers: list[WorkerHandle]) -> None:
        now = round(time.time(), 3)
        newest: dict[int, WorkerHandle] = {}
        for worker in workers:  # a slot being replaced has two workers: the newer speaks for it
            if worker.index not in newest or worker.started_at > newest[worker.index].started_at:
                newest[worker.index] = worker
        for index, worker in newest.items():
            stats = worker.stats
            if not stats:
                continue
            ring = self._samples.setdefault(index, deque(maxlen=self._keep))
            ring.append({
                "t": now,
                "pid": worker.pid,
                "rss": int(stats.get("rss", 0)),
                "heap": int(stats.get("heap", 0)),
                "sessions": int(stats.get("sessions", 0)),
                "tasks": int(stats.get("tasks", 0)),
            })  # fmt: skip

    def snapshot(self, since: float = 0.0) -> dict[str, list[dict[str, Any]]]:
        return {
            str(index): [s for s in ring if s["t"] > since]
            for index, ring in sorted(self._samples.items())
        }


class RetiredTotals:
    """The cumulative counts of workers that have exited, so totals never go backwards."""

    def __init__(self) -> None:
        self.outcomes: Counter[str] = Counter()
        self.bytes_in = 0
        self.bytes_out = 0
        self.histograms: dict[str, tuple[list[int], float]] = {}

    def add(self, metrics: dict[str, Any]) -> None:
        self.outcomes.update(metrics.get("outcomes", {}))
        self.bytes_in += int(metrics.get("bytes_in", 0))
        self.bytes_out += int(metrics.get("bytes_out", 0))
        for name in ("auth_lookup", "route_lookup", "backend_dial"):
            histogram = metrics.get(name)
            if not histogram:
                continue
            counts, total = self.histograms.get(name, ([0] * len(histogram["counts"]), 0.0))
            merged = [a + b for a, b in zip(counts, histogram["counts"], strict=True)]
            self.histograms[name] = (merged, total + float(histogram["sum"]))
