"""Prometheus metrics from the status board (SPEC 7): worth alerting on, bounded labels.

Labels are vcs, verb, outcome, direction, reason (admission's `Refusal` values), backend (names
from the directory), worker (an index below the worker count) and state (a fast path state):
never addresses, users or
repositories. The latency histograms
are those `control.MetricsSnapshot` declares, named `kilnproxy_<name>_seconds`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from kilnproxy.control import BUCKETS, LATENCIES, FastPathState, Histogram, MetricsSnapshot
from kilnproxy.policy.admission import Refusal
from kilnproxy.version import build_info
from master.admission import AdmissionStats
from master.board import StatusBoard
from master.table import ConnectionTable


class MasterCollector(Collector):
    def __init__(self, board: StatusBoard) -> None:
        self.board = board

    def collect(self) -> Iterator[Metric]:
        board = self.board
        serving = board.serving()
        info = GaugeMetricFamily("kilnproxy_build_info", "The running version.", labels=["version"])
        info.add_metric([build_info().version], 1)
        yield info
        yield GaugeMetricFamily("kilnproxy_workers", "Serving worker processes.", len(serving))
        yield CounterMetricFamily(
            "kilnproxy_worker_restarts", "Workers that died and were replaced.", board.restarts
        )
        yield CounterMetricFamily(
            "kilnproxy_worker_recycles",
            "Workers replaced gracefully for their memory ([workers] recycle_rss_factor).",
            board.recycles,
        )
        yield _fast_path(board)
        yield _sessions_open(board.table)
        totals = board.totals()
        yield from _totals(totals)
        yield from _admission(totals, board.admission.statistics())
        yield from _per_worker(board)
        yield from _draining(board)


def _fast_path(board: StatusBoard) -> Metric:
    """Serving workers by fast path state, every state always (0 too), so that an alert can
    compare `{state="on"}` with kilnproxy_workers."""
    family = GaugeMetricFamily(
        "kilnproxy_fast_path_workers",
        "Serving workers by state of the per-packet fast path (kilnproxy/ssh/fast_path.py).",
        labels=["state"],
    )
    counts = board.fast_path()
    for state in FastPathState:
        family.add_metric([state.value], counts[state])
    return family


def _sessions_open(table: ConnectionTable) -> Metric:
    family = GaugeMetricFamily("kilnproxy_sessions_open", "Open sessions.", labels=["vcs", "verb"])
    counts = Counter((row.stats.vcs or "none", row.stats.verb or "none") for row in table.rows())
    for (vcs, verb), count in sorted(counts.items()):
        family.add_metric([vcs, verb], count)
    return family


def _totals(totals: MetricsSnapshot) -> Iterator[Metric]:
    family = CounterMetricFamily("kilnproxy_sessions", "Ended sessions.", labels=["outcome"])
    for outcome, count in sorted(totals.outcomes.items()):
        family.add_metric([outcome], count)
    yield family
    relayed = CounterMetricFamily(
        "kilnproxy_relayed_bytes", "Bytes relayed, counted as they flow.", labels=["direction"]
    )
    relayed.add_metric(["in"], totals.bytes_in)
    relayed.add_metric(["out"], totals.bytes_out)
    yield relayed
    for name, histogram in totals.latencies().items():
        yield _histogram(f"kilnproxy_{name}_seconds", LATENCIES[name], histogram)


def _admission(totals: MetricsSnapshot, now: AdmissionStats) -> Iterator[Metric]:
    refusals = CounterMetricFamily(
        "kilnproxy_admission_refusals",
        "Connections refused before SSH, by admission or for their PROXY header (and sessions: "
        "max_sessions_per_account).",
        labels=["reason"],
    )
    for reason in Refusal:  # every reason, at zero too: a rate needs the series to exist
        refusals.add_metric([reason.value], totals.refusals.get(reason.value, 0))
    yield refusals
    yield GaugeMetricFamily(
        "kilnproxy_unauthenticated_connections",
        "Connections of the host accepted and not yet authenticated (max_startups counts them).",
        now.unauthenticated,
    )
    yield GaugeMetricFamily(
        "kilnproxy_penalised_sources", "Source netblocks refused for a penalty.", now.penalised
    )


def _per_worker(board: StatusBoard) -> Iterator[Metric]:
    rss = GaugeMetricFamily("kilnproxy_worker_rss_bytes", "Worker RSS.", labels=["worker"])
    heap = GaugeMetricFamily(
        "kilnproxy_worker_heap_bytes",
        "Worker malloc heap in use (buffers; not Python's small-object arenas).",
        labels=["worker"],
    )
    sessions = GaugeMetricFamily(
        "kilnproxy_worker_sessions", "Sessions per worker.", labels=["worker"]
    )
    for index, worker in board.slot_holders().items():  # one series per slot
        label, stats = [str(index)], board.stats(worker)
        rss.add_metric(label, stats.rss)
        heap.add_metric(label, stats.heap)
        sessions.add_metric(label, stats.sessions)
    pools = GaugeMetricFamily(
        "kilnproxy_backend_pool_connections", "Pooled backend connections.", labels=["backend"]
    )
    for backend, count in sorted(board.pooled().items()):
        pools.add_metric([backend], count)
    yield from (rss, heap, sessions, pools)


def _draining(board: StatusBoard) -> Iterator[Metric]:
    """Workers replaced (HUP, TTOU, recycled for their memory) and waiting for their sessions,
    for hours perhaps: out of the per-worker series, which speak for the serving ones, but not
    out of sight. Summed: their number is bounded, their pids are not labels."""
    draining = [worker for worker in board.workers() if not worker.serving]
    stats = [board.stats(worker) for worker in draining]
    yield GaugeMetricFamily(
        "kilnproxy_draining_workers", "Replaced workers waiting for their sessions.", len(stats)
    )
    yield GaugeMetricFamily(
        "kilnproxy_draining_rss_bytes", "RSS of the draining workers, all told.",
        sum(s.rss for s in stats),
    )  # fmt: skip
    yield GaugeMetricFamily(
        "kilnproxy_draining_sessions", "Sessions on the draining workers.",
        sum(s.sessions for s in stats),
    )  # fmt: skip


def _histogram(name: str, doc: str, histogram: Histogram) -> HistogramMetricFamily:
    cumulative, running = [], 0
    for bound, count in zip([*map(str, BUCKETS), "+Inf"], histogram.counts, strict=True):
        running += count
        cumulative.append((bound, running))
    return HistogramMetricFamily(name, doc, buckets=cumulative, sum_value=histogram.total)
