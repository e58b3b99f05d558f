"""The embedded directory store: one SQLite file in WAL mode, so the CLI writes while workers read.

Owns the SQLite connection and how SQLite keeps the schema version (`PRAGMA user_version`, which
databases made before the ladder already carry) and its migration lock (`BEGIN IMMEDIATE`).
Never caches: each lookup reads the file, so a change made with the CLI is seen by the next
connection. Lookups are single indexed queries, well under a millisecond, run inline on the
event loop; a failing one raises DirectoryUnavailable like any store's, and so does every one
once the file is no longer at its path (`SqliteLookups`).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kilnproxy.directory.schema import Dialect
from kilnproxy.directory.store import Conflict, DirectoryStore, Params, Row, seed_local_backend
from kilnproxy.errors import DirectoryUnavailable, OperatorError

log = logging.getLogger("kilnproxy.directory")
BUSY_TIMEOUT = 5.0  # a writer holds the lock for milliseconds; a migration a little longer
FILE_CHECK = 1.0  # seconds between two looks at whether the file is still the one open
MOVED = "was replaced or removed while kilnproxy had it open"


def connect(path: Path) -> sqlite3.Connection:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(path, timeout=BUSY_TIMEOUT, isolation_level=None)
        if _foreign(db):  # before anything is changed in it (the journal mode is the file's)
            db.close()
            raise OperatorError(
                f"{path} is another program's database, not a kilnproxy directory: it has "
                "tables, and no schema version of ours"
            )
        _into_wal(db)
        db.execute("PRAGMA foreign_keys=ON")
        db.execute("PRAGMA synchronous=NORMAL")
    except (OSError, sqlite3.Error) as exc:
        raise OperatorError(f"cannot open directory {path}: {exc}") from None
    return db


def _foreign(db: sqlite3.Connection) -> bool:
    """Tables, and user_version 0: not a directory, which has its version from its first table
    on (both are set in the transaction that installs the schema). Read in one statement, so
    from one snapshot: read one after the other, they could fall on both sides of another
    process's install, and find its tables without its version."""
    query = "SELECT user_version, EXISTS (SELECT 1 FROM sqlite_master) FROM pragma_user_version"
    version, tables = db.execute(query).fetchone()
    return bool(version == 0 and tables)


def _into_wal(db: sqlite3.Connection) -> None:
    """WAL mode, which the file keeps once it is set. Setting it takes the file's exclusive
    lock, and SQLite does not wait for that (its busy timeout does not apply) while another
    process writes, as a second host's first `db upgrade` at the same moment does: tried
    again, for as long as the busy timeout."""
    deadline = time.monotonic() + BUSY_TIMEOUT
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(0.01)


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


def _file_of(path: Path) -> tuple[int, int] | None:
    """Which file `path` names now (device, inode), or None if none."""
    try:
        found = os.stat(path)
    except FileNotFoundError:
        return None
    return found.st_dev, found.st_ino


class SqliteLookups:
    """The store's LookupDb: the admin side's connection, inline, while the file it opened is
    still the one at the path (looked at once every FILE_CHECK seconds).

    A file moved into its place (a backup restored with `mv`) or a file removed cannot be
    followed: SQLite would read the new file through the WAL and shared memory of the old one,
    which this process and every other still hold open, and the CLI writes where the workers no
    longer read. Lookups then fail (the clients are told the service is unavailable, and no
    access is decided on a file the directory is no longer in) until kilnproxy is restarted,
    with one log line saying so; they work again if the same file comes back."""

    def __init__(self, db: sqlite3.Connection, path: Path) -> None:
        self._db = db
        self._path = path
        self._file = _file_of(path)
        self._checked = time.monotonic()
        self._moved = False  # the path no longer names `_file`

    async def one(self, statement: str, params: Params) -> Row | None:
        self._check_the_file()
        if self._moved:
            raise DirectoryUnavailable(f"the directory file {self._path} {MOVED}")
        try:
            row: Row | None = self._db.execute(statement, params).fetchone()
        except sqlite3.Error as exc:
            raise DirectoryUnavailable(str(exc)) from None
        return row

    def _check_the_file(self) -> None:
        now = time.monotonic()
        if now - self._checked < FILE_CHECK:
            return
        self._checked = now
        try:
            moved = _file_of(self._path) != self._file
        except OSError as exc:  # a parent the worker can no longer enter, say
            raise DirectoryUnavailable(f"cannot look at {self._path}: {exc.strerror}") from None
        if moved and not self._moved:
            log.error("the directory file %s %s; restart kilnproxy to read the file there now "
                      "(`systemctl restart`)", self._path, MOVED)  # fmt: skip
        elif self._moved and not moved:
            log.warning("the directory file %s is back", self._path)
        self._moved = moved

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
        super().__init__("sqlite", str(path), lambda: admin, SqliteLookups(db, path), seed)
        if prepare:
            try:
                self.prepare()
            except BaseException:
                self.close()
                raise
