"""Faults (issue 12, item 3): the storage, the disk, a worker and the master failing mid-way.

Each case: the client of the failed session gets one clear line and a non-zero exit status,
sessions held on every other worker finish untouched, and nothing is left running (no child of
a worker, no process on the storage, no pooled connection, each surviving worker's tasks and fds
back where they were). A push cut at any point (by its client, its worker or its storage) leaves
the repository as it was before or after the push, never broken: `git fsck` passes, no ref lock
or hg journal is left behind, and the next push goes through.

The storage's cases run against both kinds of storage server: a real OpenSSH sshd (ssh://) and a
real `kilnproxy agent` (agent://, its CA made in the test's directory). Neighbouring cases live
elsewhere: test_agent (certificates refused both ways, paths outside the agent's base, its
drain), test_ssh_backend (a storage that is down, silent, or shows
another host key; its sshd connections killed mid-clone), test_master (a worker SIGKILLed while
a session waits; the workers of a dead master drain), test_local_backend (a command deaf to
SIGTERM), test_timeouts (dial and idle timeouts). `pytest -s` prints what each client saw.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
from agent import Agent, Pki
from conftest import World, make_world
from harness import Kiln, gone, run, seed_git, ssh_client_of, wait_until
from midway import Bystander, RawPush, bystanders, stalled_clone
from sshd import Sshd

from kilnproxy.cli.admin import add_repo

SIZE = 16 * 1024 * 1024  # a pack far larger than every window and buffer on the way
UNAVAILABLE = r"kilnproxy: storage for {} is unavailable, try again later \(session [0-9a-f]{{8}}\)"
STOP_CUT = (
    r"kilnproxy: server is shutting down and the drain timeout expired \(session [0-9a-f]{8}\)"
)
KILNPROXY_LINE = re.compile(r"^kilnproxy: .*$", re.M)


# The storage servers: each kind's backend name, and the prefix of its repositories' names.
BACKEND = {"ssh": "storage", "agent": "agent-storage"}
PREFIX = {"ssh": "remote", "agent": "agent"}
STORAGES = ("ssh", "agent")


@dataclass
class Rig:
    """A server with two workers, a storage sshd, a storage agent, and repositories on each
    backend."""

    world: World
    storage: Sshd
    agent: Agent
    paths: dict[str, Path] = field(default_factory=dict)  # each repository's, on its backend

    @property
    def kiln(self) -> Kiln:
        return self.world.kiln

    def server(self, kind: str) -> Sshd | Agent:
        return self.storage if kind == "ssh" else self.agent

    def server_of(self, repo: str) -> Sshd | Agent:
        return self.agent if repo.startswith("aviato/agent-") else self.storage

    def remote_repo(self, repo: str, files: dict[str, bytes]) -> Path:
        server = self.server_of(repo)
        path = server.base / f"{repo}.git"
        path.parent.mkdir(parents=True, exist_ok=True)
        run(["git", "init", "-q", "--bare", "--initial-branch=main", str(path)])
        seed_git(path, server.root / f"seed-{repo.replace('/', '-')}", files)
        backend = BACKEND["agent" if server is self.agent else "ssh"]
        with self.kiln.directory() as directory:
            add_repo(directory, repo, "git", backend, None, init=False)
        self.paths[repo] = path
        return path

    def local_repo(self, repo: str, files: dict[str, bytes]) -> Path:
        path = self.kiln.add_repo(repo, "git")
        seed_git(path, self.kiln.root / f"seed-{repo.replace('/', '-')}", files)
        self.paths[repo] = path
        return path


def kiln_cli(kiln: Kiln, *args: str) -> str:
    return kiln.cli(*args).stdout.decode()


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    root = tmp_path_factory.mktemp("faults")
    pki = Pki(root / "pki")
    agent_settings = {"pool_idle": "1s", "keepalive": "1s", **pki.proxy_settings()}
    settings: dict[str, dict[str, Any]] = {
        "workers": {"count": 2},
        "timeouts": {"dial": "2s"},
        "backend_ssh": {"pool_idle": "1s", "keepalive": "1s"},
        "backend_agent": agent_settings,
    }
    w = make_world(root / "kiln", settings)
    r = Rig(w, Sshd(root / "storage"), Agent(root / "agent", pki))
    r.storage.authorize(kiln_cli(w.kiln, "backends", "key").splitlines()[-1])
    r.storage.start()
    r.agent.start()
    kiln_cli(w.kiln, "backends", "add", "storage", r.storage.url)
    kiln_cli(w.kiln, "backends", "trust", "storage")
    kiln_cli(w.kiln, "backends", "add", "agent-storage", r.agent.url)
    payload = {"big.bin": os.urandom(SIZE)}  # incompressible: the pack is as large as the file
    for path in (
        r.remote_repo("aviato/remote-big", payload),
        r.remote_repo("aviato/agent-big", payload),
        r.local_repo("aviato/big", payload),
    ):
        run(["git", "--git-dir", str(path), "repack", "-adq"])
    for kind in STORAGES:
        r.remote_repo(f"aviato/{PREFIX[kind]}-small", {"README": b"small\n"})
        watch_pushes(r.remote_repo(f"aviato/{PREFIX[kind]}-pushed", {"README": b"pushed\n"}))
    watch_pushes(r.local_repo("aviato/pushed", {"README": b"pushed\n"}))
    yield r
    w.kiln.stop()
    r.storage.stop()
    r.agent.stop()


# -- what every case checks ----------------------------------------------------------------------


def worker_rows(kiln: Kiln) -> dict[int, dict[str, Any]]:
    return {int(row["index"]): row for row in kiln.workers()}


def quiet(rig: Rig, timeout: float = 15, pools: bool = True) -> dict[int, tuple[int, int]]:
    """Wait until no session or child process is left on any worker, and no git on the
    storage; and with `pools`, no pooled connection either (nothing at all on the storage).
    Return each worker's (tasks, fds)."""
    kiln = rig.kiln

    def settled() -> bool:
        rows = worker_rows(kiln).values()
        if any(r["sessions"] or r["state"] != "ready" for r in rows):
            return False
        if pools and any(r["backend_connections"] for r in rows):
            return False
        if any(psutil.Process(r["pid"]).children() for r in rows):
            return False
        left = rig.storage.processes() + rig.agent.processes()
        names = [name_of(p) for p in left]  # None: it ended since it was listed
        return not [n for n in names if n is not None and (pools or n != "sshd")]

    try:
        wait_until(settled, timeout, "quiet workers and storage")
    except AssertionError:
        left = rig.storage.processes() + rig.agent.processes()
        raise AssertionError(f"not quiet: {kiln.workers()}, on the storage: {left}") from None
    return {index: (r["tasks"], r["fds"]) for index, r in worker_rows(kiln).items()}


def name_of(process: psutil.Process) -> str | None:
    """A process's name, or None once it has ended (as it may between listing and asking)."""
    with contextlib.suppress(psutil.NoSuchProcess):
        name: str = process.name()
        return name
    return None


def back_to(rig: Rig, before: dict[int, tuple[int, int]], timeout: float = 15) -> None:
    """Nothing left running, and each worker in `before` back to its tasks and fds."""
    deadline = time.monotonic() + timeout
    while (after := quiet(rig, timeout)) != {**after, **before}:
        assert time.monotonic() < deadline, f"tasks and fds were {before}, are {after}"
        time.sleep(0.2)
    assert "Traceback" not in rig.kiln.log()


def told_once(stderr: str, pattern: str) -> None:
    """The client was told what happened in one line of kilnproxy's, and only one."""
    lines = KILNPROXY_LINE.findall(stderr)
    assert len(lines) == 1 and re.fullmatch(pattern, lines[0]), stderr


# -- the storage ---------------------------------------------------------------------------------


def untouched(held: dict[int, Bystander]) -> None:
    for bystander in held.values():
        bystander.finish()


@pytest.mark.parametrize("kind", STORAGES)
def test_storage_killed_mid_clone(rig: Rig, kind: str, tmp_path: Path) -> None:
    kiln, alice, server = rig.kiln, rig.world.alice, rig.server(kind)
    big, small = f"aviato/{PREFIX[kind]}-big", f"aviato/{PREFIX[kind]}-small"
    before = quiet(rig)
    try:
        with bystanders(kiln, alice) as held:
            with stalled_clone(kiln, alice, big, tmp_path / "clone") as clone:
                server.stop()  # the listener and every process serving a connection
                status, stderr = clone.resume()
            # While it is down, a new session is told the same, at once.
            started = time.monotonic()
            down = kiln.ssh(alice, f"git-upload-pack '{big}'")
            took = time.monotonic() - started
            untouched(held)
    finally:
        if server.proc is None:
            server.start()
    report(f"{kind} storage killed mid-clone", status, stderr)
    assert status != 0
    told_once(stderr, UNAVAILABLE.format(big))
    report(f"{kind} storage down", down.returncode, down.stderr.decode())
    assert down.returncode == 1 and took < 2, took
    told_once(down.stderr.decode(), UNAVAILABLE.format(big))
    kiln.git(alice, "clone", "-q", kiln.url(small), str(tmp_path / "after"))
    back_to(rig, before)


@contextlib.contextmanager
def frozen(processes: list[psutil.Process]) -> Iterator[None]:
    """SIGSTOP, then SIGCONT however the test went."""
    for process in processes:
        process.suspend()
    try:
        yield
    finally:
        for process in processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.resume()


# How each pool says a storage server stopped answering its keepalives.
KEEPALIVE_LOST = {
    "ssh": r"backend storage: connection lost \(.*[Kk]eepalive",
    "agent": r"backend agent-storage: keepalive timed out",
}


@pytest.mark.parametrize("kind", STORAGES)
def test_storage_stopped_mid_clone(rig: Rig, kind: str, tmp_path: Path) -> None:
    """A storage server that freezes is found by the keepalive: three unanswered asks."""
    kiln, alice, server = rig.kiln, rig.world.alice, rig.server(kind)
    big, small = f"aviato/{PREFIX[kind]}-big", f"aviato/{PREFIX[kind]}-small"
    before = quiet(rig)
    with bystanders(kiln, alice) as held:
        with stalled_clone(kiln, alice, big, tmp_path / "clone") as clone:
            storage = server.serving(worker_rows(kiln)[clone.worker]["pid"])
            assert storage, server.processes()
            with frozen(storage):
                started = time.monotonic()
                status, stderr = clone.resume()
                took = time.monotonic() - started
        untouched(held)
    report(f"{kind} storage stopped mid-clone", status, stderr)
    assert status != 0 and took < 10, took  # keepalive = 1s: found in 4 to 5 s
    told_once(stderr, UNAVAILABLE.format(big))
    kiln.wait_for_log(KEEPALIVE_LOST[kind])
    kiln.git(alice, "clone", "-q", kiln.url(small), str(tmp_path / "after"))
    back_to(rig, before)


@pytest.mark.parametrize("kind", STORAGES)
def test_storage_stopped_at_dial(rig: Rig, kind: str, tmp_path: Path) -> None:
    """The storage server (sshd, or the agent) is frozen while no connection to it is open:
    the kernel accepts the TCP connection into the backlog, and nobody speaks SSH or TLS on
    it. The dial timeout ends it."""
    kiln, alice, server = rig.kiln, rig.world.alice, rig.server(kind)
    small = f"aviato/{PREFIX[kind]}-small"
    before = quiet(rig)
    assert server.proc is not None
    with bystanders(kiln, alice) as held:
        with frozen([psutil.Process(server.proc.pid)]):
            started = time.monotonic()
            done = kiln.ssh(alice, f"git-upload-pack '{small}'")
            took = time.monotonic() - started
        untouched(held)
    report(f"{kind} storage stopped at dial", done.returncode, done.stderr.decode())
    assert done.returncode == 1 and 2 <= took < 6, took  # [timeouts] dial = 2s
    told_once(done.stderr.decode(), UNAVAILABLE.format(small))
    kiln.wait_for_log(rf"backend {BACKEND[kind]}: cannot connect to 127\.0\.0\.1:\d+: TimeoutError")
    kiln.git(alice, "clone", "-q", kiln.url(small), str(tmp_path / "after"))
    back_to(rig, before)


def test_storage_refuses_our_key(rig: Rig, tmp_path: Path) -> None:
    kiln, alice = rig.kiln, rig.world.alice
    before = quiet(rig)
    authorized = rig.storage.authorized_keys.read_text()
    with bystanders(kiln, alice) as held:
        rig.storage.authorized_keys.write_text("")  # the storage no longer knows our key
        try:
            done = kiln.ssh(alice, "git-upload-pack 'aviato/remote-small'")
        finally:
            rig.storage.authorized_keys.write_text(authorized)
        untouched(held)
    report("storage refuses our key", done.returncode, done.stderr.decode())
    assert done.returncode == 1
    told_once(done.stderr.decode(), UNAVAILABLE.format("aviato/remote-small"))
    kiln.wait_for_log(r"backend storage: cannot connect to 127\.0\.0\.1:\d+: PermissionDenied")
    kiln.git(alice, "clone", "-q", kiln.url("aviato/remote-small"), str(tmp_path / "after"))
    back_to(rig, before)


def test_repository_missing_on_the_storage(rig: Rig) -> None:
    """The directory names a repository that its storage does not have (removed behind our
    back). Whichever the storage (ssh://, agent:// or the local disk), kilnproxy looks first and
    says the storage is unavailable (SPEC 3): the client never sees the storage's path."""
    kiln, alice = rig.kiln, rig.world.alice
    before = quiet(rig)
    vanished = {
        "ssh": "aviato/remote-vanished",
        "agent": "aviato/agent-vanished",
        "local": "aviato/vanished",
    }
    for kind, repo in vanished.items():
        make = rig.local_repo if kind == "local" else rig.remote_repo
        run(["rm", "-rf", str(make(repo, {"README": b"here\n"}))])
    with bystanders(kiln, alice) as held:
        done = {
            kind: kiln.ssh(alice, f"git-upload-pack '{repo}'") for kind, repo in vanished.items()
        }
        untouched(held)
    for kind, repo in vanished.items():
        stderr = done[kind].stderr.decode()
        report(f"repository missing on the {kind} storage", done[kind].returncode, stderr)
        assert done[kind].returncode == 1
        told_once(stderr, UNAVAILABLE.format(repo))
        assert "/" + repo not in stderr
    back_to(rig, before)


# -- the local disk ------------------------------------------------------------------------------


@contextlib.contextmanager
def small_disk(where: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted at `where` (the tests run as root), always unmounted."""
    where.mkdir()
    run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)])
    try:
        yield where
    finally:
        if run(["umount", str(where)], check=False).returncode != 0:
            run(["umount", "-l", str(where)])  # still busy: detach it now, free it when idle


def commit_file(kiln: Kiln, key: Path, work: Path, name: str, data: bytes) -> str:
    (work / name).write_bytes(data)
    kiln.git(key, "add", name, cwd=work)
    kiln.git(key, "commit", "-qm", f"add {name}", cwd=work)
    return rev(work / ".git", "HEAD")


def test_local_disk_full_during_a_push(rig: Rig, tmp_path: Path) -> None:
    kiln, alice = rig.kiln, rig.world.alice
    before = quiet(rig)
    with small_disk(tmp_path / "disk", "2m") as disk:
        with kiln.directory() as directory:
            directory.add_backend("small", f"local://{disk}")
            add_repo(directory, "aviato/on-small", "git", "small", None, init=True)
        path = disk / "aviato" / "on-small.git"
        work = kiln.clone_with_commit(alice, "aviato/on-small", tmp_path / "work", "a.txt")
        kiln.git(alice, "push", "-q", "origin", "HEAD:main", cwd=work)
        old = rev(path, "main")
        commit_file(kiln, alice, work, "big.bin", os.urandom(4 * 1024 * 1024))  # twice the disk
        with bystanders(kiln, alice) as held:
            done = kiln.git(alice, "push", "origin", "HEAD:main", cwd=work, check=False)
            untouched(held)
        report("local disk full during a push", done.returncode, done.stderr.decode())
        assert done.returncode != 0
        assert "No space left on device" in done.stderr.decode(), done.stderr
        # As before the push: whole, on its old commit, and with its space given back.
        assert rev(path, "main") == old
        run(["git", "--git-dir", str(path), "fsck", "--no-progress"])
        kiln.git(alice, "reset", "-q", "--hard", "HEAD~1", cwd=work)
        small = commit_file(kiln, alice, work, "b.txt", b"b\n")
        kiln.git(alice, "push", "-q", "origin", "HEAD:main", cwd=work)
        assert rev(path, "main") == small
        back_to(rig, before)


# -- a worker, and the master --------------------------------------------------------------------


def test_worker_killed_mid_clone(rig: Rig, tmp_path: Path) -> None:
    kiln, alice = rig.kiln, rig.world.alice
    before = quiet(rig)
    with bystanders(kiln, alice) as held:
        with stalled_clone(kiln, alice, "aviato/big", tmp_path / "clone") as clone:
            victim = worker_rows(kiln)[clone.worker]["pid"]
            git = psutil.Process(victim).children(recursive=True)
            assert git, "the clone's git runs under the worker"
            os.kill(victim, signal.SIGKILL)
            status, stderr = clone.resume()
        held.pop(clone.worker).lost()
        untouched(held)
    report("worker killed mid-clone", status, stderr)
    # Nobody is left to say more than OpenSSH's client does: the connection broke.
    assert status != 0 and not KILNPROXY_LINE.search(stderr)
    # OpenSSH says it one of these ways, depending on whether it was writing or reading; or,
    # when the dead worker's socket simply closed, only git says that the stream broke.
    broke = (r"client_loop: send disconnect: Broken pipe|closed by remote host|Connection reset"
             r"|fetch-pack: unexpected disconnect|early EOF")  # fmt: skip
    assert re.search(broke, stderr), stderr
    for process in git:  # the dead worker's git, orphaned, ends on its broken pipe
        wait_until(gone(process.pid), 10, f"{process} to end")
    wait_until(lambda: victim not in [r["pid"] for r in kiln.workers()], 10, "a replacement")
    kiln.wait_ready()
    kiln.wait_for_log(rf"worker {clone.worker} \(pid {victim}\) died with status -9")
    del before[clone.worker]  # its replacement starts afresh
    back_to(rig, before)


def test_master_killed(rig: Rig, tmp_path: Path) -> None:
    """Workers whose master died drain (SPEC 6): a clone in flight finishes, a session that
    outlasts the drain timeout is cut with a line, then every worker exits; nothing is left."""
    w = make_world(tmp_path / "kiln", {"workers": {"count": 2}, "timeouts": {"drain": "3s"}})
    kiln, master = w.kiln, w.kiln.proc
    assert master is not None
    workers = [r["pid"] for r in kiln.workers()]
    try:
        big = kiln.add_repo("aviato/big", "git")
        run(["git", "--git-dir", str(big), "fetch", "-q", str(rig.paths["aviato/big"]), "main"])
        run(["git", "--git-dir", str(big), "update-ref", "refs/heads/main", "FETCH_HEAD"])
        with bystanders(kiln, w.alice) as held:
            with stalled_clone(kiln, w.alice, "aviato/big", tmp_path / "clone") as clone:
                pid = worker_rows(kiln)[clone.worker]["pid"]
                git = psutil.Process(pid).children(recursive=True)
                master.kill()
                assert master.wait(timeout=10) == -signal.SIGKILL
                killed = time.monotonic()
                assert clone.resume() == (0, "")
            cut = [other.lost() for other in held.values()]
        for pid in workers:
            wait_until(gone(pid), 10, f"worker {pid} to exit")
        exited_in = time.monotonic() - killed
    finally:
        master.kill()  # if the test failed before it did
        for pid in [p for p in workers if not gone(p)()]:
            os.kill(pid, signal.SIGKILL)
    assert (tmp_path / "clone" / "big.bin").stat().st_size == SIZE
    for status, stderr in cut:
        report("master killed: a session past the drain timeout", status, stderr)
        assert status == 1
        told_once(stderr, STOP_CUT)  # nothing replaces a dead master's workers
    assert exited_in < 3 + 3, exited_in  # the drain timeout, and a margin
    assert all(gone(process.pid)() for process in git)
    assert kiln.log().count("master gone, draining") == 2


# -- pushes cut at any point ---------------------------------------------------------------------

PUSH_SIZE = 3 * 1024 * 1024
# The hook marks the moment receive-pack holds the ref locks (the transaction is "prepared") and
# holds them a moment, so that a cut can land there on purpose rather than by luck.
LOCKED_HOOK = """#!/bin/sh
cat >/dev/null
if [ "$1" = prepared ]; then touch locked; sleep 0.3; fi
"""


def watch_pushes(path: Path) -> None:
    """Make a push's progress visible on the storage: index-pack for every push (its pack grows
    in a file), and the ref locks announced by the hook."""
    run(["git", "--git-dir", str(path), "config", "receive.unpackLimit", "1"])
    hook = path / "hooks" / "reference-transaction"
    hook.write_text(LOCKED_HOOK)
    hook.chmod(0o755)


def rev(path: Path, ref: str) -> str:
    return run(["git", "--git-dir", str(path), "rev-parse", ref]).stdout.decode().strip()


def git_in(git_dir: Path, *args: str, input: bytes | None = None) -> str:
    ident = {"GIT_AUTHOR_NAME": "Pusher", "GIT_AUTHOR_EMAIL": "p@example.com"}
    ident |= {"GIT_COMMITTER_NAME": "Pusher", "GIT_COMMITTER_EMAIL": "p@example.com"}
    argv = ["git", "--git-dir", str(git_dir), *args]
    return run(argv, env={**os.environ, **ident}, input=input).stdout.decode().strip()


def new_commit(path: Path, work: Path, old: str) -> tuple[str, bytes]:
    """A commit on top of `old` with a large new file, made outside the repository (which
    `work` borrows objects from), and the pack that a push of it sends."""
    run(["git", "clone", "-q", "--bare", "--shared", str(path), str(work)])
    blob = git_in(work, "hash-object", "-w", "--stdin", input=os.urandom(PUSH_SIZE))
    tree = git_in(work, "mktree", input=f"100644 blob {blob}\tpushed.bin\n".encode())
    new = git_in(work, "commit-tree", tree, "-p", old, "-m", "a push that is cut")
    argv = ["git", "--git-dir", str(work), "pack-objects", "--stdout", "--revs", "-q"]
    pack = run(argv, input=f"{new}\n^{old}\n".encode()).stdout
    return new, pack


def stored(path: Path) -> int | None:
    """How much of the pushed pack the storage has written, None before index-pack starts."""
    parts = list(path.glob("objects/tmp_objdir-incoming-*/pack/tmp_pack_*"))
    return sum(p.stat().st_size for p in parts) if parts else None


def push_until(push: RawPush, path: Path, pack: bytes, point: str) -> None:
    """Send the push up to `point`, and wait until the storage has taken it in."""
    if point == "commands":
        # Nothing shows on the storage before the pack's first byte: the proxy's count of
        # what it relayed says the commands went through (it writes in the pass it reads).
        wait_until(lambda: push.relayed() >= push.sent, 10, "the commands to be relayed")
    elif point == "half":
        push.send(pack[: len(pack) // 2])
        wait_until(lambda: (stored(path) or 0) >= len(pack) // 2 - 65536, 10, "half the pack")
    elif point == "locked":
        push.send(pack)
        wait_until((path / "locked").exists, 10, "the ref locks")
    else:
        push.send(pack)
        assert push.read_until_flush() == [b"unpack ok\n", b"ok refs/heads/main\n"]


@dataclass(frozen=True)
class Cut:
    how: str  # who breaks: the client, the worker (SIGKILL) or the storage (sshd or agent killed)
    repo: str
    point: str  # commands sent; half the pack; all of it, refs locked; reported done

    def __str__(self) -> str:
        return f"{self.how}-{self.repo.split('/')[1]}-{self.point}"


POINTS = ("commands", "half", "locked", "reported")
PUSHED = ("aviato/pushed", "aviato/remote-pushed", "aviato/agent-pushed")
CUTS = [
    *(Cut("client", repo, p) for repo in PUSHED for p in POINTS),
    *(Cut("worker", "aviato/pushed", p) for p in ("commands", "half", "locked")),
    *(Cut("storage", repo, p) for repo in PUSHED[1:] for p in ("commands", "half", "reported")),
]


def cut_push(rig: Rig, push: RawPush, cut: Cut) -> None:
    kiln = rig.kiln
    if cut.how == "client":
        push.client.kill()
    elif cut.how == "storage":
        assert rig.server_of(cut.repo).kill_connections() > 0
    else:
        pid = worker_rows(kiln)[push.worker()]["pid"]
        children = psutil.Process(pid).children(recursive=True)
        os.kill(pid, signal.SIGKILL)
        for child in children:  # git, left to itself: it must end on its own
            wait_until(gone(child.pid), 10, f"{child} to end after its worker")
        wait_until(lambda: pid not in [r["pid"] for r in kiln.workers()], 10, "a replacement")
        kiln.wait_ready()
    status = push.client.wait(timeout=20)
    stderr = push.close().decode(errors="replace")
    report(f"push cut: {cut}", status, stderr)
    if cut.how == "storage" and cut.point != "reported":
        assert status == 1
        told_once(stderr, UNAVAILABLE.format(cut.repo))


@pytest.mark.parametrize("cut", CUTS, ids=str)
def test_push_cut_at_any_point(rig: Rig, cut: Cut, tmp_path: Path) -> None:
    kiln, alice = rig.kiln, rig.world.alice
    path = rig.paths[cut.repo]
    quiet(rig, pools=False)
    old = rev(path, "main")
    new, pack = new_commit(path, tmp_path / "work", old)
    (path / "locked").unlink(missing_ok=True)
    push = RawPush(kiln, alice, cut.repo)
    try:
        assert push.advertised[0].startswith(f"{old} refs/heads/main\0".encode())
        push.update("refs/heads/main", old, new)
        if cut.how == "worker":
            push.worker()  # while its row can still be seen
        push_until(push, path, pack, cut.point)
        cut_push(rig, push, cut)
    finally:
        push.close()
    quiet(rig, pools=False)
    # Before or after, never broken: whole objects, no ref lock left, and the next push works.
    expected = {"reported": {new}, "locked": {old, new}}.get(cut.point, {old})
    assert rev(path, "main") in expected
    run(["git", "--git-dir", str(path), "fsck", "--no-progress"])
    assert not list(path.glob("**/*.lock")), list(path.glob("**/*.lock"))
    kiln.git(alice, "--git-dir", str(tmp_path / "work"), "push", "-q", kiln.url(cut.repo),
             f"{new}:refs/heads/main")  # fmt: skip
    assert rev(path, "main") == new


def test_hg_push_cut_in_its_transaction(rig: Rig, tmp_path: Path) -> None:
    """hg's transaction journal: a serve killed inside it leaves "abandoned transaction found",
    and every later push refused until `hg recover`; ended with SIGTERM, hg rolls back."""
    kiln, alice, repo = rig.kiln, rig.world.alice, rig.world.designs
    quiet(rig, pools=False)
    work = tmp_path / "designs"
    kiln.hg(alice, "clone", "-q", kiln.url("aviato/designs"), str(work))
    old = hg_tip(repo)
    (work / "big.bin").write_bytes(os.urandom(PUSH_SIZE))
    kiln.hg(alice, "commit", "-qA", "-m", "a push that is cut", cwd=work)
    slow = "[hooks]\npretxnchangegroup.cut = touch in-transaction && sleep 2\n"
    (repo / ".hg" / "hgrc").write_text(slow)
    try:
        ssh = " ".join(kiln.ssh_argv(alice))
        with subprocess.Popen(
            ["hg", "--config", f"ui.ssh={ssh}", "push", "-q"], cwd=work, env=kiln.client_env(alice),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        ) as push:  # fmt: skip
            client = ssh_client_of(push)
            wait_until((repo / "in-transaction").exists, 20, "the push's transaction")
            client.kill()
            assert push.wait(timeout=20) != 0
    finally:
        (repo / ".hg" / "hgrc").unlink()
        (repo / "in-transaction").unlink(missing_ok=True)
    quiet(rig, pools=False)
    assert hg_tip(repo) == old and not (repo / ".hg" / "store" / "journal").exists()
    run(["hg", "-R", str(repo), "verify", "-q"])
    kiln.hg(alice, "push", "-q", cwd=work)
    assert hg_tip(repo) == hg_tip(work)


def hg_tip(repo: Path) -> str:
    return run(["hg", "-R", str(repo), "log", "-r", "tip", "-T", "{node}"]).stdout.decode()


def report(case: str, status: int, stderr: str) -> None:
    """What the client saw, in the test's output (pytest -s shows it)."""
    print(f"\n[{case}] exit {status}\n{stderr.rstrip()}")
