from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from kilnproxy.directory import SqliteDirectory, open_directory
from kilnproxy.directory.model import Identity, PublicKey
from kilnproxy.errors import OperatorError
from kilnproxy.policy.access import Access, Role
from kilnproxy.policy.commands import Vcs


def key(n: int) -> PublicKey:
    return PublicKey("ssh-ed25519", f"SHA256:{n:043d}", f"ssh-ed25519 AAAA{n}")


@pytest.fixture
def directory(tmp_path: Path) -> SqliteDirectory:
    d = open_directory(f"sqlite:{tmp_path / 'k.db'}", tmp_path)
    d.add_account("aviato")
    d.add_account("hooli")
    d.add_user("aviato", "alice", Role.WRITE)
    d.add_user("hooli", "gavin", Role.ADMIN)
    d.add_key("aviato", "alice", "laptop", key(1))
    d.add_key("hooli", "gavin", "desk", key(2))
    d.add_repo("aviato/website", Vcs.GIT, "local", None)
    d.add_repo("aviato/designs", Vcs.HG, "local", "/srv/hg/designs")
    return d


def identity(d: SqliteDirectory, n: int) -> Identity:
    found = asyncio.run(d.identity_for_key(key(n).fingerprint))
    assert found is not None
    return found


def test_identity_and_routes(directory: SqliteDirectory, tmp_path: Path) -> None:
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


def test_grants_reach_across_accounts(directory: SqliteDirectory) -> None:
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


def test_a_writer_is_seen_by_a_reader_at_once(directory: SqliteDirectory, tmp_path: Path) -> None:
    reader = open_directory(f"sqlite:{tmp_path / 'k.db'}", tmp_path)
    assert asyncio.run(reader.identity_for_key(key(3).fingerprint)) is None
    directory.add_user("aviato", "bob", Role.READ)
    directory.add_key("aviato", "bob", "phone", key(3))
    assert asyncio.run(reader.identity_for_key(key(3).fingerprint)) is not None
    directory.remove_key(key(3).fingerprint)
    assert asyncio.run(reader.identity_for_key(key(3).fingerprint)) is None
    mode = sqlite3.connect(tmp_path / "k.db").execute("PRAGMA journal_mode").fetchone()
    assert mode == ("wal",)


def test_conflicts_are_operator_errors(directory: SqliteDirectory) -> None:
    with pytest.raises(OperatorError, match="already exists"):
        directory.add_account("aviato")
    with pytest.raises(OperatorError, match="already exists"):
        directory.add_user("aviato", "alice", Role.READ)
    with pytest.raises(OperatorError, match="already registered to aviato/alice"):
        directory.add_key("hooli", "gavin", "copy", key(1))
    with pytest.raises(OperatorError, match="already exists"):
        directory.add_repo("aviato/website", Vcs.HG, "local", None)
    with pytest.raises(OperatorError, match="no user"):
        directory.grant("aviato", "nobody", "aviato/website", Access.READ)
    with pytest.raises(OperatorError, match="must be absolute"):
        directory.add_repo("aviato/rel", Vcs.GIT, "local", "relative/path")


def test_reopening_keeps_the_schema(directory: SqliteDirectory, tmp_path: Path) -> None:
    again = SqliteDirectory(tmp_path / "k.db", tmp_path / "elsewhere")
    assert [name for name, _ in again.list_backends()] == ["local"]
    assert len(again.list_keys()) == 2
