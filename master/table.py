"""The merged connection table: every worker's sessions, as their heartbeats report them.

A row is the worker's `control.SessionStats` as last reported, with the index of the worker
that serves it and its pid (to send it a kill). Rows leave when their session closes or when
their worker exits.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from kilnproxy.control import SessionStats


@dataclass(frozen=True)
class TableRow:
    stats: SessionStats
    worker: int  # its index
    pid: int

    def as_json(self, now: float) -> dict[str, Any]:
        """The row of `GET /connections` and `kilnproxy connections` (SPEC 7), its duration as
        of `now` (wall clock): a row is sent again only when it changes, so the duration the
        worker last sent is stale for a quiet session."""
        duration = round(now - self.stats.started_at, 3)
        # vars, not dataclasses.asdict (its deep copy): 20,000 rows in 17 ms, not 320
        return vars(self.stats) | {"duration": duration, "worker": self.worker}


class ConnectionTable:
    """Every worker's sessions, keyed by worker and session id: an id is 8 random hex
    characters (SPEC 3), unique in its worker, and with tens of thousands of sessions open on a
    host two workers' sessions share one now and then."""

    def __init__(self) -> None:
        self._rows: dict[tuple[int, str], TableRow] = {}
        self.version = 0  # counts the changes: what was read of an unchanged table still holds

    def update(self, pid: int, index: int, rows: Iterable[SessionStats]) -> None:
        for stats in rows:
            self._rows[pid, stats.session] = TableRow(stats, index, pid)
            self.version += 1

    def remove(self, pid: int, session: str) -> None:
        if self._rows.pop((pid, session), None) is not None:
            self.version += 1

    def drop_worker(self, pid: int) -> None:
        for key in [key for key in self._rows if key[0] == pid]:
            del self._rows[key]
            self.version += 1

    def owner(self, session: str) -> int | None:
        """The pid of the worker serving `session` (the oldest's, if two share the id)."""
        rows = [row for (_, each), row in self._rows.items() if each == session]
        return min(rows, key=lambda row: row.stats.started_at).pid if rows else None

    def rows(self) -> list[TableRow]:
        return sorted(self._rows.values(), key=lambda row: row.stats.started_at)
