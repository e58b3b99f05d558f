"""The directory (SPEC 2): which user owns a key, what they may access, where repositories live.

`Directory` is what the SSH server needs. Two stores provide it with one behaviour (`store`)
and one schema ladder (`schema`): SQLite, embedded (`sqlite:PATH`), and PostgreSQL, shared by
several proxy hosts (`postgresql://...`). Lookups are async and never cached: a change made by
the admin CLI on any host is seen by the next lookup on every host. A lookup that gets no
answer within its timeout raises DirectoryUnavailable; it never hangs.

This package must never import asyncssh or the worker; psycopg is imported only when a
PostgreSQL URL is opened.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from kilnproxy.config import Config
from kilnproxy.directory.model import (
    DirectoryStats,
    DirectoryUnreachable,
    Identity,
    Route,
)
from kilnproxy.directory.sqlite import SqliteDirectory
from kilnproxy.directory.store import DirectoryStore
from kilnproxy.errors import DirectoryUnavailable

DEFAULT_TIMEOUT = 10.0  # [timeouts] dial's default
DEFAULT_POOL_SIZE = 4  # [directory] pool_size's default


class Directory(Protocol):
    async def identity_for_key(self, fingerprint: str) -> Identity | None: ...

    async def route(self, identity: Identity, repo: str) -> Route | None: ...

    def close(self) -> None: ...


def is_postgres(url: str) -> bool:
    return url.startswith(("postgresql://", "postgres://"))


def open_directory(
    url: str,
    home: Path,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    pool_size: int = DEFAULT_POOL_SIZE,
    prepare: bool = True,
) -> DirectoryStore:
    """Open the store named by a validated `[directory] url`.

    `timeout` bounds every lookup (pass `[timeouts] dial`); `pool_size` caps a PostgreSQL
    store's lookup connections. With `prepare`, the schema is installed on an empty database
    and any other version is refused, when the admin side is first used (at once for SQLite).
    """
    if is_postgres(url):
        from kilnproxy.directory.postgres import PostgresDirectory

        return PostgresDirectory(
            url, home / "repos", timeout=timeout, pool_size=pool_size, prepare=prepare
        )
    _, _, location = url.partition(":")
    return SqliteDirectory(Path(location), home / "repos", prepare=prepare)


def directory_for(config: Config, *, prepare: bool = True) -> DirectoryStore:
    """`open_directory` with the configured URL, lookup timeout (`[timeouts] dial`) and pool."""
    return open_directory(
        config.directory.url,
        config.home,
        timeout=config.timeouts.dial,
        pool_size=config.directory.pool_size,
        prepare=prepare,
    )


def check_schema(url: str, home: Path, timeout: float = DEFAULT_TIMEOUT) -> None:
    """For `serve`, before the master starts: the schema must be the one this kilnproxy
    speaks. An empty database gets it; any other version raises OperatorError with one line
    naming `kilnproxy db upgrade`. A database that cannot be reached raises
    DirectoryUnreachable (an OperatorError), which `serve` may choose to outlive."""
    directory = open_directory(url, home, timeout=timeout, pool_size=1, prepare=False)
    try:
        directory.prepare()
    finally:
        directory.close()


def upgrade_schema(url: str, home: Path, timeout: float = DEFAULT_TIMEOUT) -> list[str]:
    """`kilnproxy db upgrade`: bring the schema to this kilnproxy's version; say what was done."""
    directory = open_directory(url, home, timeout=timeout, pool_size=1, prepare=False)
    try:
        return [f"directory {directory.where}", *directory.upgrade()]
    finally:
        directory.close()


__all__ = [
    "Directory",
    "DirectoryStats",
    "DirectoryStore",
    "DirectoryUnavailable",
    "DirectoryUnreachable",
    "Identity",
    "Route",
    "SqliteDirectory",
    "check_schema",
    "directory_for",
    "is_postgres",
    "open_directory",
    "upgrade_schema",
]
