"""A worker's few PostgreSQL connections for lookups, each lookup bounded by a deadline.

Owns at most `size` psycopg AsyncConnections (autocommit: a lookup is one statement, one round
trip, no BEGIN) and the rule that no lookup outlives its timeout. Rules:

- A lookup gets its answer or DirectoryUnavailable within `timeout`, whatever the database
  does: refuses connections, never answers (a stopped server, a black-holed network), or errors.
  The statement runs in a task of its own; a caller that gives up leaves that task to be
  cancelled and its connection to be closed, and is not held up by psycopg's cancel handshake.
- A connection that failed is closed, never reused. A pooled connection the server closed while
  it sat idle (a restart, an idle timeout) costs one more try on a new one within the same
  deadline: when the database comes back, the next lookup works, with no restart and no
  health-check round trip before each lookup.
- No background task: a connection is opened when a lookup needs one, so an outage costs a
  connection attempt per lookup (refused at once, or cut by the deadline), and a directory that
  comes back is used at once.

Why not psycopg_pool: its waiting clients learn only "no connection after N seconds", never the
reason (refused, bad password), and its reconnection backoff and maintenance tasks serve
long-lived pools better than lookups that each carry their own deadline.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
from psycopg import pq

from kilnproxy.config import format_duration
from kilnproxy.directory.sql import to_pyformat
from kilnproxy.directory.store import Params, Row
from kilnproxy.errors import DirectoryUnavailable

Connect = Callable[[], Awaitable[psycopg.AsyncConnection[Any]]]


class LookupPool:
    def __init__(
        self, connect: Connect, size: int, timeout: float, describe: Callable[[BaseException], str]
    ) -> None:
        self._connect = connect
        self.size = size
        self.timeout = timeout
        self._describe = describe  # an error as one password-free line
        self._idle: list[psycopg.AsyncConnection[Any]] = []
        self._open = 0
        self._in_use = 0
        self._slots: asyncio.Semaphore | None = None  # made in the loop that uses it
        self._abandoned: set[asyncio.Task[Row | None]] = set()
        self._closed = False

    def usage(self) -> tuple[int, int, int]:
        return self.size, self._open, self._in_use

    async def one(self, statement: str, params: Params) -> Row | None:
        """Run one statement on one connection; its first row, or None."""
        if self._closed:
            raise DirectoryUnavailable("the directory handle is closed")
        task = asyncio.ensure_future(self._one(statement, params))
        try:
            done, _ = await asyncio.wait((task,), timeout=self.timeout)
        except asyncio.CancelledError:
            self._abandon(task)
            raise
        if not done:
            self._abandon(task)
            raise DirectoryUnavailable(f"no answer within {format_duration(self.timeout)}")
        return task.result()

    def _abandon(self, task: asyncio.Task[Row | None]) -> None:
        task.cancel()
        self._abandoned.add(task)
        task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task[Row | None]) -> None:
        self._abandoned.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: a lookup nobody waits for is no loop error

    async def _one(self, statement: str, params: Params) -> Row | None:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.size)
        async with self._slots:
            try:
                if self._idle:
                    conn = self._idle.pop()
                    try:
                        return await self._run(conn, statement, params)
                    except psycopg.OperationalError:
                        if not conn.broken:
                            raise
                        # The server closed it while it sat idle: one more try on a new one.
                return await self._run(await self._new_connection(), statement, params)
            except (psycopg.Error, OSError) as exc:
                raise DirectoryUnavailable(self._describe(exc)) from None

    async def _new_connection(self) -> psycopg.AsyncConnection[Any]:
        conn = await self._connect()
        self._open += 1
        return conn

    async def _run(
        self, conn: psycopg.AsyncConnection[Any], statement: str, params: Params
    ) -> Row | None:
        self._in_use += 1
        try:
            cursor = await conn.execute(to_pyformat(statement), params, prepare=False)
            return await cursor.fetchone()
        finally:
            self._in_use -= 1
            # Kept after an SQL error too (autocommit leaves it idle), never mid-statement.
            idle = conn.info.transaction_status == pq.TransactionStatus.IDLE
            if idle and not conn.broken and not self._closed:
                self._idle.append(conn)
            else:
                self._discard(conn)

    def _discard(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self._open -= 1
        # PGconn.finish() is what AsyncConnection.close() does, without an await: usable from
        # close() too, which the worker calls from synchronous code.
        conn.pgconn.finish()

    def close(self) -> None:
        """Close every idle connection now; lookups still running fail and close theirs."""
        self._closed = True
        for task in list(self._abandoned):
            task.cancel()
        while self._idle:
            self._discard(self._idle.pop())

    async def aclose(self) -> None:
        self.close()
        if self._abandoned:
            await asyncio.wait(list(self._abandoned), timeout=self.timeout)
