"""Two kilnproxy hosts behind a real HAProxy, sharing one PostgreSQL directory (SPEC 2, 3).

The setting of README's "Running several hosts", on loopback: HAProxy loads docs/haproxy.cfg
(`leastconn`, PROXY v2, banner health checks, redispatch), each host has its own home, ports
and two workers, the same host key and the same shared storage. Clients connect from
127.0.0.9, so that the address HAProxy sends in its PROXY header (the client's) differs from
the one the hosts see on the socket (HAProxy's, 127.0.0.1).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from harness import KILNPROXY, Kiln, finish_upload_pack, free_port, run, seed_git
from postgres import Cluster

from kilnproxy.cli.admin import add_repo
from kilnproxy.policy.access import Role

HAPROXY_CONFIG = Path(__file__).resolve().parents[2] / "docs" / "haproxy.cfg"
CLIENT_ADDRESS = "127.0.0.9"
CLIENTS = 40
ROUNDS = 2
UNAVAILABLE = b"kilnproxy: service temporarily unavailable, try again later (session "


@dataclass
class Front:
    """HAProxy, and what a client needs to reach the hosts through it."""

    port: int
    proc: subprocess.Popen[bytes]
    known_hosts: Path
    log: Path

    def ssh_command(self, key: Path) -> str:
        return " ".join([
            "ssh", "-F", "/dev/null", "-i", str(key), "-o", "IdentitiesOnly=yes",
            "-o", f"UserKnownHostsFile={self.known_hosts}", "-o", "StrictHostKeyChecking=yes",
            "-o", "BatchMode=yes", "-o", "LogLevel=ERROR", "-o", f"BindAddress={CLIENT_ADDRESS}",
        ])  # fmt: skip

    def url(self, repo: str) -> str:
        return f"ssh://git@127.0.0.1:{self.port}/{repo}"


def host_settings(pg_url: str) -> dict[str, dict[str, object]]:
    return {
        "directory": {"url": pg_url},
        "ssh": {"proxy_protocol": "optional", "proxy_allowed": ["127.0.0.1/32"]},
        "workers": {"count": 2},
        # HAProxy checks every second and needs two failures (docs/haproxy.cfg): 3 s of notice.
        "timeouts": {"drain": "60s", "dial": "3s", "drain_notice": "3s"},
    }


def start_front(root: Path, hosts: list[Kiln]) -> Front:
    port = free_port()
    env = {**os.environ, "KILNPROXY_FRONT": f"127.0.0.1:{port}"}
    for number, host in enumerate(hosts, 1):
        env[f"KILNPROXY_HOST{number}"] = f"127.0.0.1:{host.port}"
    log = root / "haproxy.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            ["haproxy", "-db", "-f", str(HAPROXY_CONFIG)],
            env=env, stdout=out, stderr=out, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    host_key = (hosts[0].home / "ssh_host_ed25519_key.pub").read_text().split()
    known_hosts = root / "front_known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{port} {host_key[0]} {host_key[1]}\n")
    return Front(port, proc, known_hosts, log)


def wait_until(condition: object, what: str, timeout: float = 20.0) -> None:
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def banner_through(port: int) -> bool:
    import socket

    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 2) as sock:
        sock.settimeout(2)
        return sock.recv(64).startswith(b"SSH-2.0-")
    return False


def served_by_both(hosts: list[Kiln]) -> bool:
    return all("access " in host.log() for host in hosts)


@dataclass
class Cluster2:
    hosts: list[Kiln]
    front: Front
    alice: Path
    client_env: dict[str, str]
    repo: Path


@pytest.fixture
def two_hosts(tmp_path: Path, pg_cluster: Cluster, pg_url: str) -> Iterator[Cluster2]:
    if shutil.which("haproxy") is None:
        pytest.fail("haproxy is not installed (make test installs it)")
    first = Kiln(tmp_path / "host1", host_settings(pg_url))
    second = Kiln(tmp_path / "host2", host_settings(pg_url))
    alice = first.add_user("aviato", "alice", Role.WRITE)
    storage = tmp_path / "storage"  # one storage server that both hosts reach
    with first.directory() as directory:
        directory.add_backend("shared", f"local://{storage}")
        add_repo(directory, "aviato/website", "git", "shared", None, init=True)
        repo = Path(next(r.path for r in directory.list_repos() if r.repo == "aviato/website"))
    seed_git(repo, tmp_path / "seed", {"README.md": b"# website\n"})
    front: Front | None = None
    try:
        first.start()
        for name in ("ssh_host_ed25519_key", "ssh_host_ed25519_key.pub"):  # one host key
            shutil.copy2(first.home / name, second.home / name)
        second.start()
        front = start_front(tmp_path, [first, second])
        wait_until(lambda: banner_through(front.port), "HAProxy to serve the SSH banner")
        env = first.client_env(alice) | {"GIT_SSH_COMMAND": front.ssh_command(alice)}
        yield Cluster2([first, second], front, alice, env, repo)
    finally:
        if front is not None:
            front.proc.terminate()
            front.proc.wait(10)
        for host in (first, second):
            if host.proc is not None and host.proc.poll() is None:
                host.proc.kill()
                host.proc.wait(10)


def clone_and_push(c: Cluster2, work: Path, branch: str) -> subprocess.CompletedProcess[bytes]:
    """A clone, a commit and a push to the client's own branch, through HAProxy."""
    git = ["git", "-c", "protocol.version=2"]
    done = run([*git, "clone", "-q", c.front.url("aviato/website"), str(work)],
               env=c.client_env, check=False)  # fmt: skip
    if done.returncode != 0:
        return done
    (work / f"{branch}.txt").write_text(f"{branch}\n")
    run([*git, "add", "."], env=c.client_env, cwd=work)
    run([*git, "commit", "-qm", branch], env=c.client_env, cwd=work)
    return run([*git, "push", "-q", "origin", f"HEAD:refs/heads/{branch}"],
               env=c.client_env, cwd=work, check=False)  # fmt: skip


def restart_both_ways(hosts: list[Kiln], started: threading.Event) -> None:
    """Host 1 restarts its workers one by one (HUP); host 2 drains and exits (TERM), and is
    started again."""
    started.wait(30)
    time.sleep(0.5)
    hosts[0].send(signal.SIGHUP)
    second = hosts[1]
    assert second.proc is not None
    second.proc.send_signal(signal.SIGTERM)
    assert second.proc.wait(60) == 0
    second.start()


def test_clones_and_pushes_survive_a_rolling_restart_and_a_drain_behind_haproxy(
    two_hosts: Cluster2, tmp_path: Path
) -> None:
    c = two_hosts
    started = threading.Event()

    def client(number: int) -> list[subprocess.CompletedProcess[bytes]]:
        started.set()
        return [
            clone_and_push(c, tmp_path / f"c{number}-{n}", f"client-{number}-{n}")
            for n in range(ROUNDS)
        ]

    with ThreadPoolExecutor(CLIENTS + 1) as pool:
        restarting = pool.submit(restart_both_ways, c.hosts, started)
        results = [r for rs in pool.map(client, range(CLIENTS)) for r in rs]
        restarting.result(timeout=120)
    failed = [r.stderr.decode(errors="replace")[-500:] for r in results if r.returncode != 0]
    assert failed == [], f"{len(failed)} of {len(results)} operations failed: {failed[:3]}"
    branches = run(["git", "-C", str(c.repo), "branch", "--list", "client-*"]).stdout.split()
    assert len(branches) == CLIENTS * ROUNDS
    assert "rolling restart to generation 1 complete" in c.hosts[0].log()
    # Every command's access line carries the client's address, from the PROXY header.
    for host in c.hosts:
        commands = re.findall(r"access remote=(\S+) .* verb=git-\S+", host.log())
        assert commands, f"no command served by {host.root.name}"
        assert {remote.rsplit(":", 1)[0] for remote in commands} == {CLIENT_ADDRESS}


def test_a_key_removed_on_one_host_is_refused_by_the_other_within_a_second(
    two_hosts: Cluster2,
) -> None:
    c = two_hosts
    first, second = c.hosts
    assert second.ssh(c.alice, "git-upload-pack 'aviato/website'", input=b"0000").returncode == 0
    listed = run([*KILNPROXY, "keys", "list", "aviato/alice", "--config", str(first.config_path)],
                 env=first.server_env())  # fmt: skip
    fingerprint = listed.stdout.decode().split()[0]
    run([*KILNPROXY, "keys", "remove", fingerprint, "--config", str(first.config_path)],
        env=first.server_env())  # fmt: skip
    removed_at = time.monotonic()
    while True:
        attempt = second.ssh(c.alice, "git-upload-pack 'aviato/website'", input=b"0000")
        refused_after = time.monotonic() - removed_at
        if attempt.returncode == 255 and b"Permission denied (publickey)" in attempt.stderr:
            break
        assert refused_after < 1.0, f"still served {refused_after:.2f}s after the key was removed"
    assert refused_after < 1.0
    print(f"revoked key refused on the other host after {refused_after * 1000:.0f} ms")


def test_a_directory_outage_keeps_running_clones_and_refuses_new_ones_until_it_is_back(
    two_hosts: Cluster2, pg_cluster: Cluster, tmp_path: Path
) -> None:
    c = two_hosts
    first = c.hosts[0]
    with first.ssh_popen(c.alice, "git-upload-pack 'aviato/website.git'") as running:
        assert running.stdout is not None
        assert b" HEAD\x00" in running.stdout.read(200)  # authenticated and routed
        pg_cluster.stop()
        try:
            started = time.monotonic()
            refused = run(["git", "ls-remote", c.front.url("aviato/website")],
                          env=c.client_env, check=False, timeout=30)  # fmt: skip
            took = time.monotonic() - started
            assert refused.returncode != 0
            assert UNAVAILABLE in refused.stderr, refused.stderr
            assert took < 3.0 + 5.0  # [timeouts] dial, plus an SSH handshake on a busy machine
            assert finish_upload_pack(running) == 0  # the session that was running goes on
        finally:
            pg_cluster.start()
    back = run(["git", "ls-remote", c.front.url("aviato/website")], env=c.client_env)
    assert b"refs/heads/main" in back.stdout
    for host in c.hosts:  # said once, not per connection
        assert host.log().count("directory unavailable") <= 2 * 2  # per worker, at most
