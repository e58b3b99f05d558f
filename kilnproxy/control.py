"""The socketpair protocol between the master and a worker: small, typed, versioned.

One JSON object per line, `{"v": 1, "kind": ..., ...}`. Workers say READY once they serve,
HEARTBEAT every second with their statistics and the sessions that changed, DRAINING when they
start draining on their own (a TERM sent to them), SESSION_CLOSE when a session ends, and REPLY
to a REQUEST (a task dump, a heap profile). The master says DRAIN, STOP (fast), KILL_SESSION
and REQUEST. A line of another version or kind is an error
for the reader, never silently dropped. This module must never import asyncssh.
"""

from __future__ import annotations

import asyncio
import bisect
import enum
import json
import logging
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("kilnproxy.control")

VERSION = 1
MAX_LINE = 4 * 1024 * 1024
WORKER_BOOT_ERROR = (
    3  # exit status of a worker that cannot start: the master must not retry forever
)


# Seconds: from a sub-millisecond SQLite lookup to a slow backend handshake.
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass
class Histogram:
    counts: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))
    total: float = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.total += seconds

    def snapshot(self) -> dict[str, Any]:
        return {"counts": list(self.counts), "sum": self.total}


class Kind(enum.Enum):
    # worker -> master
    READY = "ready"
    HEARTBEAT = "heartbeat"
    DRAINING = "draining"
    SESSION_CLOSE = "session_close"
    REPLY = "reply"  # {"id": n, "data": ...} or {"id": n, "error": "..."}
    # master -> worker
    DRAIN = "drain"
    STOP = "stop"
    KILL_SESSION = "kill_session"
    REQUEST = "request"  # {"id": n, "what": "tasks" | "heap", ...}


@dataclass(frozen=True)
class Message:
    kind: Kind
    body: dict[str, Any] = field(default_factory=dict)

    def encode(self) -> bytes:
        return json.dumps({"v": VERSION, "kind": self.kind.value, **self.body}).encode() + b"\n"


def decode(line: bytes) -> Message:
    """Parse one line; raise ValueError if it is not a message of this version."""
    data = json.loads(line)
    if not isinstance(data, dict) or data.pop("v", None) != VERSION:
        raise ValueError(f"not a version {VERSION} control message: {line[:80]!r}")
    return Message(Kind(data.pop("kind")), data)


class Channel:
    """One end of the socketpair, as asyncio streams."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    @classmethod
    async def open(cls, sock: Any) -> Channel:
        reader, writer = await asyncio.open_unix_connection(sock=sock, limit=MAX_LINE)
        return cls(reader, writer)

    def send(self, message: Message) -> None:
        if not self._writer.is_closing():
            self._writer.write(message.encode())

    async def receive(self) -> Message | None:
        """The next message, or None when the other end has gone or broke the protocol."""
        try:
            line = await self._reader.readline()
            return decode(line) if line else None
        except (ConnectionError, asyncio.LimitOverrunError, ValueError) as exc:
            log.error("control channel broken: %s", exc)
            return None

    def close(self) -> None:
        self._writer.close()
