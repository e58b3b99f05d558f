"""Test harness: a real `kilnproxy serve` subprocess and real OpenSSH, git and hg clients.

Everything lives under one temporary directory: KILNPROXY_HOME, the clients' HOME (so that no
~/.ssh or ~/.gitconfig of the machine is read or written), keys and known_hosts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from kilnproxy.cli.admin import add_repo
from kilnproxy.config import declarations
from kilnproxy.directory import DirectoryStore, open_directory
from kilnproxy.policy.access import Role
from kilnproxy.ssh.keys import parse_public_key
from kilnproxy.status_socket import request

KILNPROXY = [sys.executable, "-m", "kilnproxy.cli"]
START_TIMEOUT = 20.0
# The functional tests clone twenty at once and fail authentication on purpose, all from
# 127.0.0.1: under the shipped [limits] that would be dropped early or penalised, which is not
# what they test. tests/integration/test_admission.py tests admission with the shipped
# defaults (`SHIPPED_LIMITS`), its attackers on other loopback addresses.
SUITE_LIMITS: dict[str, Any] = {
    "max_startups": "2000",
    "max_startups_per_source": 0,
    "penalty_exempt": ["127.0.0.1/32"],
}
SHIPPED_LIMITS: dict[str, Any] = {
    item.name: item.metadata["default"] for section, item in declarations() if section == "limits"
}


def _ports_outside_the_ephemeral_range() -> range:
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999  # Linux's default
    if low >= 4096:
        return range(low // 2, low)
    return range(high + 1, 65536) if high < 61440 else range(0)


def free_port() -> int:
    """A port nothing listens on, for a server the test starts. Not one of the ports bind(0)
    hands out where another will do: those are the ephemeral range, from which every outgoing
    connection takes its own, so one could take it before the server binds it ("Address
    already in use")."""
    for _ in range(200):
        ports = _ports_outside_the_ephemeral_range()
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", random.choice(ports) if ports else 0))
            except OSError:
                continue  # another test's server has it
            return int(sock.getsockname()[1])
    raise AssertionError("no free port")


def run(
    argv: list[str],
    *,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    input: bytes | None = None,
    timeout: float = 120,
    check: bool = True,
) -> subprocess.CompletedProcess[bytes]:
    done = subprocess.run(
        argv, env=env, cwd=cwd, input=input, capture_output=True, timeout=timeout, check=False
    )
    if check and done.returncode != 0:
        raise AssertionError(
            f"{argv} exited {done.returncode}\nstdout: {done.stdout[-2000:]!r}\n"
            f"stderr: {done.stderr[-4000:]!r}"
        )
    return done


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll `condition` until it holds; return how long that took."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, f"timed out waiting for {what}"
        time.sleep(0.05)
    return time.monotonic() - started


def poll(probe: Callable[[], Any], timeout: float = 15) -> Any:
    """Call `probe` until it returns something true, and return that."""
    deadline = time.monotonic() + timeout
    while not (result := probe()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
    return result


def wait_for_line(read: Callable[[], str], pattern: str, timeout: float) -> re.Match[str]:
    """Wait until a line of what `read` returns (a log) matches `pattern`."""
    deadline = time.monotonic() + timeout
    while True:
        match = re.search(pattern, read(), re.M)
        if match:
            return match
        if time.monotonic() > deadline:
            raise AssertionError(f"no log line matches {pattern!r}:\n{read()[-3000:]}")
        time.sleep(0.05)


@contextlib.asynccontextmanager
async def loop_ticks() -> AsyncIterator[list[int]]:
    """Counts the running loop's 10 ms sleeps while the block runs (the list's one item): a
    loop that a blocking call held meanwhile counts none."""
    ticks = [0]

    async def tick() -> None:
        while True:
            await asyncio.sleep(0.01)
            ticks[0] += 1

    ticking = asyncio.create_task(tick())
    try:
        yield ticks
    finally:
        ticking.cancel()


def gone(pid: int) -> Callable[[], bool]:
    """Whether the process has exited (a zombie that nobody reaped yet counts as exited)."""

    def check() -> bool:
        try:
            return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
        except psutil.NoSuchProcess:
            return True

    return check


def keygen(path: Path) -> Path:
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", str(path)])
    return path


@dataclass
class Kiln:
    """One kilnproxy server home, with users and keys, and clients that talk to it."""

    root: Path
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.home = self.root / "var"
        self.client_home = self.root / "home"
        self.keys = self.root / "keys"
        for directory in (self.home, self.client_home, self.keys):
            directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.http_port = free_port()
        self.config_path = self.home / "kilnproxy.toml"
        self.log_path = self.root / "serve.log"
        self.known_hosts = self.root / "known_hosts"
        (self.client_home / ".gitconfig").write_text(
            "[user]\n\tname = Test User\n\temail = test@example.com\n"
            "[init]\n\tdefaultBranch = main\n[advice]\n\tdetachedHead = false\n"
        )
        (self.client_home / ".hgrc").write_text("[ui]\nusername = Test User <test@example.com>\n")
        self.write_config()

    # -- configuration and directory ---------------------------------------------------------

    def write_config(self) -> None:
        settings: dict[str, dict[str, Any]] = {
            "ssh": {"listen": [f"127.0.0.1:{self.port}"]},
            "status": {"socket": "kilnproxy.sock", "http": f"127.0.0.1:{self.http_port}"},
            "workers": {"count": 1},
            "limits": SUITE_LIMITS,
        }
        for section, values in self.settings.items():  # a test's keys, section by section
            settings[section] = {**settings.get(section, {}), **values}
        lines = []
        for section, values in settings.items():
            lines.append(f"[{section}]")
            lines.extend(f"{key} = {json.dumps(value)}" for key, value in values.items())
        self.config_path.write_text("\n".join(lines) + "\n")

    @contextlib.contextmanager
    def directory(self) -> Iterator[DirectoryStore]:
        """The server's directory: its `[directory] url` if the test set one, else SQLite."""
        url = self.settings.get("directory", {}).get("url")
        directory = open_directory(url or f"sqlite:{self.home / 'kilnproxy.db'}", self.home)
        try:
            yield directory
        finally:
            directory.close()

    def add_user(self, account: str, user: str, role: Role) -> Path:
        """Add the account if needed, the user, and a fresh key; return the private key path."""
        key = keygen(self.keys / f"{account}_{user}")
        with self.directory() as directory:
            if not any(r.account == account for r in directory.list_keys()):
                with contextlib.suppress(Exception):
                    directory.add_account(account)
            directory.add_user(account, user, role)
            public = parse_public_key(key.with_suffix(".pub").read_text())
            directory.add_key(account, user, f"{user}'s laptop", public)
        return key

    def add_repo(self, repo: str, vcs: str) -> Path:
        with self.directory() as directory:
            add_repo(directory, repo, vcs, "local", None, init=True)
            return Path(next(r.path for r in directory.list_repos() if r.repo == repo))

    # -- the server --------------------------------------------------------------------------

    def server_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KILNPROXY_")}
        return env | {"KILNPROXY_HOME": str(self.home), "HOME": str(self.client_home)}

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        """`kilnproxy ARGS` against this server's configuration, as its operator runs it."""
        argv = [*KILNPROXY, *args, "--config", str(self.config_path)]
        return run(argv, env=self.server_env(), check=check)

    def start(self, argv: list[str] | None = None, env: dict[str, str] | None = None) -> None:
        with self.log_path.open("ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                argv or [*KILNPROXY, "serve", "--config", str(self.config_path)],
                env=self.server_env() | (env or {}),
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group, as under systemd
            )
        self.wait_ready()
        host_key = (self.home / "ssh_host_ed25519_key.pub").read_text().split()
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {host_key[0]} {host_key[1]}\n")

    def wait_ready(self, count: int | None = None, timeout: float = START_TIMEOUT) -> list[int]:
        """Wait until `count` workers (all wanted, by default) are READY; return their pids."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(Exception):
                workers = self.status()["workers"]
                ready = [w["pid"] for w in workers if w["state"] == "ready"]
                wanted = count or int(self.settings.get("workers", {}).get("count", 1))
                if len(ready) == wanted == len(workers):
                    return ready
            time.sleep(0.05)
        raise AssertionError(f"workers not ready:\n{self.log()[-5000:]}")

    def send(self, signum: int) -> None:
        """A signal to the master."""
        assert self.proc is not None
        self.proc.send_signal(signum)

    def workers(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = self.status()["workers"]
        return rows

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 15) -> int:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(
                f"serve had exited {self.proc.returncode} by itself:\n{self.log()}"
            )
        self.proc.send_signal(signum)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise AssertionError(f"serve did not stop on {signum}:\n{self.log()}") from None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_for_log(self, pattern: str, timeout: float = 10) -> re.Match[str]:
        """Wait until a log line matches `pattern` (lines are written as sessions end)."""
        return wait_for_line(self.log, pattern, timeout)

    def status(self) -> dict[str, Any]:
        return request(self.home / "kilnproxy.sock", "status")

    def connections(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = request(self.home / "kilnproxy.sock", "connections")[
            "connections"
        ]
        return rows

    def worker(self) -> dict[str, Any]:
        workers: list[dict[str, Any]] = self.status()["workers"]
        return workers[0]

    def wait_idle(self, timeout: float = 10, served: int = 0) -> dict[str, Any]:
        """Wait until the worker has no session open, and has ended at least `served` in all;
        return its statistics. (They come with its heartbeat, once a second: without `served`,
        a heartbeat from before the last sessions opened says none is open.)"""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            worker = self.worker()
            if worker["sessions"] == 0 and worker["sessions_total"] >= served:
                return worker
            time.sleep(0.05)
        raise AssertionError(f"not idle after {served} sessions: {self.worker()}")

    # -- clients -----------------------------------------------------------------------------

    def ssh_argv(self, key: Path, log_level: str = "ERROR") -> list[str]:
        return [
            "ssh", "-F", "/dev/null", "-i", str(key), "-o", "IdentitiesOnly=yes",
            "-o", f"UserKnownHostsFile={self.known_hosts}", "-o", "StrictHostKeyChecking=yes",
            "-o", "BatchMode=yes", "-o", f"LogLevel={log_level}",
        ]  # fmt: skip

    def client_env(self, key: Path) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("GIT_", "KILNPROXY_"))}
        env |= {
            "HOME": str(self.client_home),
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_SSH_COMMAND": " ".join(self.ssh_argv(key)),
            "HGRCPATH": str(self.client_home / ".hgrc"),
            "LC_ALL": "C",
        }
        return env

    def url(self, repo: str) -> str:
        return f"ssh://git@127.0.0.1:{self.port}/{repo}"

    def git(
        self, key: Path, *args: str, cwd: Path | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[bytes]:
        return run(["git", *args], env=self.client_env(key), cwd=cwd or self.root, check=check)

    def clone_with_commit(self, key: Path, repo: str, work: Path, name: str) -> Path:
        """Clone `repo` through the proxy into `work` and commit one new file there."""
        self.git(key, "clone", "-q", self.url(repo), str(work))
        (work / name).write_text(f"{name}\n")
        self.git(key, "add", name, cwd=work)
        self.git(key, "commit", "-qm", f"add {name}", cwd=work)
        return work

    def hg(
        self, key: Path, *args: str, cwd: Path | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[bytes]:
        ssh = " ".join(self.ssh_argv(key))
        argv = ["hg", "--config", f"ui.ssh={ssh}", *args]
        return run(argv, env=self.client_env(key), cwd=cwd or self.root, check=check)

    def ssh(
        self, key: Path, *command: str, input: bytes | None = b"", timeout: float = 60
    ) -> subprocess.CompletedProcess[bytes]:
        argv = [*self.ssh_argv(key), "-p", str(self.port), "git@127.0.0.1", *command]
        return run(argv, env=self.client_env(key), input=input, timeout=timeout, check=False)

    def ssh_popen(self, key: Path, *command: str) -> subprocess.Popen[bytes]:
        argv = [*self.ssh_argv(key), "-p", str(self.port), "git@127.0.0.1", *command]
        # Unbuffered: a write the server never read must not fail again when stdin is closed.
        return subprocess.Popen(
            argv, env=self.client_env(key), stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0,
        )  # fmt: skip


def seed_git(repo_path: Path, work: Path, files: dict[str, bytes]) -> str:
    """Commit `files` into the bare repository at `repo_path` directly (not through the proxy).
    Objects are stored uncompressed there: a test's large payloads are random bytes, which
    zlib only spends seconds on."""
    env = {**os.environ, "HOME": str(work.parent), "GIT_CONFIG_NOSYSTEM": "1",
           "GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": "core.compression",
           "GIT_CONFIG_VALUE_0": "0"}  # fmt: skip
    run(["git", "clone", "-q", str(repo_path), str(work)], env=env)
    for name, data in files.items():
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        (work / name).write_bytes(data)
    run(["git", "add", "-A"], env=env, cwd=work)
    ident = ["-c", "user.name=Seed", "-c", "user.email=seed@example.com"]
    run(["git", *ident, "commit", "-qm", "seed"], env=env, cwd=work)
    run(["git", "push", "-q", "origin", "HEAD:main"], env=env, cwd=work)
    return run(["git", "rev-parse", "HEAD"], env=env, cwd=work).stdout.decode().strip()


def seed_hg(repo_path: Path, files: dict[str, bytes]) -> str:
    for name, data in files.items():
        (repo_path / name).write_bytes(data)
    run(["hg", "-R", str(repo_path), "add", *[str(repo_path / n) for n in files]])
    run(["hg", "-R", str(repo_path), "commit", "-u", "Seed <seed@example.com>", "-m", "seed"])
    return run(["hg", "-R", str(repo_path), "log", "-r", "tip", "-T", "{node}"]).stdout.decode()


def hold_upload_pack(
    kiln: Kiln, key: Path, repo: str = "aviato/website"
) -> subprocess.Popen[bytes]:
    """An upload-pack conversation, begun, that the test finishes (or not) when it likes."""
    client = kiln.ssh_popen(key, f"git-upload-pack '{repo}.git'")
    assert client.stdout is not None
    assert b" HEAD\x00" in client.stdout.read(200)  # the advertisement has begun
    return client


STOPPED_AT_MOST = 5.0  # seconds `only_worker` keeps the others stopped: half the watchdog's 10


@contextlib.contextmanager
def only_worker(kiln: Kiln, index: int) -> Iterator[None]:
    """While it lasts, only worker `index` accepts connections. The workers share one listen
    queue and a new connection goes to whichever accepts first, which can be the same worker
    many times over (one idle since its last accept tends to win each race): the others are
    stopped (SIGSTOP), and continued however the block ends, or after STOPPED_AT_MOST seconds
    if it has not (the master would take them for hung at 10 s); the block then fails."""
    others = [int(row["pid"]) for row in kiln.workers() if int(row["index"]) != index]
    overran = threading.Event()

    def resume() -> None:
        for pid in others:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    def too_long() -> None:
        overran.set()
        resume()

    for pid in others:
        os.kill(pid, signal.SIGSTOP)
    deadline = threading.Timer(STOPPED_AT_MOST, too_long)
    deadline.start()
    try:
        yield
    finally:
        deadline.cancel()
        resume()
    assert not overran.is_set(), f"only worker {index}: the others were stopped too long"


def finish_upload_pack(client: subprocess.Popen[bytes]) -> int:
    """The client says it wants nothing (a flush-pkt) and hangs up: the command exits 0."""
    assert client.stdin is not None
    client.stdin.write(b"0000")
    client.stdin.close()
    return client.wait(timeout=20)


def ssh_client_of(git: subprocess.Popen[bytes], timeout: float = 20) -> psutil.Process:
    """The OpenSSH client that a running `git` started."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in psutil.Process(git.pid).children(recursive=True):
            if child.name() == "ssh":
                return child
        time.sleep(0.05)
    raise AssertionError("git started no ssh client")


def pack_bytes_received(clone: Path) -> int:
    """How much of the pack a `git clone` in progress has written: the client's own count."""
    return sum(p.stat().st_size for p in clone.glob(".git/objects/pack/tmp_pack_*"))


async def hold_tcp(port: int, seconds: float) -> float:
    """Open a TCP connection that never speaks; return how long until the server closed it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    try:
        async with asyncio.timeout(seconds):
            while await reader.read(4096):
                pass
    finally:
        writer.close()
    return time.monotonic() - started
