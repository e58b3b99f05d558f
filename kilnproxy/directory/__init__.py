"""The directory (SPEC 2): which user owns a key, what they may access, where repositories live.

`Directory` is what the SSH server needs; every store (SQLite now, PostgreSQL or the hosting
application's API later) provides it with the same schema. Lookups are async so that network
stores fit; a change made by the admin CLI is seen by the next lookup (no cache).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from kilnproxy.directory.model import Identity, Route
from kilnproxy.directory.sqlite import SqliteDirectory


class Directory(Protocol):
    async def identity_for_key(self, fingerprint: str) -> Identity | None: ...

    async def route(self, identity: Identity, repo: str) -> Route | None: ...

    def close(self) -> None: ...


def open_directory(url: str, home: Path) -> SqliteDirectory:
    """Open the store named by a validated `[directory] url`."""
    _, _, location = url.partition(":")
    return SqliteDirectory(Path(location), default_local_base=home / "repos")


__all__ = ["Directory", "Identity", "Route", "SqliteDirectory", "open_directory"]
