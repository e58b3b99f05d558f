"""The merged connection table: every worker's sessions, as their heartbeats report them.

A row is the worker's `control.SessionStats` as last reported, with the index of the worker
that serves it and its pid (to send it a kill). Rows leave when their session closes or when
their worker exits.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from kilnproxy.control import SessionStats


@dataclass(frozen=True)
class TableRow:
    stats: SessionStats
    worker: int  # its index
    pid: int

    def as_json(self) -> dict[str, Any]:
        """The row of `GET /connections` and `kilnproxy connections` (SPEC 7)."""
        return dataclasses.asdict(self.stats) | {"worker": self.worker}


class ConnectionTable:
    def __init__(self) -> None:
        self._rows: dict[str, TableRow] = {}

    def update(self, pid: int, index: int, rows: Iterable[SessionStats]) -> None:
        for stats in rows:
            self._rows[stats.session] = TableRow(stats, index, pid)

    def remove(self, session: str) -> None:
        self._rows.pop(session, None)

    def drop_worker(self, pid: int) -> None:
        for session in [s for s, row in self._rows.items() if row.pid == pid]:
            self.remove(session)

    def owner(self, session: str) -> int | None:
        """The pid of the worker serving `session`."""
        row = self._rows.get(session)
        return row.pid if row else None

    def rows(self) -> list[TableRow]:
        return sorted(self._rows.values(), key=lambda row: row.stats.started_at)
