"""The directory's behaviour, once for every store: admin writes and listings, and the lookups.

Owns everything a store must do the same way: validation, the messages an operator reads, what a
row means, outage logging and counting. A store (SQLite, PostgreSQL) lends two small things: a
synchronous `AdminDb` for the admin CLI and an async `LookupDb` for the SSH path. Rule: no SQL
text and no driver here, so that no difference between the stores can creep in; no cache, so
that a change is in force for the next lookup on every host.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from kilnproxy.directory import schema, sql
from kilnproxy.directory.health import Outage
from kilnproxy.directory.model import (
    DirectoryStats,
    Identity,
    PublicKey,
    Route,
    canonical_path,
    check_name,
    check_new_backend_url,
    check_repo_path,
    default_repo_path,
    parse_backend_url,
    paths_overlap,
    storage_of,
)
from kilnproxy.directory.schema import SchemaDb
from kilnproxy.errors import DirectoryUnavailable, OperatorError
from kilnproxy.policy.access import Access, Role, effective_access
from kilnproxy.policy.commands import Vcs

Row = tuple[Any, ...]
Params = Mapping[str, object]


class Conflict(Exception):
    """A write broke a uniqueness or reference rule; the store says which conflict it was."""


class AdminDb(SchemaDb, Protocol):
    """The admin CLI's side of a store: blocking, one statement at a time, autocommit; and
    the schema ladder's handle on the database."""

    def one(self, statement: str, params: Params) -> Row | None: ...

    def all(self, statement: str, params: Params) -> list[Row]: ...

    def write(self, statement: str, params: Params) -> None:
        """Raise Conflict on an integrity error, OperatorError on any other."""
        ...

    def close(self) -> None: ...


class LookupDb(Protocol):
    """The SSH path's side: one statement, one row, within the lookup timeout."""

    async def one(self, statement: str, params: Params) -> Row | None:
        """Raise DirectoryUnavailable (with a password-free detail) on any failure."""
        ...

    def usage(self) -> tuple[int, int, int]:
        """(connections allowed, connections open, connections running a lookup)."""
        ...

    def close(self) -> None: ...

    async def aclose(self) -> None: ...


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


def seed_local_backend(base: Path) -> Callable[[SchemaDb], None]:
    """What a new directory starts with (SPEC 8): a backend `local` at $KILNPROXY_HOME/repos."""

    def seed(db: SchemaDb) -> None:
        url = f"local://{base.absolute()}"
        db.execute(sql.ADD_BACKEND, {"name": "local", "url": url, "now": time.time()})

    return seed


class DirectoryStore:
    """One process's handle on the directory. `admin` is opened on first use, so that a worker,
    which only looks up, never opens the admin side."""

    def __init__(
        self,
        kind: str,
        where: str,
        admin: Callable[[], AdminDb],
        lookups: LookupDb,
        seed: Callable[[SchemaDb], None],
    ) -> None:
        self.kind = kind
        self.where = where  # printable: never holds a password
        self._seed = seed
        self._open_admin = admin
        self._admin: AdminDb | None = None
        self._lookups = lookups
        self._outage = Outage(where)
        self._lookup_count = 0
        self._failures = 0

    @property
    def db(self) -> AdminDb:
        if self._admin is None:
            self._admin = self._open_admin()
        return self._admin

    def prepare(self) -> None:
        """Install the schema on an empty database; refuse another version (one line)."""
        schema.prepare(self.db, self._seed)

    def upgrade(self) -> list[str]:
        """`kilnproxy db upgrade`; open the store with prepare=False to reach an old schema."""
        return schema.upgrade(self.db, self._seed)

    def close(self) -> None:
        self._lookups.close()
        if self._admin is not None:
            self._admin.close()

    async def aclose(self) -> None:
        await self._lookups.aclose()
        if self._admin is not None:
            self._admin.close()

    def statistics(self) -> DirectoryStats:
        size, connections, in_use = self._lookups.usage()
        return DirectoryStats(
            store=self.kind,
            pool_size=size,
            connections=connections,
            in_use=in_use,
            lookups=self._lookup_count,
            failures=self._failures,
            down_since=self._outage.down_since,
        )

    # -- lookups for the SSH server ----------------------------------------------------------

    async def _lookup(self, statement: str, params: Params) -> Row | None:
        self._lookup_count += 1
        try:
            row = await self._lookups.one(statement, params)
        except DirectoryUnavailable as exc:
            self._failures += 1
            self._outage.failed(exc.detail)
            raise
        self._outage.succeeded()
        return row

    async def identity_for_key(self, fingerprint: str) -> Identity | None:
        row = await self._lookup(sql.IDENTITY, {"fingerprint": fingerprint})
        if row is None:
            return None
        account, user, role, key_name = row
        return Identity(account, user, Role(role), key_name, fingerprint)

    async def route(self, identity: Identity, repo: str) -> Route | None:
        """Where `repo` lives and what `identity`'s key may do there now: None if no such
        repository, or if the key is gone (removed while its connection stays open: every
        command is decided on the directory as it is, not as it was at login)."""
        account, _, name = repo.partition("/")
        params = {"fingerprint": identity.fingerprint, "account": account, "name": name}
        row = await self._lookup(sql.ROUTE, params)
        if row is None or row[0] is None:
            return None
        vcs_text, backend, url, path, grant, user_account, role = row
        vcs = Vcs(vcs_text)
        grant_access = Access[grant.upper()] if grant else None
        access = effective_access(user_account, Role(role), account, grant_access)
        if not path:
            path = default_repo_path(parse_backend_url(url).base, repo, vcs)
        return Route(repo, vcs, backend, url, path, access)

    # -- admin writes and listings -------------------------------------------------------------

    def _write(self, statement: str, params: Params, conflict: str) -> None:
        try:
            self.db.write(statement, params)
        except Conflict:
            raise OperatorError(conflict) from None

    def _account_id(self, account: str) -> int:
        row = self.db.one(sql.ACCOUNT_ID, {"account": account})
        if row is None:
            raise OperatorError(f"no account {account!r}")
        return int(row[0])

    def _user_id(self, account: str, user: str) -> int:
        row = self.db.one(sql.USER_ID, {"account": account, "user": user})
        if row is None:
            raise OperatorError(f"no user {account}/{user}")
        return int(row[0])

    def add_account(self, account: str) -> None:
        check_name("account", account)
        self._write(
            sql.ADD_ACCOUNT,
            {"account": account, "now": time.time()},
            f"account {account!r} already exists",
        )

    def add_user(self, account: str, user: str, role: Role) -> None:
        check_name("user", user)
        params = {
            "account_id": self._account_id(account),
            "user": user,
            "role": role.value,
            "now": time.time(),
        }
        self._write(sql.ADD_USER, params, f"user {account}/{user} already exists")

    def add_key(self, account: str, user: str, name: str, key: PublicKey) -> None:
        if not name.strip() or len(name) > 200 or not name.isprintable():
            raise OperatorError("a key name is 1 to 200 printable characters")
        owner = self.db.one(sql.KEY_OWNER, {"fingerprint": key.fingerprint})
        if owner:
            raise OperatorError(f"key {key.fingerprint} is already registered to {owner[0]}")
        params = {
            "fingerprint": key.fingerprint,
            "user_id": self._user_id(account, user),
            "name": name,
            "algorithm": key.algorithm,
            "public_key": key.openssh,
            "now": time.time(),
        }
        self._write(sql.ADD_KEY, params, f"key {key.fingerprint} is already registered")

    def remove_key(self, fingerprint: str) -> KeyRow:
        rows = [k for k in self.list_keys() if k.fingerprint == fingerprint]
        if not rows:
            raise OperatorError(f"no key {fingerprint}")
        self._write(sql.REMOVE_KEY, {"fingerprint": fingerprint}, "cannot remove")
        return rows[0]

    def list_keys(self, account: str | None = None, user: str | None = None) -> list[KeyRow]:
        if account is not None and user is not None:  # a mistyped name is said, not listed
            self._user_id(account, user)  # as one with no keys
        elif account is not None:
            self._account_id(account)
        rows = self.db.all(sql.KEYS, {"account": account, "user": user})
        return [KeyRow(*row) for row in rows]

    def add_backend(self, name: str, url: str) -> None:
        check_name("backend", name)
        check_new_backend_url(url)
        self._write(
            sql.ADD_BACKEND,
            {"name": name, "url": url, "now": time.time()},
            f"backend {name!r} already exists",
        )

    def list_backends(self) -> list[tuple[str, str]]:
        return [(name, url) for name, url in self.db.all(sql.BACKENDS, {})]

    def backend_url(self, name: str) -> str:
        row = self.db.one(sql.BACKEND_URL, {"name": name})
        if row is None:
            raise OperatorError(f"no backend {name!r}")
        return str(row[0])

    def add_repo(self, repo: str, vcs: Vcs, backend: str, path: str | None) -> RepoRow:
        account, _, name = repo.partition("/")
        path = check_repo_path(path)
        params = {
            "account_id": self._account_id(account),
            "name": name,
            "vcs": vcs.value,
            "backend": backend,
            "path": path,
            "now": time.time(),
        }
        resolved = self.check_place(repo, vcs, backend, path)
        self._write(sql.ADD_REPO, params, f"repository {repo} already exists")
        return RepoRow(repo, vcs, backend, resolved)

    def check_place(self, repo: str, vcs: Vcs, backend: str, path: str | None) -> str:
        """Where `repo` would be on `backend` (`path`, or the backend's default): a place of its
        own, not another repository's (a grant on one would give the other's data), by
        whichever backend reaches that disk, nor inside or around one."""
        url = parse_backend_url(self.backend_url(backend))
        path = canonical_path(check_repo_path(path) or default_repo_path(url.base, repo, vcs))
        disk = storage_of(url)
        disks = {name: storage_of(parse_backend_url(u)) for name, u in self.list_backends()}
        for other in self.list_repos():
            there = canonical_path(other.path)
            if other.repo == repo or disks.get(other.backend) != disk:
                continue
            if there == path:
                raise OperatorError(f"{path} on {backend} is repository {other.repo}'s")
            if paths_overlap(there, path):
                where = f"{there} on {other.backend}"
                raise OperatorError(f"{path} on {backend} and repository {other.repo} ({where}) "
                                    "would lie one inside the other")  # fmt: skip
        return path

    def list_repos(self, account: str | None = None) -> list[RepoRow]:
        if account is not None:
            self._account_id(account)
        rows = []
        for repo, vcs, backend, url, path in self.db.all(sql.REPOS, {"account": account}):
            resolved = path or default_repo_path(parse_backend_url(url).base, repo, Vcs(vcs))
            rows.append(RepoRow(repo, Vcs(vcs), backend, resolved))
        return rows

    def grant(self, account: str, user: str, repo: str, access: Access) -> None:
        repo_account, _, name = repo.partition("/")
        row = self.db.one(sql.REPO_ID, {"account": repo_account, "name": name})
        if row is None:
            raise OperatorError(f"no repository {repo}")
        params = {
            "user_id": self._user_id(account, user),
            "repo_id": row[0],
            "access": access.label,
        }
        self._write(sql.GRANT, params, "cannot grant")
