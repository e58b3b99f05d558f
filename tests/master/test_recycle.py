"""When the master recycles a worker for its memory: decided from plain numbers (no processes)."""

from __future__ import annotations

from master.recycle import QUIET_FOR, QUIET_STARTUPS, MemoryWatch, due, host_quiet, observe

MiB = 1 << 20
FACTOR = 2.0


def beats(rss: list[int], quiet: list[bool] | None = None, ready: bool = True) -> MemoryWatch:
    """The watch after one heartbeat a second of each of `rss` (MiB), from t=0."""
    watch = MemoryWatch()
    for t, (mib, calm) in enumerate(zip(rss, quiet or [True] * len(rss), strict=True)):
        watch = observe(watch, mib * MiB, ready, calm, float(t), FACTOR)
    return watch


def test_the_baseline_is_the_first_heartbeat_once_ready() -> None:
    assert beats([50, 60]).baseline == 50 * MiB
    assert beats([50, 60], ready=False) == MemoryWatch()  # still booting: nothing yet


def test_due_after_staying_over_the_limit_while_quiet() -> None:
    over = int(QUIET_FOR) + 1
    watch = beats([50] + [101] * over)
    assert watch.over_since == 1.0
    assert due(watch, 1.0 + QUIET_FOR)
    assert not due(watch, 1.0 + QUIET_FOR - 0.5)


def test_at_or_under_the_limit_is_never_due() -> None:
    watch = beats([50] + [100] * 30)  # exactly 2x: not over
    assert watch.over_since is None and not due(watch, 1e9)


def test_a_dip_under_the_limit_starts_the_time_again() -> None:
    watch = beats([50, 120, 120, 120, 90, 120])
    assert watch.over_since == 5.0


def test_a_flood_holds_it_off_and_its_end_starts_the_time() -> None:
    rss = [50] + [150] * 20
    quiet = [True] + [False] * 10 + [True] * 10
    watch = beats(rss, quiet)
    assert watch.over_since == 11.0
    assert not due(watch, 20.0)
    assert due(watch, 11.0 + QUIET_FOR)


def test_a_factor_of_zero_never_recycles() -> None:
    watch = MemoryWatch()
    for t in range(30):
        watch = observe(watch, (50 + 100 * t) * MiB, True, True, float(t), 0.0)
    assert watch == MemoryWatch() and not due(watch, 1e9)


def test_quiet_means_no_more_than_the_startups_of_every_worker() -> None:
    assert host_quiet(0, 2)
    assert host_quiet(QUIET_STARTUPS * 2, 2)
    assert not host_quiet(QUIET_STARTUPS * 2 + 1, 2)
    assert host_quiet(QUIET_STARTUPS, 0)  # no serving worker: counted as one
