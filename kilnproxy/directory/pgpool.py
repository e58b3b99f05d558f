"""A worker's few PostgreSQL connections for lookups, each lookup bounded by a deadline.

Owns at most `size` busy psycopg AsyncConnections, and as many lookups being given up
(autocommit: a lookup is one statement, one round trip, no BEGIN), and the rule that no lookup
outlives its timeout. Rules:

- A lookup gets its answer or DirectoryUnavailable within `timeout`, whatever the database
  does: refuses connections, never answers (a stopped server, a black-holed network), or errors.
  The statement runs in a task of its own; a caller that gives up leaves that task to be
  cancelled and its connection to be closed, and is not held up by psycopg's cancel handshake.
- A connection that failed is closed, never reused. A pooled connection the server closed while
  it sat idle (a restart, an idle timeout) costs one more try on a new one within the same
  deadline: when the database comes back, the next lookup works, with no restart and no
  health-check round trip before each lookup.
- A connection idle for more than IDLE_MAX is closed when it is next taken, not used: a firewall
  or NAT on the way may have dropped it without a word, and a lookup on it would hang until its
  deadline (the keepalives of `postgres.KEEPALIVES` find that out only after a minute).
- A connection is used for at most AGE_MAX, however busy: one that is never idle long would
  otherwise be kept for ever, on the server it first reached. After a failover that left the
  old server up (a DNS name moved, a partition), lookups would go on reading the old one while
  administrators write to the new one: a revoked key would keep working. A busy worker reaches
  the new one within AGE_MAX.
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
IDLE_MAX = 30.0  # seconds a pooled connection may sit idle and still be used
AGE_MAX = 300.0  # seconds a connection is used for, from its start


class LookupPool:
    def __init__(
        self, connect: Connect, size: int, timeout: float, describe: Callable[[BaseException], str]
    ) -> None:
        self._connect = connect
        self.size = size
        self.timeout = timeout
        self._describe = describe  # an error as one password-free line
        self._idle: list[tuple[psycopg.AsyncConnection[Any], float]] = []  # and since when
        self._born: dict[psycopg.AsyncConnection[Any], float] = {}  # every open one's start
        self._open = 0
        self._in_use = 0
        self._slots: asyncio.Semaphore | None = None  # made in the loop that uses it
        self._abandoned: set[asyncio.Task[Row | None]] = set()
        self._closed = False

    def usage(self) -> tuple[int, int, int]:
        return self.size, self._open, self._in_use

    async def one(self, statement: str, params: Params) -> Row | None:
        """Run one statement on one connection; its first row, or None.

        The slot is the caller's, not the task's: a lookup given up at its deadline frees its
        slot at once, while psycopg cancels the statement in the background (that can take
        seconds on a server that stopped answering). At most `size` lookups are being given
        up at a time: a new one waits, within its own deadline, for one of them to end.
        """
        if self._closed:
            raise DirectoryUnavailable("the directory handle is closed")
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.size)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        try:
            async with asyncio.timeout_at(deadline):
                while len(self._abandoned) >= self.size:
                    await asyncio.wait(self._abandoned, return_when=asyncio.FIRST_COMPLETED)
                await self._slots.acquire()
        except TimeoutError:
            raise DirectoryUnavailable(
                f"no answer within {format_duration(self.timeout)}"
            ) from None
        try:
            task = asyncio.ensure_future(self._one(statement, params))
            try:
                done, _ = await asyncio.wait((task,), timeout=max(0.0, deadline - loop.time()))
            except asyncio.CancelledError:
                self._abandon(task)
                raise
        finally:
            self._slots.release()
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
        try:
            conn = self._fresh_idle()
            if conn is not None:
                try:
                    return await self._run(conn, statement, params)
                except psycopg.OperationalError:
                    if not conn.broken:
                        raise
                    # The server closed it while it sat idle: one more try on a new one.
            return await self._run(await self._new_connection(), statement, params)
        except (psycopg.Error, OSError) as exc:
            raise DirectoryUnavailable(self._describe(exc)) from None

    def _fresh_idle(self) -> psycopg.AsyncConnection[Any] | None:
        """The connection idle the shortest time, if under IDLE_MAX; the older ones are closed
        (they are the first in the list: the newest idle is taken first)."""
        stale = asyncio.get_running_loop().time() - IDLE_MAX
        while self._idle and self._idle[0][1] < stale:
            self._discard(self._idle.pop(0)[0])
        return self._idle.pop()[0] if self._idle else None

    async def _new_connection(self) -> psycopg.AsyncConnection[Any]:
        conn = await self._connect()
        self._open += 1
        self._born[conn] = asyncio.get_running_loop().time()
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
            now = asyncio.get_running_loop().time()
            # Kept after an SQL error too (autocommit leaves it idle), never mid-statement.
            idle = conn.info.transaction_status == pq.TransactionStatus.IDLE
            young = now - self._born.get(conn, now) < AGE_MAX
            if idle and young and not conn.broken and not self._closed:
                self._idle.append((conn, now))
            else:
                self._discard(conn)

    def _discard(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self._open -= 1
        self._born.pop(conn, None)
        # PGconn.finish() is what AsyncConnection.close() does, without an await: usable from
        # close() too, which the worker calls from synchronous code.
        conn.pgconn.finish()

    def close(self) -> None:
        """Close every idle connection now; lookups still running fail and close theirs."""
        self._closed = True
        for task in list(self._abandoned):
            task.cancel()
        while self._idle:
            self._discard(self._idle.pop()[0])

    async def aclose(self) -> None:
        self.close()
        if self._abandoned:
            await asyncio.wait(list(self._abandoned), timeout=self.timeout)
