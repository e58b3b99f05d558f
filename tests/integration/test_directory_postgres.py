"""What only the PostgreSQL store has: a server that can stop, hang, or refuse a password.

The contract both stores share is test_directory_contract.py; these are the failure modes of a
database on the network (SPEC 2: a directory that cannot be reached never hangs a client), and
libpq's own handling of the URL, the PG* environment and ~/.pgpass.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import secrets
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from harness import KILNPROXY, run
from postgres import Cluster

from kilnproxy.directory import DirectoryStore, DirectoryUnavailable, open_directory
from kilnproxy.directory.model import Identity, PublicKey
from kilnproxy.errors import OperatorError
from kilnproxy.policy.access import Role

FINGERPRINT = f"SHA256:{1:043d}"


@pytest.fixture
def store(pg_url: str, tmp_path: Path) -> Iterator[DirectoryStore]:
    d = open_directory(pg_url, tmp_path, timeout=1.0, pool_size=2)
    d.add_account("aviato")
    d.add_user("aviato", "alice", Role.WRITE)
    d.add_key("aviato", "alice", "laptop", PublicKey("ssh-ed25519", FINGERPRINT, "x"))
    yield d
    d.close()


async def lookup(store: DirectoryStore) -> tuple[Identity | None, float]:
    started = time.monotonic()
    found = await store.identity_for_key(FINGERPRINT)
    return found, time.monotonic() - started


async def refused(store: DirectoryStore) -> tuple[str, float]:
    started = time.monotonic()
    with pytest.raises(DirectoryUnavailable) as caught:
        await store.identity_for_key(FINGERPRINT)
    return caught.value.detail, time.monotonic() - started


def outage_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "kilnproxy.directory"]


def test_a_stopped_database_is_unavailable_then_back_with_no_restart(
    store: DirectoryStore, pg_cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "kilnproxy.directory")

    async def scenario() -> None:
        found, _ = await lookup(store)  # a pooled connection, which the stop will break
        assert found is not None and found.user == "alice"
        pg_cluster.stop()
        for _ in range(5):
            detail, took = await refused(store)
            assert took < 1.0 and "Connection refused" in detail, detail
        pg_cluster.start()
        found, _ = await lookup(store)  # the very next lookup, same process
        assert found is not None and found.user == "alice"

    asyncio.run(scenario())
    lines = outage_lines(caplog)
    assert len(lines) == 2, lines  # one when it went down, one when it came back; not six
    assert re.fullmatch(r"directory postgresql://kilnproxy:\*\*\*@.* is unavailable: .*", lines[0])
    assert re.fullmatch(r"directory .* is back after \d+s, 5 lookups refused", lines[1])
    stats = store.statistics()
    assert (stats.lookups, stats.failures, stats.down_since) == (7, 5, None)
    assert (stats.pool_size, stats.connections, stats.in_use) == (2, 1, 0)


def test_a_hung_database_is_unavailable_within_the_timeout(
    store: DirectoryStore, pg_cluster: Cluster
) -> None:
    """A server that accepts and never answers (SIGSTOP) costs a lookup its timeout, no more;
    the connection it hung on is closed, and the next lookup after it thaws works."""

    async def scenario() -> None:
        assert (await lookup(store))[0] is not None
        with pg_cluster.frozen():
            detail, took = await refused(store)
            assert detail == "no answer within 1s" and 0.9 < took < 3.0, (detail, took)
            _, took = await refused(store)  # no connection to be had either: the same bound
            assert took < 3.0  # the timeout (1s), and slack for a loaded machine
        found, took = await lookup(store)
        assert found is not None and took < 1.0
        await store.aclose()  # waits for the abandoned lookups to let go of their connections

    asyncio.run(scenario())
    assert store.statistics().connections == 0


def test_lookups_share_a_bounded_pool_one_statement_each(
    store: DirectoryStore, pg_cluster: Cluster, pg_url: str
) -> None:
    dbname = pg_url.rsplit("/", 1)[1]
    with pg_cluster.admin() as conn:
        conn.execute(f"ALTER DATABASE {dbname} SET log_statement = 'all'".encode())
    logged = len(pg_cluster.log())

    async def many() -> list[Identity | None]:
        return list(await asyncio.gather(*(store.identity_for_key(FINGERPRINT) for _ in range(20))))

    found = asyncio.run(many())
    assert all(f is not None and f.user == "alice" for f in found)
    assert store.statistics().connections == 2  # pool_size, though 20 asked at once
    log = pg_cluster.log()[logged:]
    statements = re.findall(r"LOG:  (?:statement|execute [^:]*):\s+(\w+)", log)
    assert statements == ["SELECT"] * 20, log[-3000:]  # no BEGIN, no COMMIT, no check query
    with pg_cluster.admin(dbname) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'kilnproxy' "
            "AND datname = current_database()"
        ).fetchone()
    assert row == (3,)  # the two of the pool, and the admin side's one of the fixture


def test_a_password_never_appears_in_an_error_or_the_log(
    pg_cluster: Cluster, pg_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "not-the-Password-42"
    wrong = pg_url.replace(pg_cluster.password, secret)
    with pytest.raises(OperatorError) as admin:
        open_directory(wrong, tmp_path, timeout=2).list_keys()
    assert "password authentication failed" in str(admin.value)
    assert secret not in str(admin.value) and "kilnproxy:***@" in str(admin.value)

    store = open_directory(wrong, tmp_path, timeout=2)
    try:
        with pytest.raises(DirectoryUnavailable) as lookup_error:
            asyncio.run(store.identity_for_key(FINGERPRINT))
    finally:
        store.close()
    assert "password authentication failed" in lookup_error.value.detail
    assert secret not in lookup_error.value.detail + caplog.text

    # libpq quotes a URL it cannot parse back whole, password included.
    broken = f"postgresql://kilnproxy:{secret}@[::1/db"
    with pytest.raises(OperatorError) as unparsable:
        open_directory(broken, tmp_path)
    assert "IPv6" in str(unparsable.value) and secret not in str(unparsable.value)


def cli(home: Path, url: str, *args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    (home / "kilnproxy.toml").write_text(f'[directory]\nurl = "{url}"\n')
    base = {k: v for k, v in os.environ.items() if not k.startswith(("KILNPROXY_", "PG"))}
    done = run(
        [*KILNPROXY, *args],
        env={**base, "KILNPROXY_HOME": str(home), "HOME": str(home), **(env or {})},
        check=False,
    )
    return done.returncode, (done.stdout + done.stderr).decode()


def test_libpq_reads_the_password_from_the_environment_or_pgpass(
    pg_cluster: Cluster, pg_url: str, tmp_path: Path
) -> None:
    bare = pg_url.replace(f":{pg_cluster.password}@", "@")
    status, out = cli(tmp_path, bare, "accounts", "add", "aviato")
    assert status == 2 and len(out.splitlines()) == 1, out
    assert out.startswith("kilnproxy: error: cannot reach directory postgresql://kilnproxy@")

    status, out = cli(tmp_path, bare, "accounts", "add", "aviato",
                      env={"PGPASSWORD": pg_cluster.password})  # fmt: skip
    assert (status, out) == (0, "added account aviato\n")

    pgpass = tmp_path / ".pgpass"
    pgpass.write_text(f"127.0.0.1:{pg_cluster.port}:*:kilnproxy:{pg_cluster.password}\n")
    pgpass.chmod(0o600)
    status, out = cli(tmp_path, bare, "accounts", "add", "hooli")
    assert (status, out) == (0, "added account hooli\n")


def test_sslmode_in_the_url_is_libpqs(pg_url: str, tmp_path: Path) -> None:
    """The test server has no TLS: `require` is refused by libpq itself, `disable` works."""
    status, out = cli(tmp_path, f"{pg_url}?sslmode=require", "backends", "list")
    assert status == 2 and "server does not support SSL" in out, out
    status, out = cli(tmp_path, f"{pg_url}?sslmode=disable", "backends", "list")
    assert status == 0 and out.startswith("local  local://"), out


def test_config_and_bad_urls_never_show_the_password(
    pg_cluster: Cluster, pg_url: str, tmp_path: Path
) -> None:
    secret = pg_cluster.password
    status, out = cli(tmp_path, pg_url, "config")
    assert status == 0 and "pool_size = 4" in out and secret not in out
    status, out = cli(tmp_path, f"{pg_url} trailing", "repos", "list")
    assert status == 2 and len(out.splitlines()) == 1 and "no spaces" in out, out
    assert secret not in out and "kilnproxy:***@" in out


def test_the_admin_connection_has_the_lookup_timeout(pg_cluster: Cluster, pg_url: str) -> None:
    """connect_timeout comes from [timeouts] dial unless the URL or PGCONNECT_TIMEOUT says."""
    from kilnproxy.directory.postgres import connection_string

    assert "connect_timeout=3" in connection_string(pg_url, 2.5)
    assert "connect_timeout=7" in connection_string(f"{pg_url}?connect_timeout=7", 2.5)
    with psycopg.connect(connection_string(pg_url, 2.5)) as conn:
        assert conn.execute("SHOW application_name").fetchone() == ("kilnproxy",)


def test_a_busy_connection_is_replaced_after_its_age(
    store: DirectoryStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection never idle long is used for AGE_MAX at most: after a failover that left
    the old server up, a busy worker reaches the new one within that."""
    from kilnproxy.directory import pgpool

    monkeypatch.setattr(pgpool, "AGE_MAX", 0.3)

    async def server_pids() -> list[int]:
        pids = []
        pool = store._lookups
        assert isinstance(pool, pgpool.LookupPool)
        for _ in range(8):  # a lookup every 0.1 s: never idle past IDLE_MAX
            row = await pool.one("SELECT pg_backend_pid()", {})
            assert row is not None
            pids.append(row[0])
            await asyncio.sleep(0.1)
        return pids

    pids = asyncio.run(server_pids())
    assert 2 <= len(set(pids)) <= 4, pids  # a new one about every 0.3 s, each used a while


def test_a_connection_idle_too_long_is_not_used(
    store: DirectoryStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A firewall or NAT may drop a pooled connection without a word while it sits idle: a
    lookup on it would hang until its deadline. One idle past IDLE_MAX is closed, not used (its
    server process is stopped here, as a dropped connection answers nothing); and libpq's
    keepalives are on unless the URL says otherwise."""
    from kilnproxy.directory import pgpool
    from kilnproxy.directory.postgres import connection_string

    monkeypatch.setattr(pgpool, "IDLE_MAX", 0.2)

    async def scenario() -> None:
        assert (await lookup(store))[0] is not None
        pool = store._lookups
        assert isinstance(pool, pgpool.LookupPool)
        ((idle, _),) = pool._idle
        backend = idle.info.backend_pid
        os.kill(backend, signal.SIGSTOP)
        try:
            await asyncio.sleep(0.3)
            found, took = await lookup(store)
            assert found is not None and took < 0.9, took
        finally:
            os.kill(backend, signal.SIGCONT)

    asyncio.run(scenario())
    assert "keepalives_idle=30" in connection_string("postgresql://k@db/k", 2.5)
    assert "keepalives_idle=5" in connection_string("postgresql://k@db/k?keepalives_idle=5", 2.5)


def test_a_first_host_that_answers_nothing_leaves_the_next_one_time(
    pg_cluster: Cluster, pg_url: str, tmp_path: Path
) -> None:
    """A URL naming two hosts, the first one accepting connections and answering nothing (an
    old primary that froze): libpq gives each host the whole connect timeout in turn, so the
    hosts share the lookup's, and every lookup still reaches the second."""
    with socket.create_server(("127.0.0.1", 0)) as mute:  # the kernel accepts; nobody answers
        live = f"127.0.0.1:{pg_cluster.port}"
        url = pg_url.replace(live, f"127.0.0.1:{mute.getsockname()[1]},{live}")
        directory = open_directory(url, tmp_path, timeout=4.0, pool_size=1)
        try:
            directory.add_account("aviato")
            directory.add_user("aviato", "alice", Role.WRITE)
            directory.add_key(
                "aviato", "alice", "laptop", PublicKey("ssh-ed25519", FINGERPRINT, "x")
            )
            found, took = asyncio.run(lookup(directory))
        finally:
            directory.close()
    assert found is not None and found.user == "alice"
    assert 1.5 < took < 4.0, took  # the first host's share of the timeout, then the second


def test_a_sql_ascii_database_gives_names_as_text(pg_cluster: Cluster, tmp_path: Path) -> None:
    """initdb under the C locale makes SQL_ASCII databases, and createdb copies it: psycopg
    reads their text as bytes, unless the connection asks for UTF-8."""
    name = f"kp_ascii_{secrets.token_hex(4)}"
    with pg_cluster.admin() as conn:
        conn.execute(
            f"CREATE DATABASE {name} OWNER kilnproxy ENCODING 'SQL_ASCII' TEMPLATE template0 "
            "LOCALE_PROVIDER libc LOCALE 'C'".encode()
        )
    directory = open_directory(pg_cluster.url(name), tmp_path, timeout=4.0, pool_size=1)
    try:
        directory.add_account("aviato")
        directory.add_user("aviato", "alice", Role.WRITE)
        directory.add_key(
            "aviato", "alice", "clé ünicode", PublicKey("ssh-ed25519", FINGERPRINT, "x")
        )
        (row,) = directory.list_keys()
        found, _ = asyncio.run(lookup(directory))
    finally:
        directory.close()
    assert row.name == "clé ünicode"
    assert found == Identity("aviato", "alice", Role.WRITE, "clé ünicode", FINGERPRINT)


def test_a_connection_lost_during_the_schema_check_is_an_outage(
    pg_cluster: Cluster, pg_url: str, tmp_path: Path
) -> None:
    """A database restarting under `serve`'s schema check (its connection terminated) is an
    outage, which serve starts in spite of, not a wrong schema, which it refuses (exit 2,
    which systemd does not restart)."""
    from kilnproxy.directory import check_schema
    from kilnproxy.directory.model import DirectoryUnreachable

    check_schema(pg_url, tmp_path)  # installs it
    outcome: list[BaseException] = []

    def check() -> None:
        try:
            check_schema(pg_url, tmp_path)
        except BaseException as exc:
            outcome.append(exc)

    with psycopg.connect(pg_url, autocommit=True) as held, held.transaction():
        held.execute("LOCK TABLE schema_version IN ACCESS EXCLUSIVE MODE")
        checking = threading.Thread(target=check)
        checking.start()
        with pg_cluster.admin() as admin:
            for _ in range(100):
                waiting = admin.execute(
                    "SELECT pid FROM pg_stat_activity WHERE application_name = 'kilnproxy' "
                    "AND wait_event_type = 'Lock'"
                ).fetchall()
                if waiting:
                    break
                time.sleep(0.05)
            assert len(waiting) == 1
            admin.execute("SELECT pg_terminate_backend(%s)", waiting[0])
        checking.join(10)
    (raised,) = outcome
    assert type(raised) is DirectoryUnreachable, raised
    assert str(raised).startswith("directory error: terminating connection")
