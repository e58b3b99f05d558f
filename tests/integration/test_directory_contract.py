"""The directory's contract (SPEC 2), one suite run against both stores: SQLite and PostgreSQL.

Every test here takes `url` and runs once per store, so that no difference between them can
creep in: the same lookups, the same admin behaviour and messages, the same order of listings,
the same schema ladder. Tests of what only one store has (a server that stops) come after.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from kilnproxy.directory import (
    DirectoryStore,
    DirectoryUnavailable,
    check_schema,
    open_directory,
    upgrade_schema,
)
from kilnproxy.directory import schema as ladder
from kilnproxy.directory.model import Identity, PublicKey
from kilnproxy.errors import OperatorError
from kilnproxy.policy.access import Access, Role
from kilnproxy.policy.commands import Vcs


def key(n: int) -> PublicKey:
    return PublicKey("ssh-ed25519", f"SHA256:{n:043d}", f"ssh-ed25519 AAAA{n}")


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:{tmp_path / 'k.db'}"
    pg_url: str = request.getfixturevalue("pg_url")
    return pg_url


def raw(url: str, statement: str) -> None:
    """A statement run past the store, as a careless operator or a broken disk would."""
    if url.startswith("sqlite:"):
        with contextlib.closing(sqlite3.connect(url.removeprefix("sqlite:"))) as db:
            db.execute(statement)
            db.commit()
    else:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(statement.encode())


@pytest.fixture
def opened(url: str, tmp_path: Path) -> Iterator[list[DirectoryStore]]:
    """Every store a test opens, closed at its end."""
    stores: list[DirectoryStore] = []
    yield stores
    for store in stores:
        store.close()


def open_(opened: list[DirectoryStore], url: str, home: Path, **kw: float) -> DirectoryStore:
    store = open_directory(url, home, timeout=kw.get("timeout", 5.0))
    opened.append(store)
    return store


@pytest.fixture
def directory(url: str, tmp_path: Path, opened: list[DirectoryStore]) -> DirectoryStore:
    d = open_(opened, url, tmp_path)
    d.add_account("aviato")
    d.add_account("hooli")
    d.add_user("aviato", "alice", Role.WRITE)
    d.add_user("hooli", "gavin", Role.ADMIN)
    d.add_key("aviato", "alice", "laptop", key(1))
    d.add_key("hooli", "gavin", "desk", key(2))
    d.add_repo("aviato/website", Vcs.GIT, "local", None)
    d.add_repo("aviato/designs", Vcs.HG, "local", "/srv/hg/designs")
    return d


def identity(d: DirectoryStore, n: int) -> Identity:
    found = asyncio.run(d.identity_for_key(key(n).fingerprint))
    assert found is not None
    return found


def test_identity_and_routes(directory: DirectoryStore, tmp_path: Path) -> None:
    alice = identity(directory, 1)
    assert (alice.account, alice.user, alice.role, alice.key_name) == (
        "aviato", "alice", Role.WRITE, "laptop",
    )  # fmt: skip
    route = asyncio.run(directory.route(alice, "aviato/website"))
    assert route is not None
    assert route.path == str(tmp_path / "repos" / "aviato" / "website.git")
    assert (route.vcs, route.backend, route.access) == (Vcs.GIT, "local", Access.WRITE)
    hg = asyncio.run(directory.route(alice, "aviato/designs"))
    assert hg is not None and hg.path == "/srv/hg/designs"
    assert asyncio.run(directory.route(alice, "aviato/missing")) is None
    assert asyncio.run(directory.identity_for_key("SHA256:unknown")) is None
    stats = directory.statistics()
    assert (stats.lookups, stats.failures, stats.down_since) == (5, 0, None)


def test_grants_reach_across_accounts(directory: DirectoryStore) -> None:
    gavin = identity(directory, 2)
    route = asyncio.run(directory.route(gavin, "aviato/website"))
    assert route is not None and route.access is Access.NONE
    directory.grant("hooli", "gavin", "aviato/website", Access.READ)
    route = asyncio.run(directory.route(gavin, "aviato/website"))
    assert route is not None and route.access is Access.READ
    directory.grant("hooli", "gavin", "aviato/website", Access.WRITE)  # a grant is updated
    route = asyncio.run(directory.route(gavin, "aviato/website"))
    assert route is not None and route.access is Access.WRITE
    other = asyncio.run(directory.route(gavin, "aviato/designs"))
    assert other is not None and other.access is Access.NONE


def test_a_change_on_one_host_is_in_force_on_another_at_once(
    directory: DirectoryStore, url: str, tmp_path: Path, opened: list[DirectoryStore]
) -> None:
    """No cache: the next lookup through another handle (another host) sees each change."""
    other_host = open_(opened, url, tmp_path / "other-host")

    async def lookups() -> list[object]:
        bob = await other_host.identity_for_key(key(3).fingerprint)
        gavin = await other_host.identity_for_key(key(2).fingerprint)
        assert gavin is not None
        route = await other_host.route(gavin, "aviato/website")
        return [bob, route.access if route else None]

    assert asyncio.run(lookups()) == [None, Access.NONE]
    directory.add_user("aviato", "bob", Role.READ)
    directory.add_key("aviato", "bob", "phone", key(3))
    directory.grant("hooli", "gavin", "aviato/website", Access.WRITE)
    bob, access = asyncio.run(lookups())
    assert isinstance(bob, Identity) and bob.user == "bob" and access is Access.WRITE
    directory.remove_key(key(3).fingerprint)
    assert asyncio.run(lookups())[0] is None
    # A connection that logged in before its key was removed, and stays open (ssh's
    # ControlMaster): its next command is decided on the directory as it is now.
    assert asyncio.run(other_host.route(bob, "aviato/website")) is None
    gone = Identity("aviato", "alice", Role.WRITE, "laptop", key(9).fingerprint)
    assert asyncio.run(other_host.route(gone, "aviato/website")) is None


def test_conflicts_are_operator_errors(directory: DirectoryStore) -> None:
    cases: list[tuple[Callable[[], object], str]] = [
        (lambda: directory.add_account("aviato"), "account 'aviato' already exists"),
        (lambda: directory.add_user("aviato", "alice", Role.READ), "already exists"),
        (lambda: directory.add_key("hooli", "gavin", "copy", key(1)), "registered to aviato/alice"),
        (lambda: directory.add_repo("aviato/website", Vcs.HG, "local", None), "already exists"),
        (lambda: directory.grant("aviato", "nobody", "aviato/website", Access.READ), "no user"),
        (lambda: directory.add_repo("aviato/r", Vcs.GIT, "local", "rel/path"), "must be absolute"),
        (lambda: directory.add_repo("nope/r", Vcs.GIT, "local", None), "no account 'nope'"),
        (lambda: directory.add_backend("local", "local:///x"), "backend 'local' already exists"),
        (lambda: directory.remove_key("SHA256:none"), "no key SHA256:none"),
    ]
    for work, message in cases:
        with pytest.raises(OperatorError, match=message):
            work()


def test_listings_come_out_in_byte_order(directory: DirectoryStore) -> None:
    """SQLite sorts by bytes; PostgreSQL must too, whatever its locale (here ICU English)."""
    for account in ("Zeta", "a-b", "alpha"):
        directory.add_account(account)
        directory.add_user(account, "U", Role.READ)
        directory.add_user(account, "u", Role.READ)
        directory.add_repo(f"{account}/Web", Vcs.GIT, "local", None)
        directory.add_repo(f"{account}/web", Vcs.GIT, "local", None)
    directory.add_key("Zeta", "u", "k", key(10))
    directory.add_key("Zeta", "U", "k", key(11))
    directory.add_key("a-b", "u", "k", key(12))
    repos = [r.repo for r in directory.list_repos()]
    assert repos == [
        "Zeta/Web", "Zeta/web", "a-b/Web", "a-b/web", "alpha/Web", "alpha/web",
        "aviato/designs", "aviato/website",
    ]  # fmt: skip
    owners = [f"{k.account}/{k.user}" for k in directory.list_keys()]
    assert owners == ["Zeta/U", "Zeta/u", "a-b/u", "aviato/alice", "hooli/gavin"]
    assert [r.repo for r in directory.list_repos("a-b")] == ["a-b/Web", "a-b/web"]
    directory.add_backend("B", "local:///b")
    assert [name for name, _ in directory.list_backends()] == ["B", "local"]


def test_reopening_keeps_the_schema_and_the_first_seed(
    directory: DirectoryStore, url: str, tmp_path: Path, opened: list[DirectoryStore]
) -> None:
    again = open_(opened, url, tmp_path / "elsewhere")
    assert again.list_backends() == [("local", f"local://{tmp_path / 'repos'}")]
    assert len(again.list_keys()) == 2


def test_upgrade_is_idempotent_and_says_what_it_did(url: str, tmp_path: Path) -> None:
    top = ladder.current_version()
    first = upgrade_schema(url, tmp_path)
    assert first[0].startswith("directory ") and "applied migration 1: accounts" in first[1]
    assert first[-1] == f"directory schema upgraded from version 0 to {top}"
    assert upgrade_schema(url, tmp_path)[1:] == [
        f"directory schema is at version {top}, nothing to do"
    ]
    check_schema(url, tmp_path)  # serve's check passes


def test_a_newer_schema_is_refused(url: str, tmp_path: Path) -> None:
    """A rolled-back kilnproxy must not use a schema it does not know."""
    check_schema(url, tmp_path)
    newer = ladder.current_version() + 1
    if url.startswith("sqlite:"):
        raw(url, f"PRAGMA user_version = {newer}")
    else:
        raw(url, f"UPDATE schema_version SET version = {newer}")
    for work in (
        lambda: check_schema(url, tmp_path),
        lambda: open_directory(url, tmp_path).list_backends(),
        lambda: upgrade_schema(url, tmp_path),
    ):
        with pytest.raises(OperatorError) as refused:
            work()
        assert str(refused.value) == (
            f"directory schema is version {newer}, newer than this kilnproxy (version "
            f"{newer - 1}): run a kilnproxy that knows it, or restore the database"
        )


NEXT = ladder.Migration(
    ladder.current_version() + 1,
    "key comments",
    ("ALTER TABLE keys ADD COLUMN comment TEXT", "CREATE INDEX keys_user ON keys (user_id)"),
    ("ALTER TABLE keys ADD COLUMN comment TEXT", "CREATE INDEX keys_user ON keys (user_id)"),
)


def test_an_older_schema_is_refused_until_upgraded(
    directory: DirectoryStore, url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kilnproxy one migration ahead of the database: everything but `db upgrade` refuses
    with the one line naming it; the upgrade keeps the data."""
    directory.close()
    monkeypatch.setattr(ladder, "MIGRATIONS", (*ladder.MIGRATIONS, NEXT))
    old, new = NEXT.version - 1, NEXT.version
    message = (
        f"directory schema is version {old}, this kilnproxy needs version {new}: "
        "run `kilnproxy db upgrade`"
    )
    with pytest.raises(OperatorError, match=f"^{message}$".replace("(", r"\(")):
        check_schema(url, tmp_path)
    with pytest.raises(OperatorError, match="run `kilnproxy db upgrade`"):
        open_directory(url, tmp_path).list_keys()
    assert upgrade_schema(url, tmp_path)[1:] == [
        f"applied migration {new}: key comments",
        f"directory schema upgraded from version {old} to {new}",
    ]
    check_schema(url, tmp_path)
    again = open_directory(url, tmp_path)
    try:
        assert [k.name for k in again.list_keys()] == ["laptop", "desk"]
        raw(url, "UPDATE keys SET comment = 'the migration ran'")
    finally:
        again.close()


def test_a_broken_directory_raises_unavailable(directory: DirectoryStore, url: str) -> None:
    """A database that answers with an error is as unavailable as one that does not answer."""
    alice = identity(directory, 1)
    raw(url, "DROP TABLE grants")
    with pytest.raises(DirectoryUnavailable, match="grants") as caught:
        asyncio.run(directory.route(alice, "aviato/website"))
    assert caught.value.message == "service temporarily unavailable, try again later"
    assert directory.statistics().failures == 1
    assert directory.statistics().down_since is not None
    assert asyncio.run(directory.identity_for_key(key(1).fingerprint)) == alice
    assert directory.statistics().down_since is None


def test_the_schemas_of_both_stores_have_the_same_columns(tmp_path: Path, pg_url: str) -> None:
    """Migrations are written per store where SQL differs; their tables must not drift."""
    sqlite_url = f"sqlite:{tmp_path / 'k.db'}"
    check_schema(sqlite_url, tmp_path)
    check_schema(pg_url, tmp_path)
    with contextlib.closing(sqlite3.connect(tmp_path / "k.db")) as db:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        in_sqlite = {
            (table, row[1]) for table in tables for row in db.execute(f"PRAGMA table_info({table})")
        }
    with psycopg.connect(pg_url) as conn:
        rows = conn.execute(
            "SELECT table_name, column_name FROM information_schema.columns "
            "WHERE table_schema = 'public' AND table_name <> 'schema_version'"
        ).fetchall()
    assert in_sqlite == {(str(t), str(c)) for t, c in rows}
    assert len(in_sqlite) == 27
