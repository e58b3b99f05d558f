"""The status board, fed as the supervisor feeds it, read as its readers read it (no processes)."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from kilnproxy.control import (
    BUCKETS,
    FastPathState,
    Heartbeat,
    Histogram,
    MetricsSnapshot,
    PoolStats,
    SessionStats,
    WorkerStats,
)
from master.board import SILENT, StatusBoard, fast_path_summary
from master.metrics import MasterCollector
from master.workers import WorkerState


@dataclass
class FakeWorker:
    index: int
    pid: int
    generation: int = 0
    state: WorkerState = WorkerState.READY
    started_at: float = 0.0
    last_heartbeat: float = 0.0

    @property
    def serving(self) -> bool:
        return self.state in (WorkerState.STARTING, WorkerState.READY)


def stats(
    pid: int, sessions: int = 0, rss: int = 1000, fast: FastPathState = FastPathState.NOT_APPLIED
) -> WorkerStats:
    return dataclasses.replace(
        SILENT, pid=pid, sessions=sessions, rss=rss, heap=rss // 2, fast_path=fast
    )


def row(session: str, started_at: float = 1.0, vcs: str | None = "git") -> SessionStats:
    return SessionStats(
        session=session, remote_addr="127.0.0.1:1", login="git", account="aviato", user="alice",
        key_name="k", key_fingerprint="SHA256:x", repo="aviato/website", vcs=vcs,
        verb="git-upload-pack", backend="local", started_at=started_at, duration=0.0,
        bytes_in=1, bytes_out=2, state="authenticated",
    )  # fmt: skip


def metrics(ok: int, bytes_out: int) -> MetricsSnapshot:
    counts = (ok,) + (0,) * len(BUCKETS)
    return MetricsSnapshot({"ok": ok}, 0, bytes_out, auth_lookup=Histogram(counts, 0.001 * ok))


def beat(pid: int, *rows: SessionStats, ok: int = 0, sessions: int = 0) -> Heartbeat:
    pools = {"storage": PoolStats(connections=2, channels=1, dials=3)}
    return Heartbeat(stats(pid, sessions), metrics(ok, 100 * ok), pools, rows)


def test_rows_follow_heartbeats_closes_and_exits() -> None:
    board = StatusBoard()
    one, two = FakeWorker(0, 100), FakeWorker(1, 101)
    board.joined(one)
    board.joined(two)
    board.heard(one, beat(100, row("aaaaaaaa", 2.0), row("bbbbbbbb", 1.0)))
    board.heard(two, beat(101, row("cccccccc", 3.0)))
    assert [r.stats.session for r in board.table.rows()] == ["bbbbbbbb", "aaaaaaaa", "cccccccc"]
    first = board.table.rows()[0]
    json_row = first.as_json(first.stats.started_at + 61.25)
    assert json_row["worker"] == 0 and json_row["repo"] == "aviato/website"
    assert json_row["duration"] == 61.25  # as of now, not as of its row's last heartbeat
    assert list(json_row)[-1] == "worker"  # after the session's own fields, as always
    assert board.table.owner("cccccccc") == 101
    board.heard(two, beat(101, row("aaaaaaaa", 4.0)))  # another worker's session, the same id
    board.sessions_closed(one, ["aaaaaaaa"])
    assert [r.stats.session for r in board.table.rows()] == ["bbbbbbbb", "cccccccc", "aaaaaaaa"]
    assert board.table.owner("aaaaaaaa") == 101
    board.left(two, died=True)
    assert [r.stats.session for r in board.table.rows()] == ["bbbbbbbb"]
    assert board.table.owner("cccccccc") is None
    board.heard(two, beat(101, row("dddddddd")))  # read from its channel after it exited
    assert board.table.owner("dddddddd") is None and board.workers() == [one]


def test_totals_never_go_backwards_and_restarts_count_deaths_only() -> None:
    board = StatusBoard()
    one, two, three = FakeWorker(0, 100), FakeWorker(1, 101), FakeWorker(0, 102)
    for worker in (one, two, three):
        board.joined(worker)
    board.heard(one, beat(100, ok=3))
    board.heard(two, beat(101, ok=5))
    assert board.totals().outcomes == {"ok": 8}
    board.left(one, died=False)  # drained
    board.left(two, died=True)
    assert board.restarts == 1
    board.heard(three, beat(102, ok=1))
    totals = board.totals()
    assert totals.outcomes == {"ok": 9} and totals.bytes_out == 900
    assert totals.auth_lookup.counts[0] == 9
    assert board.retired.outcomes == {"ok": 8}


def test_stats_are_zeros_until_the_first_heartbeat() -> None:
    board = StatusBoard()
    worker = FakeWorker(0, 100, state=WorkerState.STARTING)
    board.joined(worker)
    assert board.stats(worker) == SILENT and board.sessions_open() == 0
    board.heard(worker, beat(100, sessions=4))
    assert board.stats(worker).sessions == 4 and board.sessions_open() == 4


def test_memory_samples_one_per_slot_the_newer_worker_speaking() -> None:
    board = StatusBoard()
    old = FakeWorker(0, 100, started_at=1.0)
    new = FakeWorker(0, 101, started_at=2.0, state=WorkerState.STARTING)
    quiet = FakeWorker(1, 102, started_at=3.0)
    for worker in (old, new, quiet):
        board.joined(worker)
    board.heard(old, beat(100, sessions=1))
    board.heard(new, beat(101, sessions=2))
    board.sample_memory()
    history = board.memory.snapshot(time.time())
    assert list(history) == ["0"]  # the quiet worker has said nothing yet
    (sample,) = history["0"]
    assert (sample["pid"], sample["sessions"], sample["rss"], sample["heap"]) == (101, 2, 1000, 500)
    assert sample["t"] == pytest.approx(time.time(), abs=5)
    assert board.memory.snapshot(time.time(), since=sample["t"]) == {"0": []}
    assert board.memory.snapshot(sample["t"] + 3600) == {}  # an hour later: a slot gone


def test_one_series_per_slot_while_its_worker_is_replaced() -> None:
    """A rolling restart's step: the old worker and its replacement both serve slot 0. /metrics
    has one series for it (two would be one series sampled twice, which Prometheus drops), from
    the newer worker once it has spoken."""
    board = StatusBoard()
    old, new = FakeWorker(0, 100, started_at=1.0), FakeWorker(0, 101, started_at=2.0)
    for worker in (old, new):
        board.joined(worker)
    board.heard(old, beat(100, sessions=1))
    registry = CollectorRegistry()
    registry.register(MasterCollector(board))

    def sessions() -> list[tuple[dict[str, str], float]]:
        families = text_string_to_metric_families(generate_latest(registry).decode())
        family = next(f for f in families if f.name == "kilnproxy_worker_sessions")
        return [(sample.labels, sample.value) for sample in family.samples]

    assert board.slot_holders() == {0: old} and sessions() == [({"worker": "0"}, 1.0)]
    board.heard(new, beat(101, sessions=2))
    assert board.slot_holders() == {0: new} and sessions() == [({"worker": "0"}, 2.0)]


def test_a_draining_worker_stays_in_sight_in_metrics() -> None:
    """A worker replaced by a HUP, or recycled for its memory, may drain for hours: out of the
    per-slot series, which its replacement speaks for, and summed into the draining ones."""
    board = StatusBoard()
    old, new = FakeWorker(0, 100, started_at=1.0), FakeWorker(0, 101, started_at=2.0)
    for worker in (old, new):
        board.joined(worker)
    board.heard(old, dataclasses.replace(beat(100), stats=stats(100, sessions=3000, rss=900)))
    board.heard(new, dataclasses.replace(beat(101), stats=stats(101, sessions=10, rss=60)))
    old.state = WorkerState.DRAINING
    registry = CollectorRegistry()
    registry.register(MasterCollector(board))
    families = text_string_to_metric_families(generate_latest(registry).decode())
    values = {s.name: s.value for f in families for s in f.samples if s.name.startswith("kiln")}
    assert values["kilnproxy_worker_rss_bytes"] == 60
    assert values["kilnproxy_draining_workers"] == 1
    assert values["kilnproxy_draining_rss_bytes"] == 900
    assert values["kilnproxy_draining_sessions"] == 3000


def test_pools_of_serving_workers_and_health() -> None:
    board = StatusBoard()
    now = time.monotonic()
    ready = FakeWorker(0, 100, last_heartbeat=now)
    draining = FakeWorker(1, 101, state=WorkerState.DRAINING, last_heartbeat=now - 60)
    assert not board.healthy(now)  # no worker ready
    board.joined(ready)
    board.joined(draining)
    board.heard(ready, beat(100))
    board.heard(draining, beat(101))
    assert board.pooled() == {"storage": 2}
    assert [w.pid for w in board.serving()] == [100]
    assert board.healthy(now)  # the draining worker's silence does not count
    ready.last_heartbeat = now - 4
    assert not board.healthy(now)


def fast_path_workers(board: StatusBoard) -> dict[str, float]:
    """kilnproxy_fast_path_workers by state, as /metrics shows it."""
    registry = CollectorRegistry()
    registry.register(MasterCollector(board))
    families = text_string_to_metric_families(generate_latest(registry).decode())
    family = next(f for f in families if f.name == "kilnproxy_fast_path_workers")
    return {sample.labels["state"]: sample.value for sample in family.samples}


def test_the_fast_path_of_serving_workers_in_a_word_and_by_state() -> None:
    board = StatusBoard()
    assert fast_path_summary(board.fast_path()) == "none"
    on, other, draining = FakeWorker(0, 100), FakeWorker(1, 101), FakeWorker(2, 102)
    for worker in (on, other, draining):
        board.joined(worker)
    board.heard(on, dataclasses.replace(beat(100), stats=stats(100, fast=FastPathState.ON)))
    board.heard(other, beat(101))  # heard from, with the fast path not applied
    assert fast_path_summary(board.fast_path()) == "not applied 2, on 1"
    board.heard(other, dataclasses.replace(beat(101), stats=stats(101, fast=FastPathState.ON)))
    draining.state = WorkerState.DRAINING  # not serving: not counted
    assert fast_path_summary(board.fast_path()) == "on"
    assert fast_path_workers(board) == {
        "not applied": 0, "on": 2, "disabled": 0, "unsupported": 0,
    }  # fmt: skip
