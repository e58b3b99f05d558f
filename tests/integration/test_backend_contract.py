"""The backend contract (SPEC 5), one suite for every kind of backend: local, ssh:// (a real
OpenSSH sshd) and agent:// (a real `kilnproxy agent`, its own CA in the test's directory).

Whatever runs the command, the client sees the same: clone, push and hg through the proxy, a
read-only hg push refused by the read-only hook, the command's stderr and exit status, the
session's environment, and flow control: a client that stops reading stops the command, and
nothing on the way buffers the clone.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from agent import Agent, Pki
from conftest import World, make_world
from harness import pack_bytes_received, run, seed_git, seed_hg, ssh_client_of
from sshd import Sshd

from kilnproxy.backends.local import READ_ONLY_HOOK

KINDS = ("local", "ssh", "agent")
FLOW_SIZE = 64 * 1024 * 1024
UNAVAILABLE = (
    r"kilnproxy: storage for {} is unavailable, try again later \(session [0-9a-f]{{8}}\)\n"
)
RSS_BOUND = 16 * 1024 * 1024


@dataclass
class Storage:
    kind: str
    backend: str  # its name in the directory
    base: Path  # where its repositories are, on disk
    server: Sshd | Agent | None  # None: the proxy's own disk


@dataclass
class Contract:
    world: World
    storages: dict[str, Storage]

    def cli(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        return self.world.kiln.cli(*args)

    def git_repo(self, storage: Storage, name: str, files: dict[str, bytes]) -> tuple[str, Path]:
        repo = f"aviato/{storage.kind}-{name}"
        path = storage.base / f"{repo}.git"
        path.parent.mkdir(parents=True, exist_ok=True)
        run(["git", "init", "-q", "--bare", "--initial-branch=main", str(path)])
        seed_git(path, storage.base.parent / f"seed-{repo.replace('/', '-')}", files)
        self.cli("repos", "add", repo, "--vcs", "git", "--backend", storage.backend)
        return repo, path

    def hg_repo(self, storage: Storage, name: str, files: dict[str, bytes]) -> tuple[str, Path]:
        repo = f"aviato/{storage.kind}-{name}"
        path = storage.base / repo
        path.parent.mkdir(parents=True, exist_ok=True)
        run(["hg", "init", str(path)])
        seed_hg(path, files)
        if storage.kind == "ssh":
            # A stock sshd knows nothing of kilnproxy: the storage's own guard for hg pushes
            # is the hook kilnproxy documents for operators. Local and agent bring it along.
            (path / ".hg" / "hgrc").write_text(READ_ONLY_HOOK)
        self.cli("repos", "add", repo, "--vcs", "hg", "--backend", storage.backend)
        return repo, path


@pytest.fixture(scope="module")
def contract(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Contract]:
    root = tmp_path_factory.mktemp("contract")
    pki = Pki(root / "pki")
    settings = {"timeouts": {"dial": "2s"}, "backend_agent": pki.proxy_settings()}
    w = make_world(root / "kiln", settings)
    c = Contract(w, {})
    try:
        local = root / "local" / "srv"
        local.mkdir(parents=True)
        c.cli("backends", "add", "local-storage", f"local://{local}")
        c.storages["local"] = Storage("local", "local-storage", local, None)
        sshd = Sshd(root / "ssh")
        sshd.authorize(c.cli("backends", "key").stdout.decode().splitlines()[-1])
        sshd.start()
        c.cli("backends", "add", "ssh-storage", sshd.url)
        c.cli("backends", "trust", "ssh-storage")
        c.storages["ssh"] = Storage("ssh", "ssh-storage", sshd.base, sshd)
        agent = Agent(root / "agent", pki)
        agent.start()
        c.cli("backends", "add", "agent-storage", agent.url)
        c.storages["agent"] = Storage("agent", "agent-storage", agent.base, agent)
        yield c
    finally:
        w.kiln.stop()
        for storage in c.storages.values():
            if storage.server is not None:
                storage.server.stop()


@pytest.fixture(params=KINDS)
def storage(request: pytest.FixtureRequest, contract: Contract) -> Storage:
    found: Storage = contract.storages[request.param]
    return found


def rev(git_dir: Path, ref: str) -> str:
    return run(["git", "--git-dir", str(git_dir), "rev-parse", ref]).stdout.decode().strip()


def test_git_and_hg(contract: Contract, storage: Storage, tmp_path: Path) -> None:
    w = contract.world
    kiln = w.kiln
    repo, site = contract.git_repo(storage, "site", {"index.html": b"<h1/>\n"})
    clone = kiln.clone_with_commit(w.alice, repo, tmp_path / "site", "new.txt")
    assert (clone / "index.html").read_bytes() == b"<h1/>\n"
    v2 = ("-c", "protocol.version=2")
    kiln.git(w.alice, *v2, "push", "-q", "origin", "HEAD:refs/heads/f", cwd=clone)
    assert rev(site, "refs/heads/f") == rev(clone / ".git", "HEAD")
    kiln.git(w.alice, *v2, "fetch", "-q", "origin", cwd=clone)
    assert rev(clone / ".git", "origin/f") == rev(site, "refs/heads/f")

    repo, designs = contract.hg_repo(storage, "designs", {"logo.svg": b"<svg/>\n"})
    hg = tmp_path / "designs"
    kiln.hg(w.alice, "clone", "-q", kiln.url(repo), str(hg))
    (hg / "banner.svg").write_text("<svg>b</svg>\n")
    kiln.hg(w.alice, "commit", "-A", "-m", "banner", cwd=hg)
    kiln.hg(w.alice, "push", cwd=hg)
    tip = ["hg", "log", "-r", "tip", "-T", "{node}"]
    assert run([*tip, "-R", str(designs)]).stdout == run([*tip, "-R", str(hg)]).stdout
    kiln.hg(w.alice, "pull", "-q", cwd=hg)


def test_read_only_hg_push_is_refused(contract: Contract, storage: Storage, tmp_path: Path) -> None:
    w = contract.world
    repo, designs = contract.hg_repo(storage, "ro-designs", {"logo.svg": b"<svg/>\n"})
    hg = tmp_path / "designs"
    w.kiln.hg(w.bob, "clone", "-q", w.kiln.url(repo), str(hg))
    (hg / "bob.svg").write_text("<svg/>\n")
    w.kiln.hg(w.bob, "commit", "-A", "-m", "bob", cwd=hg)
    tip = ["hg", "-R", str(designs), "log", "-r", "tip", "-T", "{node}"]
    before = run(tip).stdout
    done = w.kiln.hg(w.bob, "push", cwd=hg, check=False)
    assert done.returncode != 0
    text = (done.stdout + done.stderr).decode()
    assert f"kilnproxy: you have read-only access to '{repo}'" in text
    assert run(tip).stdout == before


ENV_HOOK = """#!/bin/sh
env | grep -E '^(KILNPROXY_[A-Z]+)=' | sort | sed 's/^/env: /' >&2
echo 'pushes are frozen for the release' >&2
exit 1
"""


def test_stderr_exit_status_and_environment(
    contract: Contract, storage: Storage, tmp_path: Path
) -> None:
    w = contract.world
    repo, site = contract.git_repo(storage, "frozen", {"index.html": b"<h1/>\n"})
    hook = site / "hooks" / "pre-receive"
    hook.write_text(ENV_HOOK)
    hook.chmod(0o755)
    clone = w.kiln.clone_with_commit(w.alice, repo, tmp_path / "c", "x.txt")
    done = w.kiln.git(w.alice, "push", "origin", "HEAD:refs/heads/frozen", cwd=clone, check=False)
    assert done.returncode != 0
    stderr = done.stderr.decode()
    assert "remote: pushes are frozen for the release" in stderr
    assert "pre-receive hook declined" in stderr
    env = dict(re.findall(r"^remote: env: (KILNPROXY_[A-Z]+)=(.*?)\s*$", stderr, re.M))
    session = env.pop("KILNPROXY_SESSION", "")
    assert re.fullmatch(r"[0-9a-f]{8}", session), stderr
    assert env == {
        "KILNPROXY_ACCESS": "write",
        "KILNPROXY_ACCOUNT": "aviato",
        "KILNPROXY_REPO": repo,
        "KILNPROXY_USER": "alice",
    }
    # GIT_PROTOCOL is passed on: upload-pack answers a v2 capability advertisement.
    reply = w.kiln.ssh(w.alice, "-o", "SetEnv=GIT_PROTOCOL=version=2",
                       f"git-upload-pack '{repo}.git'", input=b"0000")  # fmt: skip
    assert reply.returncode == 0, reply.stderr
    assert reply.stdout.startswith(b"000eversion 2\n")
    # A failing command: the storage's own git says so, with its status.
    done = w.kiln.ssh(w.alice, f"git-upload-pack '{repo}.git'", input=b"not a pkt-line")
    assert done.returncode == 128, done
    assert "protocol error" in done.stderr.decode()


def test_a_missing_repository_is_the_storages_failure(contract: Contract, storage: Storage) -> None:
    """The directory names a repository its storage does not have: every backend looks first,
    and the client is told the storage is unavailable (SPEC 3), never git's or hg's words with
    the storage's path in them; the proxy's log says which path is missing."""
    w = contract.world
    unavailable = UNAVAILABLE.replace("[0-9a-f]{{8}}", "([0-9a-f]{{8}})")  # the session, kept
    for vcs, command in (("git", "git-upload-pack '{}.git'"), ("hg", "hg -R {} serve --stdio")):
        ghost = f"aviato/{storage.kind}-ghost-{vcs}"
        contract.cli("repos", "add", ghost, "--vcs", vcs, "--backend", storage.backend)
        done = w.kiln.ssh(w.alice, command.format(ghost))
        assert done.returncode == 1, done
        told = re.fullmatch(unavailable.format(ghost), done.stderr.decode())
        assert told, done.stderr
        path = re.escape(f"{storage.base}/{ghost}")
        w.kiln.wait_for_log(rf"\[{told[1]}\] backend {storage.backend} failed: .*{path}")


def bytes_out(world: World, repo: str) -> int:
    return sum(int(r["bytes_out"]) for r in world.kiln.connections() if r["repo"] == repo)


def test_stalled_client_does_not_grow_the_worker(
    contract: Contract, storage: Storage, tmp_path: Path
) -> None:
    """Check 7: a client that stops reading mid-clone does not make the worker (nor an agent)
    buffer the clone: the command on the storage stops with it."""
    world = contract.world
    kiln = world.kiln
    payload = os.urandom(FLOW_SIZE)  # incompressible: the pack is as large as the file
    repo, big = contract.git_repo(storage, "big", {"big.bin": payload})
    run(["git", "--git-dir", str(big), "repack", "-adq"])
    server = storage.server
    agent = psutil.Process(server.proc.pid) if isinstance(server, Agent) and server.proc else None

    rss_before = kiln.worker()["rss"]
    agent_before = agent.memory_info().rss if agent else 0
    clone = tmp_path / "clone"
    git = subprocess.Popen(
        ["git", "clone", "-q", kiln.url(repo), str(clone)],
        env=kiln.client_env(world.alice), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    ssh = ssh_client_of(git)
    deadline = time.monotonic() + 60
    while pack_bytes_received(clone) < 8 * 1024 * 1024:  # the client's count: heartbeats lag
        assert time.monotonic() < deadline, "the clone never started receiving"
        time.sleep(0.01)
    ssh.suspend()  # the client stops reading: its socket and the SSH window fill up
    try:
        time.sleep(2.5)  # buffers fill, and two heartbeats bring the worker's counts up to date
        stalled_at = bytes_out(world, repo)
        peak = rss_before
        agent_peak = agent_before
        for _ in range(25):
            peak = max(peak, kiln.worker()["rss"])
            agent_peak = max(agent_peak, agent.memory_info().rss if agent else 0)
            time.sleep(0.1)
        assert bytes_out(world, repo) - stalled_at < 4 * 1024 * 1024, "the relay kept reading"
        assert stalled_at < FLOW_SIZE // 2, "the clone was not stalled mid-transfer"
    finally:
        ssh.resume()
    assert git.wait(timeout=300) == 0, git.stderr.read() if git.stderr else b""
    if git.stderr:
        git.stderr.close()
    assert peak - rss_before < RSS_BOUND, f"worker RSS grew by {(peak - rss_before) >> 20} MiB"
    grew = agent_peak - agent_before
    assert grew < RSS_BOUND, f"agent RSS grew by {grew >> 20} MiB"
    digest = hashlib.sha256((clone / "big.bin").read_bytes()).hexdigest()
    assert digest == hashlib.sha256(payload).hexdigest()
    kiln.wait_for_log(rf"access .*repo={repo} .*exit=0 outcome=ok")
