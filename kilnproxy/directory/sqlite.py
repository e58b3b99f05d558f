"""The embedded directory store: one SQLite file in WAL mode, so the CLI writes while workers read.

Owns the SQLite connection and how SQLite keeps the schema version (`PRAGMA user_version`, which
databases made before the ladder already carry) and its migration lock (`BEGIN IMMEDIATE`).
Never caches: each lookup reads the file, so a change made with the CLI is seen by the next
connection. Lookups are single indexed queries, well under a millisecond, run inline on the
event loop; a failing one raises DirectoryUnavailable like any store's.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kilnproxy.directory.schema import Dialect
from kilnproxy.directory.store import Conflict, DirectoryStore, Params, Row, seed_local_backend
from kilnproxy.errors import DirectoryUnavailable, OperatorError

BUSY_TIMEOUT = 5.0  # a writer holds the lock for milliseconds; a migration a little longer


def connect(path: Path) -> sqlite3.Connection:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(path, timeout=BUSY_TIMEOUT, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA foreign_keys=ON")
        db.execute("PRAGMA synchronous=NORMAL")
    except (OSError, sqlite3.Error) as exc:
        raise OperatorError(f"cannot open directory {path}: {exc}") from None
    return db


@contextmanager
def _operator_errors() -> Iterator[None]:
    """An admin-side failure of SQLite is one line for the operator."""
    try:
        yield
    except sqlite3.IntegrityError:
        raise Conflict() from None
    except sqlite3.Error as exc:
        raise OperatorError(f"directory error: {exc}") from None


class SqliteAdmin:
    """The connection as the store's AdminDb and the ladder's SchemaDb."""

    dialect = Dialect.SQLITE

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def one(self, statement: str, params: Params) -> Row | None:
        with _operator_errors():
            row: Row | None = self._db.execute(statement, params).fetchone()
        return row

    def all(self, statement: str, params: Params) -> list[Row]:
        with _operator_errors():
            return self._db.execute(statement, params).fetchall()

    def write(self, statement: str, params: Params) -> None:
        with _operator_errors():
            self._db.execute(statement, params)

    def close(self) -> None:
        self._db.close()

    # -- SchemaDb ------------------------------------------------------------------------------

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        # IMMEDIATE takes the write lock now, so that of two processes installing or upgrading
        # at once the second waits and then finds the work done. SQLite's DDL is transactional.
        with _operator_errors():
            self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        with _operator_errors():
            self._db.execute("COMMIT")

    def version(self) -> int:
        with _operator_errors():
            (version,) = self._db.execute("PRAGMA user_version").fetchone()
        return int(version)

    def set_version(self, version: int) -> None:
        with _operator_errors():
            self._db.execute(f"PRAGMA user_version = {int(version)}")

    def execute(self, sql: str, params: Params | None = None) -> None:
        with _operator_errors():
            self._db.execute(sql, params or {})


class SqliteLookups:
    """The same connection as the store's LookupDb: inline, so always one connection."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    async def one(self, statement: str, params: Params) -> Row | None:
        try:
            row: Row | None = self._db.execute(statement, params).fetchone()
        except sqlite3.Error as exc:
            raise DirectoryUnavailable(str(exc)) from None
        return row

    def usage(self) -> tuple[int, int, int]:
        return 1, 1, 0

    def close(self) -> None:
        pass  # the connection is the admin side's, closed there

    async def aclose(self) -> None:
        pass


class SqliteDirectory(DirectoryStore):
    """The store for `sqlite:PATH`. Opened with `prepare`, it installs the schema on an empty
    file and refuses a file of another version (SPEC 2); `kilnproxy db upgrade` opens it
    without, to climb the ladder."""

    def __init__(self, path: Path, default_local_base: Path, *, prepare: bool = True) -> None:
        self.path = path
        db = connect(path)
        admin = SqliteAdmin(db)
        seed = seed_local_backend(default_local_base)
        super().__init__("sqlite", str(path), lambda: admin, SqliteLookups(db), seed)
        if prepare:
            try:
                self.prepare()
            except BaseException:
                self.close()
                raise
