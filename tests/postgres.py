"""A real PostgreSQL for the tests: Debian's binaries, a throwaway cluster on 127.0.0.1.

One cluster per test session (initdb costs seconds), one database per test. The cluster runs as
the `postgres` user (`runuser`; initdb refuses root), in a temporary directory of its own, on a
free port, with its Unix socket inside that directory and durability off (the data is
thrown away). Its collation is ICU's English, not byte order, so that a store that forgot
COLLATE "C" would list in another order than SQLite. The application role `kilnproxy` logs in
over TCP with a password (scram-sha-256), as a real deployment would; the fixture itself is
trusted on the socket.

PostgreSQL missing is a failure, not a skip: `make test` installs it (`make deps`).
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import psycopg
import pytest
from harness import free_port

ROLE = "kilnproxy"
SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "100",
    "shared_buffers": "16MB",
}


def find_bindir() -> Path:
    """Debian's newest /usr/lib/postgresql/N/bin, or a test failure that says how to get it."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parts[-3]))
    if not found:
        pytest.fail("PostgreSQL is not installed (make deps: apt-get install postgresql)")
    return found[-1].parent


@dataclass
class Cluster:
    root: Path
    bindir: Path
    port: int = 0
    password: str = field(default_factory=lambda: f"pw-{secrets.token_hex(8)}")
    _databases: Iterator[int] = field(default_factory=itertools.count)

    def __post_init__(self) -> None:
        self.port = self.port or free_port()
        self.data = self.root / "data"
        self.socket_dir = self.root / "sock"
        self.log_path = self.root / "postgres.log"

    # -- as the postgres user ------------------------------------------------------------------

    def _as_postgres(self, *argv: str, timeout: float = 60) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        done = subprocess.run(
            [*prefix, *argv], capture_output=True, timeout=timeout, check=False, cwd=self.root
        )
        if done.returncode != 0:
            raise AssertionError(f"{argv[0]} failed: {done.stderr.decode()}\n{self.log()}")

    def init(self) -> None:
        self.socket_dir.mkdir()
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
            shutil.chown(self.socket_dir, "postgres", "postgres")
        self._as_postgres(
            str(self.bindir / "initdb"), "-D", str(self.data), "-U", "postgres", "--no-sync",
            "--encoding=UTF8", "--locale=C.UTF-8", "--locale-provider=icu", "--icu-locale=en",
            "--auth-local=trust", "--auth-host=scram-sha-256",
        )  # fmt: skip
        settings = {**SETTINGS, "port": str(self.port)}
        settings["unix_socket_directories"] = f"'{self.socket_dir}'"
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.writelines(f"{name} = {value}\n" for name, value in settings.items())

    def start(self) -> None:
        self._as_postgres(
            str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log_path),
            "-w", "-t", "30", "start",
        )  # fmt: skip

    def stop(self) -> None:
        """A fast shutdown, as an operator's `systemctl stop postgresql` does."""
        self._as_postgres(
            str(self.bindir / "pg_ctl"), "-D", str(self.data), "-w", "-t", "30", "-m", "fast",
            "stop",
        )  # fmt: skip

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """Every PostgreSQL process stopped (SIGSTOP): a server that accepts TCP connections
        in the kernel's backlog and never answers, like a hung host."""
        postmaster = psutil.Process(int((self.data / "postmaster.pid").read_text().split()[0]))
        processes = [postmaster, *postmaster.children(recursive=True)]
        for process in processes:
            process.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            for process in processes:
                with contextlib.suppress(psutil.NoSuchProcess):
                    process.send_signal(signal.SIGCONT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # -- as the fixture's superuser, on the socket ---------------------------------------------

    def admin(self, dbname: str = "postgres") -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(
            host=str(self.socket_dir),
            port=self.port,
            user="postgres",
            dbname=dbname,
            autocommit=True,
        )

    def create_role(self) -> None:
        with self.admin() as conn:
            conn.execute(f"CREATE ROLE {ROLE} LOGIN PASSWORD '{self.password}'".encode())

    def create_database(self) -> str:
        """A new empty database owned by the application role; its name."""
        name = f"kp_{next(self._databases)}"
        with self.admin() as conn:
            conn.execute(f"CREATE DATABASE {name} OWNER {ROLE}".encode())
        return name

    def url(self, dbname: str, *, password: bool = True) -> str:
        secret = f":{self.password}" if password else ""
        return f"postgresql://{ROLE}{secret}@127.0.0.1:{self.port}/{dbname}"

    def destroy(self) -> None:
        with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
            if self.running():
                self.stop()
        if self.running():  # pg_ctl failed: do not leave a server behind
            with contextlib.suppress(OSError, ValueError, psutil.NoSuchProcess):
                pid = int((self.data / "postmaster.pid").read_text().split()[0])
                psutil.Process(pid).kill()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Cluster]:
    """One PostgreSQL cluster for the session, reaped at the end however the tests went."""
    bindir = find_bindir()
    # Not under pytest's tmp_path: its parents are mode 0700, closed to the postgres user.
    cluster = Cluster(Path(tempfile.mkdtemp(prefix="kilnproxy-pg-")), bindir)
    atexit.register(cluster.destroy)  # also when the session is interrupted
    try:
        cluster.init()
        cluster.start()
        cluster.create_role()
        yield cluster
    finally:
        cluster.destroy()
        atexit.unregister(cluster.destroy)


@pytest.fixture
def pg_url(pg_cluster: Cluster) -> Iterator[str]:
    """The URL of a new empty database, password included; the cluster is up afterwards."""
    yield pg_cluster.url(pg_cluster.create_database())
    if not pg_cluster.running():  # a test that stopped it and failed before starting it
        pg_cluster.start()
