"""`kilnproxy db upgrade`, and `serve` refusing a schema it does not speak (SPEC 2), run as an
operator runs them, against both stores."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import time
from pathlib import Path

import psycopg
import pytest
from harness import KILNPROXY, run
from postgres import Cluster

from kilnproxy.cli.main import _within, main
from kilnproxy.config import from_mapping
from kilnproxy.directory import DirectoryUnreachable, check_schema
from kilnproxy.directory import schema as ladder


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:{tmp_path / 'var' / 'kilnproxy.db'}"
    pg_url: str = request.getfixturevalue("pg_url")
    return pg_url


@pytest.fixture
def home(tmp_path: Path, url: str) -> Path:
    home = tmp_path / "var"
    home.mkdir()
    (home / "kilnproxy.toml").write_text(f'[directory]\nurl = "{url}"\n')
    return home


def env_for(home: Path) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("KILNPROXY_")}
    return base | {"KILNPROXY_HOME": str(home), "HOME": str(home)}


def kp(home: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    return run([*KILNPROXY, *args], env=env_for(home), check=False, timeout=30)


def set_version(url: str, version: int) -> None:
    if url.startswith("sqlite:"):
        with contextlib.closing(sqlite3.connect(url.removeprefix("sqlite:"))) as db:
            db.execute(f"PRAGMA user_version = {version}")
    else:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("UPDATE schema_version SET version = %s", (version,))


def test_db_upgrade_installs_then_has_nothing_to_do(home: Path, url: str) -> None:
    first = kp(home, "db", "upgrade")
    assert first.returncode == 0, first.stderr
    lines = first.stdout.decode().splitlines()
    assert lines[0].startswith("directory ") and lines[1].startswith("applied migration 1: ")
    assert lines[-1] == "directory schema upgraded from version 0 to 1"
    again = kp(home, "db", "upgrade")
    assert again.stdout.decode().splitlines()[1:] == [
        "directory schema is at version 1, nothing to do"
    ]
    assert kp(home, "backends", "list").stdout.decode().startswith(f"local  local://{home}")


def test_hosts_upgrading_at_once_take_turns(home: Path) -> None:
    """Four hosts run `db upgrade` on an empty directory at the same moment: one installs,
    the others wait for its lock and find nothing to do."""
    argv, env, pipe = [*KILNPROXY, "db", "upgrade"], env_for(home), subprocess.PIPE
    procs = [subprocess.Popen(argv, env=env, stdout=pipe, stderr=pipe) for _ in range(4)]
    outputs = [proc.communicate(timeout=60) for proc in procs]
    assert [proc.returncode for proc in procs] == [0] * 4, outputs
    installed = [out for out, _ in outputs if b"applied migration 1" in out]
    idle = [out for out, _ in outputs if b"nothing to do" in out]
    assert (len(installed), len(idle)) == (1, 3), outputs
    listing = kp(home, "backends", "list").stdout.decode().splitlines()
    assert len(listing) == 1  # the seed too was made once


def test_serve_refuses_a_newer_schema_in_one_line(home: Path, url: str) -> None:
    assert kp(home, "db", "upgrade").returncode == 0
    set_version(url, ladder.current_version() + 1)
    done = kp(home, "serve")
    assert done.returncode == 2
    assert done.stderr.decode().splitlines() == [
        "kilnproxy: error: directory schema is version 2, newer than this kilnproxy "
        "(version 1): run a kilnproxy that knows it, or restore the database"
    ]
    assert not (home / "ssh_host_ed25519_key").exists()  # it stopped before doing anything


def test_serve_and_admin_commands_refuse_an_older_schema_until_upgraded(
    home: Path,
    url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A kilnproxy one migration ahead of its database (the ladder made one rung taller, in
    this process): serve and the admin commands name `kilnproxy db upgrade`, which climbs."""
    assert kp(home, "accounts", "add", "aviato").returncode == 0
    comment = ("ALTER TABLE keys ADD COLUMN comment TEXT",)
    rung = ladder.Migration(2, "key comments", comment, comment)
    monkeypatch.setattr(ladder, "MIGRATIONS", (*ladder.MIGRATIONS, rung))
    monkeypatch.setenv("KILNPROXY_HOME", str(home))
    refusal = (
        "kilnproxy: error: directory schema is version 1, this kilnproxy needs version 2: "
        "run `kilnproxy db upgrade`\n"
    )
    for argv in (["serve"], ["accounts", "add", "hooli"], ["keys", "list"]):
        assert main(argv) == 2
        assert capsys.readouterr().err == refusal
    assert main(["db", "upgrade"]) == 0
    assert capsys.readouterr().out.splitlines()[1:] == [
        "applied migration 2: key comments",
        "directory schema upgraded from version 1 to 2",
    ]
    check_schema(url, home)
    assert main(["accounts", "add", "hooli"]) == 0
    assert capsys.readouterr().out == "added account hooli\n"


def test_an_unreachable_directory_stops_an_admin_command_in_one_line(tmp_path: Path) -> None:
    home = tmp_path / "var"
    home.mkdir()
    url = "postgresql://kilnproxy:hunter2@127.0.0.1:1/kiln"
    (home / "kilnproxy.toml").write_text(f'[directory]\nurl = "{url}"\n')
    for args in (["db", "upgrade"], ["repos", "list"], ["accounts", "add", "x"]):
        done = kp(home, *args)
        assert done.returncode == 2
        lines = done.stderr.decode().splitlines()
        assert len(lines) == 1 and lines[0].startswith(
            "kilnproxy: error: cannot reach directory postgresql://kilnproxy:***@127.0.0.1:1/kiln"
        ), lines
        assert "hunter2" not in lines[0]


def test_a_database_that_never_answers_stops_an_admin_command_at_its_deadline(
    tmp_path: Path, pg_cluster: Cluster, pg_url: str
) -> None:
    home = tmp_path / "var"
    home.mkdir()
    (home / "kilnproxy.toml").write_text(
        f'[directory]\nurl = "{pg_url}"\n[timeouts]\ndial = "1s"\n'
    )
    assert kp(home, "db", "upgrade").returncode == 0
    with pg_cluster.frozen():  # accepts connections, answers nothing
        started = time.monotonic()
        done = kp(home, "accounts", "add", "hooli")
        took = time.monotonic() - started
    assert done.returncode == 2
    (line,) = done.stderr.decode().splitlines()
    # libpq's connect_timeout gives up first here; a server that hangs after the connection
    # is up meets the command's own deadline (test_an_admin_command_has_a_deadline).
    assert line.startswith("kilnproxy: error: cannot reach directory postgresql://kilnproxy:***@")
    assert pg_cluster.password not in line
    assert took < 15


def test_an_admin_command_has_a_deadline(tmp_path: Path) -> None:
    config = from_mapping(
        {"directory": {"url": "postgresql://kilnproxy:hunter2@db.internal/kiln"}}, tmp_path
    )
    started = time.monotonic()
    with pytest.raises(DirectoryUnreachable) as raised:
        _within(0.3, config, lambda: time.sleep(5))  # blocking I/O that never ends
    assert 0.3 <= time.monotonic() - started < 2
    assert str(raised.value) == (
        "directory postgresql://kilnproxy:***@db.internal/kiln did not answer within 300ms"
    )
    with pytest.raises(ZeroDivisionError):  # what the work raises reaches the caller
        _within(5, config, lambda: 1 // 0)
    assert _within(5, config, lambda: ["done"]) == ["done"]


def test_backends_trust_is_held_to_the_directorys_deadline(
    tmp_path: Path, pg_cluster: Cluster, pg_url: str
) -> None:
    """A table locked by a transaction that never ends: `backends trust` reads the backend's
    URL like any admin command, and gives up at the same deadline (6 dials), in one line."""
    home = tmp_path / "var"
    home.mkdir()
    (home / "kilnproxy.toml").write_text(
        f'[directory]\nurl = "{pg_url}"\n[timeouts]\ndial = "500ms"\n'
    )
    assert kp(home, "db", "upgrade").returncode == 0
    assert kp(home, "backends", "add", "far", "ssh://git@192.0.2.1:22/srv").returncode == 0
    with psycopg.connect(pg_url) as held:
        held.execute("LOCK TABLE backends IN ACCESS EXCLUSIVE MODE")
        started = time.monotonic()
        trusting = kp(home, "backends", "trust", "far")
        took = time.monotonic() - started
    assert trusting.returncode == 2
    (line,) = trusting.stderr.decode().splitlines()
    assert line.startswith("kilnproxy: error: directory postgresql://") and line.endswith(
        "did not answer within 3s"
    ), line
    assert took < 10
