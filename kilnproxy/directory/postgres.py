"""The shared directory store: one PostgreSQL database for several proxy hosts (SPEC 2).

Owns the psycopg connections: one blocking connection for the admin CLI (opened on first use),
and the lookup pool of each worker (`pgpool`). The URL is libpq's: libpq parses it and applies
`?sslmode=`, the PG* environment variables and ~/.pgpass itself, so their meaning is libpq's
own. Owns too how PostgreSQL keeps the schema version (the `schema_version` table) and its
migration lock (a transaction-scoped advisory lock, so two hosts upgrading at once take turns).

Rules: a password never leaves this module in a message (every error goes through `scrub`),
and the SQL is the shared text of `sql`, the same as SQLite's.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
from psycopg import conninfo as libpq

from kilnproxy.config import scrub
from kilnproxy.directory import schema
from kilnproxy.directory.model import DirectoryUnreachable
from kilnproxy.directory.pgpool import LookupPool
from kilnproxy.directory.schema import Dialect
from kilnproxy.directory.sql import to_pyformat
from kilnproxy.directory.store import Conflict, DirectoryStore, Params, Row, seed_local_backend
from kilnproxy.errors import OperatorError

# pg_advisory_xact_lock's key for schema changes: "kiln" in ASCII. Any fixed number would do;
# it only has to be the same on every host.
SCHEMA_LOCK = 0x6B696C6E


def describe(exc: BaseException, url: str) -> str:
    """A driver error as one line without the password (libpq may quote the URL back)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return scrub(" ".join(lines) or type(exc).__name__, url)


# SQLSTATE classes of a server going or gone, not of a statement: a connection lost or refused
# (08), the server shutting down or starting, or the database dropped (57P), out of
# connections or memory (53). `serve` starts in spite of them, as of a database it cannot reach.
OUTAGES = ("08", "57P", "53")


# TCP keepalives where the URL sets none: a pooled connection that a firewall or NAT dropped
# while it sat idle is found (and an idle one kept alive through them) instead of hanging the
# next lookup on it until its deadline.
KEEPALIVES = {"keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10,
              "keepalives_count": 3}  # fmt: skip


def connection_string(url: str, timeout: float) -> str:
    """The URL as libpq reads it, plus our defaults where neither it nor PG* sets them: a
    connect timeout (the lookup timeout, shared among the addresses tried), TCP
    keepalives and an application name for pg_stat_activity; and text always as UTF-8."""
    try:
        given = libpq.conninfo_to_dict(url)
    except psycopg.Error as exc:
        raise OperatorError(f"[directory] url: {describe(exc, url)}") from None
    extra: dict[str, Any] = {k: v for k, v in KEEPALIVES.items() if k not in given}
    if our_connect_timeout(given):
        extra["connect_timeout"] = connect_timeout(timeout, 1)
    if "application_name" not in given and "PGAPPNAME" not in os.environ:
        extra["application_name"] = "kilnproxy"
    # psycopg gives bytes for text from a SQL_ASCII database (initdb's default under the C
    # locale, which createdb copies): asked for UTF-8, the server sends names as they were
    # written, and psycopg reads them as text.
    extra["client_encoding"] = "UTF8"
    return libpq.make_conninfo(url, **extra)


def our_connect_timeout(given: dict[str, Any]) -> bool:
    """Neither the URL nor PGCONNECT_TIMEOUT sets a connect timeout: it is ours to set."""
    return "connect_timeout" not in given and "PGCONNECT_TIMEOUT" not in os.environ


def connect_timeout(timeout: float, attempts: int) -> int:
    """Each attempt's share of `timeout`, in libpq's whole seconds (2 at least, its floor)."""
    return max(2, math.ceil(timeout / attempts))


class PostgresAdmin:
    """A blocking autocommit connection as the store's AdminDb and the ladder's SchemaDb."""

    dialect = Dialect.POSTGRES

    def __init__(self, conn: psycopg.Connection[Any], url: str) -> None:
        self._conn = conn
        self._url = url

    @contextmanager
    def _operator_errors(self) -> Iterator[None]:
        try:
            yield
        except psycopg.errors.IntegrityError:
            raise Conflict() from None
        except psycopg.Error as exc:
            detail = describe(exc, self._url)
            if self._conn.broken or (exc.sqlstate or "").startswith(OUTAGES):
                raise DirectoryUnreachable(f"directory error: {detail}") from None
            raise OperatorError(f"directory error: {detail}") from None

    def one(self, statement: str, params: Params) -> Row | None:
        with self._operator_errors():
            return self._conn.execute(to_pyformat(statement), params).fetchone()

    def all(self, statement: str, params: Params) -> list[Row]:
        with self._operator_errors():
            return self._conn.execute(to_pyformat(statement), params).fetchall()

    def write(self, statement: str, params: Params) -> None:
        with self._operator_errors():
            self._conn.execute(to_pyformat(statement), params)

    def close(self) -> None:
        self._conn.close()

    # -- SchemaDb ------------------------------------------------------------------------------

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        # PostgreSQL's DDL is transactional: a failed migration leaves nothing half done. The
        # advisory lock is released with the transaction, so a crash cannot leave it held.
        with self._operator_errors(), self._conn.transaction():
            self._conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
            yield

    def version(self) -> int:
        with self._operator_errors():
            found = self._conn.execute("SELECT to_regclass('schema_version')").fetchone()
            if found is None or found[0] is None:
                return 0
            row = self._conn.execute("SELECT version FROM schema_version").fetchone()
        if row is None:
            raise OperatorError("directory error: schema_version has no row")
        return int(row[0])

    def set_version(self, version: int) -> None:
        with self._operator_errors():
            self._conn.execute(
                "UPDATE schema_version SET version = %s, upgraded_at = %s", (version, time.time())
            )

    def execute(self, sql: str, params: Params | None = None) -> None:
        with self._operator_errors():
            if params is None:
                self._conn.execute(sql)  # DDL: without parameters psycopg parses no %
            else:
                self._conn.execute(to_pyformat(sql), params)


class PostgresDirectory(DirectoryStore):
    """The store for `postgresql://...`. Nothing connects until it is used: a worker opens
    lookup connections on its first lookup, the admin CLI its one connection on its first
    command, and then (with `prepare`) installs the schema on an empty database or refuses
    one of another version, as the SQLite store does."""

    def __init__(
        self,
        url: str,
        default_local_base: Path,
        *,
        timeout: float,
        pool_size: int,
        prepare: bool = True,
    ) -> None:
        self._url = url
        self._conninfo = connection_string(url, timeout)
        self._timeout = timeout
        self._timeout_ours = our_connect_timeout(libpq.conninfo_to_dict(url))
        self._prepare = prepare
        lookups = LookupPool(self._connect_lookups, pool_size, timeout, self._describe)
        seed = seed_local_backend(default_local_base)
        super().__init__("postgresql", scrub(url, url), self._connect_admin, lookups, seed)

    def _describe(self, exc: BaseException) -> str:
        return describe(exc, self._url)

    def _sharing(self, attempts: int) -> str:
        """The connection string with our connect timeout shared among psycopg's `attempts`
        (one per address of each host). psycopg gives each attempt the whole of it, in turn:
        were it the lookup's, a first host that answers nothing (the old primary, powered off)
        would use all of it, and no lookup would ever reach the next one."""
        if attempts < 2:
            return self._conninfo
        share = connect_timeout(self._timeout, attempts)
        return libpq.make_conninfo(self._conninfo, connect_timeout=share)

    async def _connect_lookups(self) -> psycopg.AsyncConnection[Any]:
        conninfo = self._conninfo
        if self._timeout_ours:
            params = libpq.conninfo_to_dict(conninfo)
            conninfo = self._sharing(len(await libpq.conninfo_attempts_async(params)))
        # prepare_threshold=None: never a named prepared statement, so that a lookup is always
        # one round trip and the store works behind PgBouncer's transaction pooling too.
        return await psycopg.AsyncConnection.connect(
            conninfo, autocommit=True, prepare_threshold=None
        )

    def _connect_admin(self) -> PostgresAdmin:
        try:
            conninfo = self._conninfo
            if self._timeout_ours:
                params = libpq.conninfo_to_dict(conninfo)
                conninfo = self._sharing(len(libpq.conninfo_attempts(params)))
            conn = psycopg.Connection.connect(conninfo, autocommit=True)
        except psycopg.Error as exc:
            detail = self._describe(exc)
            raise DirectoryUnreachable(f"cannot reach directory {self.where}: {detail}") from None
        admin = PostgresAdmin(conn, self._url)
        if self._prepare:
            try:
                schema.prepare(admin, self._seed)
            except BaseException:
                admin.close()
                raise
        return admin
