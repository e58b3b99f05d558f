"""What the master remembers of its workers' memory: one sample per second per slot (SPEC 7)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

from kilnproxy.control import WorkerStats

HOUR = 3600


@dataclass(frozen=True)
class MemorySample:
    t: float  # epoch seconds
    pid: int
    rss: int
    heap: int
    sessions: int
    tasks: int


class MemoryHistory:
    """The last hour of samples per worker slot (index), whichever worker held the slot."""

    def __init__(self, keep: int = HOUR) -> None:
        self._keep = keep
        self._samples: dict[int, deque[MemorySample]] = {}

    def record(self, index: int, stats: WorkerStats, t: float) -> None:
        ring = self._samples.setdefault(index, deque(maxlen=self._keep))
        ring.append(MemorySample(t, stats.pid, stats.rss, stats.heap, stats.sessions, stats.tasks))

    def snapshot(self, now: float, since: float = 0.0) -> dict[str, list[dict[str, Any]]]:
        """`GET /debug/memory`'s workers: the samples of the last hour taken after `since`, by
        slot; a slot with none in the last hour (gone with a TTOU) is left out."""
        after = max(since, now - HOUR)
        return {
            str(index): [dict(vars(s)) for s in ring if s.t > after]  # asdict: 20 times slower
            for index, ring in sorted(self._samples.items())
            if ring and ring[-1].t > now - HOUR
        }
