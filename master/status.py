"""The status socket's answers (SPEC 6): `kilnproxy status`, `connections` and `kill`.

Read from the status board; a kill goes through `actions.WorkerActions`. A request that cannot
be served raises a `StatusError`, which the status socket sends as its one-line error.
"""

from __future__ import annotations

import os
import time
from typing import Any

from kilnproxy.config import format_uptime
from kilnproxy.status_socket import Command, StatusRequest
from kilnproxy.version import build_info
from master.actions import WorkerActions
from master.board import StatusBoard, WorkerView, fast_path_summary


class StatusAnswers:
    def __init__(self, board: StatusBoard, actions: WorkerActions) -> None:
        self.board = board
        self.actions = actions

    async def answer(self, request: StatusRequest) -> dict[str, Any]:
        match request.command:
            case Command.STATUS:
                return self.status()
            case Command.CONNECTIONS:
                now = time.time()
                return {"connections": [row.as_json(now) for row in self.board.table.rows()]}
            case Command.KILL:
                self.actions.end_session(request.session)
                return {"killed": request.session}

    def status(self) -> dict[str, Any]:
        board = self.board
        workers = sorted(board.workers(), key=lambda w: w.index)
        admission = board.admission.statistics()
        return {
            "version": build_info().version,
            "started_at": board.started_at,
            "uptime": format_uptime(time.time() - board.started_at),
            "master_pid": os.getpid(),
            "generation": board.generation,
            "unauthenticated": admission.unauthenticated,
            "penalised_sources": admission.penalised,
            "fast_path": fast_path_summary(board.fast_path()),
            "workers": [self._worker(w, time.monotonic()) for w in workers],
        }

    def _worker(self, worker: WorkerView, now: float) -> dict[str, Any]:
        stats = self.board.stats(worker)
        return {
            "index": worker.index,
            "pid": worker.pid,
            "state": worker.state.value,
            "generation": worker.generation,
            "sessions": stats.sessions,
            "sessions_total": stats.sessions_total,
            "rss": stats.rss,
            "heap": stats.heap,
            "tasks": stats.tasks,
            "fds": stats.fds,
            "backend_connections": stats.backend_connections,
            "fast_path": stats.fast_path.value,
            "heartbeat_age": round(now - worker.last_heartbeat, 3),
        }
