"""The embedded directory store: SQLite in WAL mode, so the CLI writes while workers read.

Owns the schema and every SQL statement. Never caches: each lookup reads the database, so a
change made with the CLI is seen by the next connection. Lookups are single indexed queries
(well under a millisecond), run inline on the event loop.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from kilnproxy.directory.model import (
    Identity,
    PublicKey,
    Route,
    check_name,
    default_repo_path,
    parse_backend_url,
)
from kilnproxy.errors import OperatorError
from kilnproxy.policy.access import Access, Role, effective_access
from kilnproxy.policy.commands import Vcs

SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE accounts (
    id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, created_at REAL NOT NULL);
CREATE TABLE users (
    id INTEGER PRIMARY KEY,
    account_id INTEGER NOT NULL REFERENCES accounts(id),
    name TEXT NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('read', 'write', 'admin')),
    created_at REAL NOT NULL,
    UNIQUE (account_id, name));
CREATE TABLE keys (
    fingerprint TEXT PRIMARY KEY,
    user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    algorithm TEXT NOT NULL,
    public_key TEXT NOT NULL,
    created_at REAL NOT NULL);
CREATE TABLE backends (name TEXT PRIMARY KEY, url TEXT NOT NULL, created_at REAL NOT NULL);
CREATE TABLE repos (
    id INTEGER PRIMARY KEY,
    account_id INTEGER NOT NULL REFERENCES accounts(id),
    name TEXT NOT NULL,
    vcs TEXT NOT NULL CHECK (vcs IN ('git', 'hg')),
    backend TEXT NOT NULL REFERENCES backends(name),
    path TEXT,
    created_at REAL NOT NULL,
    UNIQUE (account_id, name));
CREATE TABLE grants (
    user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    repo_id INTEGER NOT NULL REFERENCES repos(id) ON DELETE CASCADE,
    access TEXT NOT NULL CHECK (access IN ('read', 'write')),
    PRIMARY KEY (user_id, repo_id));
"""

_IDENTITY = """
SELECT a.name, u.name, u.role, k.name FROM keys k
JOIN users u ON u.id = k.user_id JOIN accounts a ON a.id = u.account_id
WHERE k.fingerprint = ?"""

_ROUTE = """
SELECT r.vcs, r.backend, b.url, r.path, (
    SELECT g.access FROM grants g JOIN users u ON u.id = g.user_id
    JOIN accounts ua ON ua.id = u.account_id
    WHERE g.repo_id = r.id AND ua.name = ? AND u.name = ?)
FROM repos r JOIN accounts a ON a.id = r.account_id JOIN backends b ON b.name = r.backend
WHERE a.name = ? AND r.name = ?"""


@dataclass(frozen=True)
class KeyRow:
    fingerprint: str
    account: str
    user: str
    name: str
    algorithm: str
    created_at: float


@dataclass(frozen=True)
class RepoRow:
    repo: str
    vcs: Vcs
    backend: str
    path: str


class SqliteDirectory:
    def __init__(self, path: Path, default_local_base: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(path, timeout=5.0, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._migrate(default_local_base)
        except sqlite3.Error as exc:
            raise OperatorError(f"cannot open directory {path}: {exc}") from None

    def close(self) -> None:
        self._db.close()

    def _migrate(self, default_local_base: Path) -> None:
        (version,) = self._db.execute("PRAGMA user_version").fetchone()
        if version == SCHEMA_VERSION:
            return
        self._db.execute("BEGIN IMMEDIATE")  # another process may be creating it right now
        try:
            (version,) = self._db.execute("PRAGMA user_version").fetchone()
            if version == 0:
                for statement in SCHEMA.split(";"):
                    if statement.strip():
                        self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                # SPEC 8: the embedded default has a backend `local` at $KILNPROXY_HOME/repos.
                self._db.execute(
                    "INSERT INTO backends (name, url, created_at) VALUES ('local', ?, ?)",
                    (f"local://{default_local_base.absolute()}", time.time()),
                )
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        if version not in (0, SCHEMA_VERSION):
            raise OperatorError(f"directory schema {version} is newer than this kilnproxy")

    # -- lookups for the SSH server ----------------------------------------------------------

    async def identity_for_key(self, fingerprint: str) -> Identity | None:
        row = self._db.execute(_IDENTITY, (fingerprint,)).fetchone()
        if row is None:
            return None
        account, user, role, key_name = row
        return Identity(account, user, Role(role), key_name, fingerprint)

    async def route(self, identity: Identity, repo: str) -> Route | None:
        account, _, name = repo.partition("/")
        row = self._db.execute(_ROUTE, (identity.account, identity.user, account, name)).fetchone()
        if row is None:
            return None
        vcs_text, backend, url, path, grant = row
        vcs = Vcs(vcs_text)
        grant_access = Access[grant.upper()] if grant else None
        access = effective_access(identity.account, identity.role, account, grant_access)
        if not path:
            path = default_repo_path(parse_backend_url(url).base, repo, vcs)
        return Route(repo, vcs, backend, url, path, access)

    # -- admin writes and listings -------------------------------------------------------------

    def _write(self, sql: str, args: tuple[object, ...], conflict: str) -> sqlite3.Cursor:
        try:
            return self._db.execute(sql, args)
        except sqlite3.IntegrityError:
            raise OperatorError(conflict) from None
        except sqlite3.Error as exc:
            raise OperatorError(f"directory error: {exc}") from None

    def _account_id(self, account: str) -> int:
        row = self._db.execute("SELECT id FROM accounts WHERE name = ?", (account,)).fetchone()
        if row is None:
            raise OperatorError(f"no account {account!r}")
        return int(row[0])

    def _user_id(self, account: str, user: str) -> int:
        row = self._db.execute(
            "SELECT u.id FROM users u JOIN accounts a ON a.id = u.account_id "
            "WHERE a.name = ? AND u.name = ?",
            (account, user),
        ).fetchone()
        if row is None:
            raise OperatorError(f"no user {account}/{user}")
        return int(row[0])

    def add_account(self, account: str) -> None:
        check_name("account", account)
        self._write(
            "INSERT INTO accounts (name, created_at) VALUES (?, ?)",
            (account, time.time()),
            f"account {account!r} already exists",
        )

    def add_user(self, account: str, user: str, role: Role) -> None:
        check_name("user", user)
        self._write(
            "INSERT INTO users (account_id, name, role, created_at) VALUES (?, ?, ?, ?)",
            (self._account_id(account), user, role.value, time.time()),
            f"user {account}/{user} already exists",
        )

    def add_key(self, account: str, user: str, name: str, key: PublicKey) -> None:
        if not name.strip() or len(name) > 200 or any(ord(c) < 32 for c in name):
            raise OperatorError("a key name is 1 to 200 printable characters")
        owner = self._key_owner(key.fingerprint)
        if owner:
            raise OperatorError(f"key {key.fingerprint} is already registered to {owner}")
        self._write(
            "INSERT INTO keys (fingerprint, user_id, name, algorithm, public_key, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (
                key.fingerprint,
                self._user_id(account, user),
                name,
                key.algorithm,
                key.openssh,
                time.time(),
            ),
            f"key {key.fingerprint} is already registered",
        )

    def _key_owner(self, fingerprint: str) -> str | None:
        row = self._db.execute(
            "SELECT a.name || '/' || u.name FROM keys k JOIN users u ON u.id = k.user_id "
            "JOIN accounts a ON a.id = u.account_id WHERE k.fingerprint = ?",
            (fingerprint,),
        ).fetchone()
        return str(row[0]) if row else None

    def remove_key(self, fingerprint: str) -> KeyRow:
        rows = [k for k in self.list_keys() if k.fingerprint == fingerprint]
        if not rows:
            raise OperatorError(f"no key {fingerprint}")
        self._write("DELETE FROM keys WHERE fingerprint = ?", (fingerprint,), "cannot remove")
        return rows[0]

    def list_keys(self, account: str | None = None, user: str | None = None) -> list[KeyRow]:
        sql = (
            "SELECT k.fingerprint, a.name, u.name, k.name, k.algorithm, k.created_at FROM keys k "
            "JOIN users u ON u.id = k.user_id JOIN accounts a ON a.id = u.account_id "
            "WHERE (?1 IS NULL OR a.name = ?1) AND (?2 IS NULL OR u.name = ?2) "
            "ORDER BY a.name, u.name, k.created_at"
        )
        return [KeyRow(*row) for row in self._db.execute(sql, (account, user))]

    def add_backend(self, name: str, url: str) -> None:
        check_name("backend", name)
        parse_backend_url(url)
        self._write(
            "INSERT INTO backends (name, url, created_at) VALUES (?, ?, ?)",
            (name, url, time.time()),
            f"backend {name!r} already exists",
        )

    def list_backends(self) -> list[tuple[str, str]]:
        return [(n, u) for n, u in self._db.execute("SELECT name, url FROM backends ORDER BY 1")]

    def backend_url(self, name: str) -> str:
        row = self._db.execute("SELECT url FROM backends WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise OperatorError(f"no backend {name!r}")
        return str(row[0])

    def add_repo(self, repo: str, vcs: Vcs, backend: str, path: str | None) -> RepoRow:
        account, _, name = repo.partition("/")
        url = self.backend_url(backend)
        if path is not None and not PurePosixPath(path).is_absolute():
            raise OperatorError(f"--path {path!r} must be absolute on the backend")
        self._write(
            "INSERT INTO repos (account_id, name, vcs, backend, path, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (self._account_id(account), name, vcs.value, backend, path, time.time()),
            f"repository {repo} already exists",
        )
        resolved = path or default_repo_path(parse_backend_url(url).base, repo, vcs)
        return RepoRow(repo, vcs, backend, resolved)

    def list_repos(self, account: str | None = None) -> list[RepoRow]:
        sql = (
            "SELECT a.name || '/' || r.name, r.vcs, r.backend, b.url, r.path FROM repos r "
            "JOIN accounts a ON a.id = r.account_id JOIN backends b ON b.name = r.backend "
            "WHERE (?1 IS NULL OR a.name = ?1) ORDER BY 1"
        )
        rows = []
        for repo, vcs, backend, url, path in self._db.execute(sql, (account,)):
            resolved = path or default_repo_path(parse_backend_url(url).base, repo, Vcs(vcs))
            rows.append(RepoRow(repo, Vcs(vcs), backend, resolved))
        return rows

    def grant(self, account: str, user: str, repo: str, access: Access) -> None:
        repo_account, _, name = repo.partition("/")
        row = self._db.execute(
            "SELECT r.id FROM repos r JOIN accounts a ON a.id = r.account_id "
            "WHERE a.name = ? AND r.name = ?",
            (repo_account, name),
        ).fetchone()
        if row is None:
            raise OperatorError(f"no repository {repo}")
        self._write(
            "INSERT INTO grants (user_id, repo_id, access) VALUES (?, ?, ?) "
            "ON CONFLICT (user_id, repo_id) DO UPDATE SET access = excluded.access",
            (self._user_id(account, user), row[0], access.label),
            "cannot grant",
        )
