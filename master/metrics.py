"""Prometheus metrics from what the workers report (SPEC 7): worth alerting on, bounded labels.

Labels are vcs, verb, outcome, direction, backend (names from the directory) and worker (an
index below the worker count): never addresses, users or repositories.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from kilnproxy.control import BUCKETS
from kilnproxy.version import build_info

if TYPE_CHECKING:
    from master.arbiter import Master

_HISTOGRAMS = {
    "auth_lookup": ("kilnproxy_auth_lookup_seconds", "Directory lookup of a public key."),
    "route_lookup": ("kilnproxy_route_lookup_seconds", "Directory lookup of a repository."),
    "backend_dial": ("kilnproxy_backend_dial_seconds", "Dialing an ssh:// backend."),
}


class MasterCollector(Collector):
    def __init__(self, master: Master) -> None:
        self.master = master

    def collect(self) -> Iterator[Metric]:
        master = self.master
        workers = [w for w in master.workers if w.serving]
        info = GaugeMetricFamily("kilnproxy_build_info", "The running version.", labels=["version"])
        info.add_metric([build_info().version], 1)
        yield info
        yield GaugeMetricFamily("kilnproxy_workers", "Serving worker processes.", len(workers))
        yield CounterMetricFamily(
            "kilnproxy_worker_restarts", "Workers that died and were replaced.", master.restarts
        )
        yield from self._sessions_open(master)
        yield from self._totals(master)
        yield from self._per_worker(workers)

    def _sessions_open(self, master: Master) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "kilnproxy_sessions_open", "Open sessions.", labels=["vcs", "verb"]
        )
        counts = Counter((row.get("vcs") or "none", row.get("verb") or "none")
                         for row in master.table.rows())  # fmt: skip
        for (vcs, verb), count in sorted(counts.items()):
            family.add_metric([vcs, verb], count)
        yield family

    def _totals(self, master: Master) -> Iterator[Metric]:
        live = [w.metrics for w in master.workers]
        outcomes: Counter[str] = Counter(master.retired.outcomes)
        for metrics in live:
            outcomes.update(metrics.get("outcomes", {}))
        family = CounterMetricFamily("kilnproxy_sessions", "Ended sessions.", labels=["outcome"])
        for outcome, count in sorted(outcomes.items()):
            family.add_metric([outcome], count)
        yield family
        relayed = CounterMetricFamily(
            "kilnproxy_relayed_bytes", "Bytes relayed.", labels=["direction"]
        )
        for direction in ("in", "out"):
            key = f"bytes_{direction}"
            total = getattr(master.retired, key) + sum(int(m.get(key, 0)) for m in live)
            relayed.add_metric([direction], total)
        yield relayed
        for key, (name, doc) in _HISTOGRAMS.items():
            yield _histogram(name, doc, master.retired.histograms.get(key), live, key)

    def _per_worker(self, workers: list[Any]) -> Iterator[Metric]:
        rss = GaugeMetricFamily("kilnproxy_worker_rss_bytes", "Worker RSS.", labels=["worker"])
        heap = GaugeMetricFamily(
            "kilnproxy_worker_heap_bytes",
            "Worker malloc heap in use (buffers; not Python's small-object arenas).",
            labels=["worker"],
        )
        sessions = GaugeMetricFamily(
            "kilnproxy_worker_sessions", "Sessions per worker.", labels=["worker"]
        )
        pools = GaugeMetricFamily(
            "kilnproxy_backend_pool_connections", "Pooled backend connections.", labels=["backend"]
        )
        pooled: Counter[str] = Counter()
        for worker in workers:
            label = [str(worker.index)]
            rss.add_metric(label, int(worker.stats.get("rss", 0)))
            heap.add_metric(label, int(worker.stats.get("heap", 0)))
            sessions.add_metric(label, int(worker.stats.get("sessions", 0)))
            for backend, pool in worker.pools.items():
                pooled[backend] += int(pool.get("connections", 0))
        for backend, count in sorted(pooled.items()):
            pools.add_metric([backend], count)
        yield from (rss, heap, sessions, pools)


def _histogram(
    name: str,
    doc: str,
    retired: tuple[list[int], float] | None,
    live: list[dict[str, Any]],
    key: str,
) -> HistogramMetricFamily:
    counts = list(retired[0]) if retired else [0] * (len(BUCKETS) + 1)
    total = retired[1] if retired else 0.0
    for metrics in live:
        histogram = metrics.get(key)
        if histogram:
            counts = [a + b for a, b in zip(counts, histogram["counts"], strict=True)]
            total += float(histogram["sum"])
    cumulative, running = [], 0
    for bound, count in zip([*map(str, BUCKETS), "+Inf"], counts, strict=True):
        running += count
        cumulative.append((bound, running))
    return HistogramMetricFamily(name, doc, buckets=cumulative, sum_value=total)
