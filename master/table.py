"""The merged connection table: every worker's sessions, as their heartbeats report them."""

from __future__ import annotations

from typing import Any


class ConnectionTable:
    def __init__(self) -> None:
        self._rows: dict[str, dict[str, Any]] = {}
        self._owner: dict[str, int] = {}  # session -> worker pid

    def update(self, pid: int, index: int, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            session = str(row["session"])
            self._rows[session] = {**row, "worker": index}
            self._owner[session] = pid

    def remove(self, session: str) -> None:
        self._rows.pop(session, None)
        self._owner.pop(session, None)

    def drop_worker(self, pid: int) -> None:
        for session in [s for s, owner in self._owner.items() if owner == pid]:
            self.remove(session)

    def owner(self, session: str) -> int | None:
        return self._owner.get(session)

    def rows(self) -> list[dict[str, Any]]:
        return sorted(self._rows.values(), key=lambda row: float(row.get("started_at", 0)))
