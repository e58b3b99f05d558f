"""The directory's pure parts, and what only the embedded SQLite store has.

The behaviour both stores share is tested once for each in
tests/integration/test_directory_contract.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import sqlite3
import threading
from pathlib import Path

import pytest

from kilnproxy.config import from_mapping, scrub, url_secrets
from kilnproxy.directory import open_directory, sql, upgrade_schema
from kilnproxy.directory import schema as ladder
from kilnproxy.directory.health import Outage
from kilnproxy.directory.model import Identity
from kilnproxy.errors import DirectoryUnavailable, OperatorError
from kilnproxy.policy.access import Access, Role
from kilnproxy.policy.commands import Vcs

FIXTURES = Path(__file__).parent.parent / "fixtures"


# -- the schema ladder ---------------------------------------------------------------------------


def test_the_ladder_is_ordered_and_starts_at_the_pre_ladder_schema() -> None:
    versions = [m.version for m in ladder.MIGRATIONS]
    assert versions == list(range(1, len(versions) + 1))
    assert ladder.current_version() == versions[-1]
    for migration in ladder.MIGRATIONS:
        assert migration.sqlite and migration.postgres and migration.summary


def test_pending_migrations_and_the_one_line_for_a_mismatch() -> None:
    one = ladder.Migration(1, "a", ("x",), ("x",))
    two = ladder.Migration(2, "b", ("y",), ("y",))
    assert ladder.pending(0, (one, two)) == (one, two)
    assert ladder.pending(1, (one, two)) == (two,)
    assert ladder.pending(2, (one, two)) == ()
    with pytest.raises(OperatorError, match="version 3, newer than this kilnproxy"):
        ladder.pending(3, (one, two))
    assert ladder.mismatch(1, 2) == (
        "directory schema is version 1, this kilnproxy needs version 2: run `kilnproxy db upgrade`"
    )
    assert "\n" not in ladder.mismatch(3, 2)


# -- the shared SQL ------------------------------------------------------------------------------


def test_every_statement_has_a_psycopg_form_with_the_same_parameters() -> None:
    statements = [v for k, v in vars(sql).items() if k.isupper() and isinstance(v, str)]
    assert len(statements) >= 15
    for statement in statements:
        named = set(re.findall(r"(?<![:\w]):(\w+)", statement))
        converted = sql.to_pyformat(statement)
        assert set(re.findall(r"%\((\w+)\)s", converted)) == named
        assert not re.search(r"(?<![:\w]):\w", converted)
    assert sql.to_pyformat("a = :x AND b = :x") == "a = %(x)s AND b = %(x)s"
    with pytest.raises(ValueError, match="must not contain %"):
        sql.to_pyformat("a LIKE '%x'")


# -- passwords in URLs ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "secrets"),
    [
        ("postgresql://kiln:s3cret@db:5432/kiln", ["s3cret"]),
        ("postgres://kiln:p%40ss%2Fw@db/kiln", ["p%40ss%2Fw", "p@ss/w"]),
        ("postgresql://kiln@db/kiln?sslmode=require&password=qq", ["qq"]),
        ("postgresql://kiln:a@[::1/kiln", ["a"]),
        ("postgresql://kiln@db/kiln", []),
        ("postgresql:///kiln", []),
        ("sqlite:kilnproxy.db", []),
    ],
)
def test_url_secrets(url: str, secrets: list[str]) -> None:
    assert url_secrets(url) == secrets
    for secret in secrets:
        assert secret not in scrub(f"error near {url!r}", url)


def test_the_directory_settings() -> None:
    home = Path("/var/lib/kilnproxy")
    config = from_mapping({}, home)
    assert config.directory.url == "sqlite:/var/lib/kilnproxy/kilnproxy.db"
    assert config.directory.pool_size == 4
    url = "postgresql://kiln@db.internal:5432/kiln?sslmode=verify-full"
    config = from_mapping({"directory": {"url": url, "pool_size": 2}}, home)
    assert (config.directory.url, config.directory.pool_size) == (url, 2)
    for bad, message in [
        ("mysql://x", "is not a directory URL like sqlite:kilnproxy.db or postgresql://"),
        ("postgresql://kiln:hunter2@db/kiln extra", "'postgresql://kiln:***@db/kiln extra'"),
    ]:
        with pytest.raises(OperatorError, match=re.escape(message)) as caught:
            from_mapping({"directory": {"url": bad}}, home)
        assert "hunter2" not in str(caught.value)
    with pytest.raises(OperatorError, match="pool_size"):
        from_mapping({"directory": {"pool_size": 0}}, home)


# -- the outage log ------------------------------------------------------------------------------


def test_an_outage_is_logged_when_it_starts_every_interval_and_when_it_ends(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [100.0]
    outage = Outage("postgresql://db/kiln", interval=10, clock=lambda: now[0], wall=lambda: 5.0)
    caplog.set_level(logging.INFO, "kilnproxy.directory")
    for _ in range(50):  # a burst of refused lookups: one line
        outage.failed("connection refused")
        now[0] += 0.1
    assert outage.down_since == 5.0
    now[0] = 111.0
    outage.failed("connection refused")
    outage.failed("connection refused")
    now[0] = 115.0
    outage.succeeded()
    outage.succeeded()
    assert outage.down_since is None
    assert [r.getMessage() for r in caplog.records] == [
        "directory postgresql://db/kiln is unavailable: connection refused",
        "directory postgresql://db/kiln still unavailable after 11s, 51 lookups refused: "
        "connection refused",
        "directory postgresql://db/kiln is back after 15s, 52 lookups refused",
    ]


# -- SQLite only ---------------------------------------------------------------------------------


def load_v1(path: Path) -> None:
    """The database a pre-ladder kilnproxy left behind, with its data."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.executescript((FIXTURES / "directory-v1.sqlite.sql").read_text())
        db.execute("PRAGMA user_version = 1")


def test_a_database_made_before_the_ladder_keeps_working(tmp_path: Path) -> None:
    load_v1(tmp_path / "k.db")
    url = f"sqlite:{tmp_path / 'k.db'}"
    assert upgrade_schema(url, tmp_path)[1:] == ["directory schema is at version 1, nothing to do"]
    directory = open_directory(url, tmp_path)
    try:
        gavin = asyncio.run(directory.identity_for_key("SHA256:" + "2" * 43))
        assert gavin == Identity("hooli", "gavin", Role.ADMIN, "desk", "SHA256:" + "2" * 43)
        route = asyncio.run(directory.route(gavin, "aviato/website"))
        assert route is not None and route.access is Access.READ
        assert route.path == "/srv/kilnproxy/repos/aviato/website.git"
        directory.add_repo("hooli/api", Vcs.GIT, "local", None)
        assert [r.repo for r in directory.list_repos()] == [
            "aviato/designs", "aviato/website", "hooli/api",
        ]  # fmt: skip
    finally:
        directory.close()


def test_the_embedded_store_is_in_wal_mode(tmp_path: Path) -> None:
    """The CLI writes while workers read (SPEC 2)."""
    open_directory(f"sqlite:{tmp_path / 'k.db'}", tmp_path).close()
    with contextlib.closing(sqlite3.connect(tmp_path / "k.db")) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert db.execute("PRAGMA user_version").fetchone() == (ladder.current_version(),)


def test_lookups_fail_once_the_sqlite_file_is_replaced_or_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A backup restored with `mv` over the live file, or the file removed: a worker must not go
    on answering from the file it opened (the CLI writes the new one: a removed key would
    still log in), nor open the new one through the old one's WAL. It refuses, says so once,
    and answers again if the same file comes back."""
    monkeypatch.setattr("kilnproxy.directory.sqlite.FILE_CHECK", 0.0)
    load_v1(tmp_path / "k.db")
    url = f"sqlite:{tmp_path / 'k.db'}"
    upgrade_schema(url, tmp_path)
    directory = open_directory(url, tmp_path)
    gavin = "SHA256:" + "2" * 43
    try:
        assert asyncio.run(directory.identity_for_key(gavin)) is not None
        open_directory(f"sqlite:{tmp_path / 'restored.db'}", tmp_path).close()
        (tmp_path / "k.db").rename(tmp_path / "k.db.old")
        (tmp_path / "restored.db").rename(tmp_path / "k.db")
        with caplog.at_level(logging.WARNING, logger="kilnproxy.directory"):
            for _ in range(2):
                with pytest.raises(DirectoryUnavailable, match="was replaced or removed"):
                    asyncio.run(directory.identity_for_key(gavin))
            (tmp_path / "k.db").unlink()
            with pytest.raises(DirectoryUnavailable):
                asyncio.run(directory.identity_for_key(gavin))
            (tmp_path / "k.db.old").rename(tmp_path / "k.db")
            assert asyncio.run(directory.identity_for_key(gavin)) is not None
        assert [r.getMessage() for r in caplog.records if r.filename == "sqlite.py"] == [
            f"the directory file {tmp_path / 'k.db'} was replaced or removed while kilnproxy "
            "had it open; restart kilnproxy to read the file there now (`systemctl restart`)",
            f"the directory file {tmp_path / 'k.db'} is back",
        ]
    finally:
        directory.close()


def test_a_directory_opened_while_another_process_installs_it_waits_its_turn(
    tmp_path: Path,
) -> None:
    """Two hosts' first `db upgrade` at the same moment: one installs the schema (a write, in
    the file's first journal mode), and the other's switch to WAL meets it. SQLite refuses
    that switch at once, without its busy timeout: it is tried again until the writer is done."""
    path = tmp_path / "kilnproxy.db"
    writer = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    writer.execute("BEGIN IMMEDIATE")  # as an install holds it
    done = threading.Timer(0.3, writer.execute, ("COMMIT",))
    done.start()
    try:
        directory = open_directory(f"sqlite:{path}", tmp_path)
    finally:
        done.join()
        writer.close()
    try:
        assert directory.list_keys() == []  # open, and its schema installed
    finally:
        directory.close()
