"""SSH backends: real OpenSSH sshd storage servers behind kilnproxy (SPEC 5)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import World, make_world
from harness import KILNPROXY, free_port, pack_bytes_received, run, seed_git
from sshd import Sshd

UNAVAILABLE = (
    r"^kilnproxy: storage for {} is unavailable, try again later \(session [0-9a-f]{{8}}\)$"
)


@dataclass
class Remote:
    world: World
    storage1: Sshd
    storage2: Sshd
    site: Path
    other: Path
    public_key: str

    def cli(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        return self.world.kiln.cli(*args)

    def add_storage(self, name: str, root: Path, *, trust: bool = True) -> Sshd:
        storage = Sshd(root)
        storage.authorize(self.public_key)
        storage.start()
        self.cli("backends", "add", name, storage.url)
        if trust:
            self.cli("backends", "trust", name)
        return storage

    def git_repo(self, storage: Sshd, backend: str, repo: str, files: dict[str, bytes]) -> Path:
        path = storage.base / f"{repo}.git"
        path.parent.mkdir(parents=True, exist_ok=True)
        run(["git", "init", "-q", "--bare", "--initial-branch=main", str(path)])
        seed_git(path, storage.root / f"seed-{repo.replace('/', '-')}", files)
        self.cli("repos", "add", repo, "--vcs", "git", "--backend", backend)
        return path


@pytest.fixture(scope="module")
def remote(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Remote]:
    root = tmp_path_factory.mktemp("remote")
    settings = {"timeouts": {"dial": "2s"}, "backend_ssh": {"pool_idle": "3s"}}
    w = make_world(root / "kiln", settings)
    env = w.kiln.server_env()
    key = run([*KILNPROXY, "backends", "key", "--config", str(w.kiln.config_path)], env=env)
    public = key.stdout.decode().splitlines()[-1]
    assert public.startswith("ssh-ed25519 ")
    r = Remote(w, Sshd(root / "s1"), Sshd(root / "s2"), Path(), Path(), public)
    r.storage1 = r.add_storage("storage1", root / "s1")
    r.storage2 = r.add_storage("storage2", root / "s2")
    r.site = r.git_repo(r.storage1, "storage1", "aviato/remote-site", {"index.html": b"<h1/>\n"})
    r.other = r.git_repo(r.storage2, "storage2", "hooli/other", {"README": b"other\n"})
    yield r
    w.kiln.stop()
    for storage in (r.storage1, r.storage2):
        storage.stop()


def rev(git_dir: Path, ref: str) -> str:
    return run(["git", "--git-dir", str(git_dir), "rev-parse", ref]).stdout.decode().strip()


def test_two_storage_servers_in_one_run(remote: Remote, tmp_path: Path) -> None:
    """Each repository on its own storage server, another account's too. (What every backend
    must do, ssh:// among them, is in test_backend_contract.)"""
    w = remote.world
    kiln = w.kiln
    clone = kiln.clone_with_commit(w.alice, "aviato/remote-site", tmp_path / "site", "new.txt")
    assert (clone / "index.html").read_bytes() == b"<h1/>\n"
    kiln.git(w.alice, "push", "-q", "origin", "HEAD:refs/heads/f", cwd=clone)
    assert rev(remote.site, "refs/heads/f") == rev(clone / ".git", "HEAD")
    other = tmp_path / "other"
    kiln.git(w.carol, "clone", "-q", kiln.url("hooli/other"), str(other))
    assert (other / "README").read_bytes() == b"other\n"


def test_pooling(remote: Remote, tmp_path: Path) -> None:
    w = remote.world
    storage = remote.add_storage("pooled", tmp_path / "pooled")
    try:
        remote.git_repo(storage, "pooled", "aviato/pooled", {"a.txt": b"a\n"})
        for i in range(10):
            w.kiln.git(w.alice, "clone", "-q", w.kiln.url("aviato/pooled"), str(tmp_path / f"s{i}"))
        assert storage.accepted() == 1, storage.log()

        def clone(i: int) -> bytes:
            target = tmp_path / f"c{i}"
            w.kiln.git(w.alice, "clone", "-q", w.kiln.url("aviato/pooled"), str(target))
            return (target / "a.txt").read_bytes()

        with ThreadPoolExecutor(max_workers=20) as pool:
            assert list(pool.map(clone, range(20))) == [b"a\n"] * 20
        assert storage.accepted() <= 3, storage.accepted()
    finally:
        storage.stop()


def wait_pools_closed(world: World) -> dict[str, int]:
    deadline = time.monotonic() + 20
    while True:
        worker = world.kiln.wait_idle()
        if worker["backend_connections"] == 0:
            return worker
        assert time.monotonic() < deadline, worker
        time.sleep(0.2)


def test_faults_end_one_session_and_leave_nothing_behind(remote: Remote, tmp_path: Path) -> None:
    w = remote.world
    before = wait_pools_closed(w)
    backend_down(remote)
    backend_hung(remote)
    backend_host_key_changed(remote, tmp_path)
    backend_killed_mid_clone(remote, tmp_path)
    # The worker still serves: other backends, the local one, and the same backend anew.
    kiln = w.kiln
    kiln.git(w.alice, "clone", "-q", kiln.url("aviato/remote-site"), str(tmp_path / "after1"))
    kiln.git(w.alice, "clone", "-q", kiln.url("aviato/website"), str(tmp_path / "after2"))
    kiln.git(w.carol, "clone", "-q", kiln.url("hooli/big"), str(tmp_path / "after3"))
    assert (tmp_path / "after3" / "big.bin").stat().st_size == 40 * 1024 * 1024
    assert settled(w, before) == (before["tasks"], before["fds"])
    assert "Traceback" not in kiln.log()


def settled(world: World, before: dict[str, int], timeout: float = 10) -> tuple[int, int]:
    """The worker's tasks and fds once they are back to `before`, or as they stand after
    `timeout`: sessions and pooled connections can be gone while the last one's transport
    still closes (a leak stays; a closing connection does not)."""
    deadline = time.monotonic() + timeout
    while True:
        after = wait_pools_closed(world)
        counts = (after["tasks"], after["fds"])
        if counts == (before["tasks"], before["fds"]) or time.monotonic() > deadline:
            return counts
        time.sleep(0.2)


def assert_unavailable(remote: Remote, repo: str) -> None:
    w = remote.world
    done = w.kiln.ssh(w.alice, f"git-upload-pack '{repo}'")
    assert done.returncode == 1
    assert re.match(UNAVAILABLE.format(repo), done.stderr.decode().strip()), done.stderr


def backend_down(remote: Remote) -> None:
    """Nothing listens on the port."""
    remote.cli("backends", "add", "down", f"ssh://root@127.0.0.1:{free_port()}/srv")
    remote.cli("repos", "add", "aviato/on-down", "--vcs", "git", "--backend", "down")
    assert_unavailable(remote, "aviato/on-down")
    remote.world.kiln.wait_for_log(r"backend down: cannot connect to 127\.0\.0\.1:\d+")


def backend_hung(remote: Remote) -> None:
    """The port accepts TCP (the kernel does, into the backlog) but never speaks SSH."""
    with socket.create_server(("127.0.0.1", 0), backlog=8) as silent:
        port = silent.getsockname()[1]
        remote.cli("backends", "add", "hung", f"ssh://root@127.0.0.1:{port}/srv")
        remote.cli("repos", "add", "aviato/on-hung", "--vcs", "git", "--backend", "hung")
        started = time.monotonic()
        assert_unavailable(remote, "aviato/on-hung")
        assert time.monotonic() - started < 6  # the 2 s dial timeout, not a hang


def backend_host_key_changed(remote: Remote, tmp_path: Path) -> None:
    """The server at the trusted address now presents another host key."""
    first = remote.add_storage("changed", tmp_path / "impostor")
    first.stop()
    (tmp_path / "impostor" / "ssh_host_ed25519_key").unlink()
    impostor = Sshd(tmp_path / "impostor", port=first.port)  # same address, new key
    impostor.start()
    try:
        remote.git_repo(impostor, "changed", "aviato/on-changed", {"x": b"x\n"})
        assert_unavailable(remote, "aviato/on-changed")
        assert impostor.accepted() == 0  # refused before authenticating
        remote.world.kiln.wait_for_log(r"backend changed: cannot connect .*(not trusted|verif)")
    finally:
        impostor.stop()


def backend_killed_mid_clone(remote: Remote, tmp_path: Path) -> None:
    """Every sshd process serving the storage connection dies in the middle of a clone."""
    kiln = remote.world.kiln
    big = remote.git_repo(remote.storage2, "storage2", "hooli/big", {"big.bin": random_bytes(40)})
    run(["git", "--git-dir", str(big), "repack", "-adq"])
    git = subprocess.Popen(
        ["git", "clone", "-q", kiln.url("hooli/big"), str(tmp_path / "big")],
        env=kiln.client_env(remote.world.carol), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    with git:
        deadline = time.monotonic() + 30
        while pack_bytes_received(tmp_path / "big") < 2_000_000:  # not a heartbeat's stale count
            assert time.monotonic() < deadline and git.poll() is None
            time.sleep(0.01)
        assert remote.storage2.kill_connections() > 0
        assert git.wait(timeout=60) != 0
        assert git.stderr is not None
        stderr = git.stderr.read()
    # SPEC: the "unavailable" message, or a failed clone with a non-zero exit.
    assert b"kilnproxy: storage for hooli/big is unavailable" in stderr or b"early EOF" in stderr
    kiln.wait_for_log(r"access .*repo=hooli/big .*exit=[1-9]\d*")


def random_bytes(mib: int) -> bytes:
    return os.urandom(mib * 1024 * 1024)


def test_trust_and_key_commands_speak_one_line_errors(remote: Remote, tmp_path: Path) -> None:
    kiln = remote.world.kiln
    argv = [*KILNPROXY, "backends", "trust", "local", "--config", str(kiln.config_path)]
    done = run(argv, env=kiln.server_env(), check=False)
    assert done.returncode == 2
    expected = "kilnproxy: error: backend 'local' is not an ssh:// backend"
    assert done.stderr.decode().strip() == expected
    # A known_hosts file that cannot be written (a directory there): one line, nothing left.
    config = tmp_path / "kilnproxy.toml"
    blocked = tmp_path / "known_hosts"
    blocked.mkdir()
    config.write_text(kiln.config_path.read_text().replace(
        "[backend_ssh]\n", f"[backend_ssh]\nknown_hosts = {json.dumps(str(blocked))}\n"
    ))  # fmt: skip
    argv = [*KILNPROXY, "backends", "trust", "storage1", "--config", str(config)]
    done = run(argv, env=kiln.server_env(), check=False)
    assert done.returncode == 2
    (line,) = done.stderr.decode().splitlines()
    assert line == f"kilnproxy: error: cannot update [backend_ssh] known_hosts {blocked}: " + (
        "Is a directory"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kilnproxy.toml", "known_hosts"]
