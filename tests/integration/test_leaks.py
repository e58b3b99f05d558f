"""Check 6: after 200 sequential sessions of every kind, tasks and fds are back to baseline; and
the storage agent's fds, processes and threads after sessions of every kind through it."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from agent import Agent, Pki
from conftest import World, make_world
from harness import Kiln, hold_tcp, run, seed_git, seed_hg

from kilnproxy.backends.local import KILL_GRACE


@pytest.fixture(scope="module")
def leaky(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    timeouts = {"login_grace": "1s", "idle": "1s"}
    w = make_world(tmp_path_factory.mktemp("leaks"), {"timeouts": timeouts})
    yield w
    w.kiln.stop()


def session_kinds(w: World, tmp_path: Path) -> list[Callable[[int], None]]:
    kiln = w.kiln

    def clone(i: int) -> None:
        kiln.git(w.alice, "clone", "-q", kiln.url("aviato/website"), str(tmp_path / f"c{i}"))

    def hg_clone(i: int) -> None:
        kiln.hg(w.bob, "clone", "-q", kiln.url("aviato/designs"), str(tmp_path / f"h{i}"))

    def advertisement(i: int) -> None:
        assert kiln.ssh(w.alice, "git-upload-pack 'aviato/website'", input=b"0000").returncode == 0

    def denied(i: int) -> None:
        assert kiln.ssh(w.carol, "git-upload-pack 'aviato/website'").returncode == 1

    def bad_command(i: int) -> None:
        assert kiln.ssh(w.alice, "rm -rf /").returncode == 128

    def unknown_key(i: int) -> None:
        assert kiln.ssh(w.stranger, "git-upload-pack 'aviato/website'").returncode == 255

    def shell(i: int) -> None:
        assert kiln.ssh(w.alice, "-T").returncode == 1

    def login_grace(i: int) -> None:
        assert asyncio.run(hold_tcp(kiln.port, 10)) < 5

    def idle(i: int) -> None:
        with kiln.ssh_popen(w.alice, "git-upload-pack 'aviato/website'") as client:
            assert client.wait(timeout=15) == 1

    def client_vanishes(i: int) -> None:
        with kiln.ssh_popen(w.alice, "hg -R aviato/designs serve --stdio") as client:
            assert client.stdin is not None and client.stdout is not None
            client.stdin.write(b"hello\n")
            assert client.stdout.readline()  # the backend runs; now the client is killed
            client.kill()

    common = [advertisement, denied, bad_command, unknown_key, shell, client_vanishes]
    rare = [clone, hg_clone, login_grace, idle]
    # 200 sessions: each rare kind 5 times, the rest spread evenly over the common kinds.
    plan: list[Callable[[int], None]] = []
    for i in range(200):
        plan.append(rare[(i // 10) % 4] if i % 10 == 0 else common[i % len(common)])
    return plan


def test_no_leaks_after_200_sessions(leaky: World, tmp_path: Path) -> None:
    before = leaky.kiln.wait_idle()
    plan = session_kinds(leaky, tmp_path)
    assert len(plan) == 200
    for i, session in enumerate(plan):
        session(i)
    after = leaky.kiln.wait_idle(served=before["sessions_total"] + 200)
    assert after["sessions_total"] - before["sessions_total"] >= 200
    assert (after["tasks"], after["fds"]) == (before["tasks"], before["fds"])
    assert "Traceback" not in leaky.kiln.log()


def agent_stats(agent: Agent) -> tuple[int, int, int]:
    """The agent's open fds, processes under it and threads."""
    assert agent.proc is not None
    process = psutil.Process(agent.proc.pid)
    return process.num_fds(), len(process.children(recursive=True)), process.num_threads()


def test_the_agent_is_back_to_its_baseline_after_every_kind_of_session(
    new_world: Callable[..., World], tmp_path: Path
) -> None:
    """The storage agent runs for months too: 60 sessions through it, of every kind that ends
    well or badly on its side (a command that fails, a path it refuses, a client that vanishes
    or is killed mid-clone, a proxy worker killed or restarted under a session, which ends the
    worker's connection to it), and its fds, processes and threads are what they were; so are
    the tasks and fds of the worker that served the last 40 (after the last such restart). Its
    memory per connection is tests/unit/test_agent_memory.py's."""
    pki = Pki(tmp_path / "pki")
    w = new_world({"backend_agent": pki.proxy_settings()})
    kiln = w.kiln
    agent = Agent(tmp_path / "agent", pki)
    agent.start()
    try:
        agent_repos(w, agent, tmp_path)
        kinds, worker_goes = agent_session_kinds(w, tmp_path)
        kiln.git(w.alice, "clone", "-q", kiln.url("aviato/on-agent"), str(tmp_path / "first"))
        kiln.wait_idle()
        before = agent_stats(agent)
        for i in range(60):
            if i in (5, 12, 19):  # killed, restarted, killed: then 40 more on the last worker
                worker_goes(i)
                worker = settled(kiln, 1)  # its first session, worker_goes's clone
                files = fd_targets(worker["pid"])
            else:
                kinds[i % len(kinds)](i)
        after = settled(kiln, worker["sessions_total"] + 40)
        # An aborted command is reaped once the grace before its group's SIGKILL has passed.
        deadline = time.monotonic() + KILL_GRACE + 3
        while agent_stats(agent) != before and time.monotonic() < deadline:
            time.sleep(0.1)
        assert agent_stats(agent) == before, agent.log()[-3000:]
        watched = ("pid", "tasks", "fds")
        first, last = [worker[k] for k in watched], [after[k] for k in watched]
        assert last == first, opened_since(files, after["pid"])
        assert "Traceback" not in agent.log() + kiln.log()
    finally:
        agent.stop()


def settled(kiln: Kiln, served: int) -> dict[str, Any]:
    """The worker's statistics once it has ended `served` sessions, has none open, and two
    heartbeats in a row give the same tasks and fds (a session's socket and task may go a
    moment after the heartbeat that counted it ended)."""
    worker = kiln.wait_idle(served=served)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        time.sleep(1.1)  # the next heartbeat
        again = kiln.wait_idle(served=served)
        if (again["tasks"], again["fds"]) == (worker["tasks"], worker["fds"]):
            return again
        worker = again
    raise AssertionError(f"the worker's tasks and fds did not settle: {worker}")


def fd_targets(pid: int) -> list[str]:
    fds = Path(f"/proc/{pid}/fd")
    return sorted(os.readlink(fd) for fd in fds.iterdir())


def opened_since(before: list[str], pid: int) -> str:
    now, then = Counter(fd_targets(pid)), Counter(before)
    return f"opened {sorted((now - then).elements())}, closed {sorted((then - now).elements())}"


def agent_repos(w: World, agent: Agent, tmp_path: Path) -> None:
    """On the agent: aviato/on-agent, aviato/big (8 MB), aviato/hg-on-agent; and routed to it,
    aviato/outside (outside its base) and aviato/absent (not on its disk)."""
    cli = w.kiln.cli

    def git_repo(name: str, files: dict[str, bytes], path: Path | None = None) -> None:
        where = path or agent.base / f"aviato/{name}.git"
        where.parent.mkdir(parents=True, exist_ok=True)
        run(["git", "init", "-q", "--bare", "--initial-branch=main", str(where)])
        seed_git(where, tmp_path / f"seed-{name}", files)
        extra = ["--path", str(path)] if path else []
        cli("repos", "add", f"aviato/{name}", "--vcs", "git", "--backend", "agent", *extra)

    cli("backends", "add", "agent", agent.url)
    git_repo("on-agent", {"README": b"hi\n"})
    git_repo("big", {f"f{i}": os.urandom(1 << 20) for i in range(8)})  # incompressible
    git_repo("outside", {"README": b"x\n"}, tmp_path / "outside.git")
    cli("repos", "add", "aviato/absent", "--vcs", "git", "--backend", "agent")
    hg = agent.base / "aviato" / "hg-on-agent"
    run(["hg", "init", str(hg)])
    seed_hg(hg, {"a.txt": b"a\n"})
    cli("repos", "add", "aviato/hg-on-agent", "--vcs", "hg", "--backend", "agent")


def agent_session_kinds(
    w: World, tmp_path: Path
) -> tuple[list[Callable[[int], None]], Callable[[int], None]]:
    """The kinds of session, in turn; and one that replaces the worker under a session."""
    kiln = w.kiln
    work = kiln.clone_with_commit(w.alice, "aviato/on-agent", tmp_path / "work", "start.txt")

    def clone(i: int) -> None:
        kiln.git(w.alice, "clone", "-q", kiln.url("aviato/on-agent"), str(tmp_path / f"c{i}"))

    def hg_clone(i: int) -> None:
        kiln.hg(w.alice, "clone", "-q", kiln.url("aviato/hg-on-agent"), str(tmp_path / f"h{i}"))

    def push(i: int) -> None:
        (work / f"{i}.txt").write_text(f"{i}\n")
        kiln.git(w.alice, "add", f"{i}.txt", cwd=work)
        kiln.git(w.alice, "commit", "-qm", f"push {i}", cwd=work)
        kiln.git(w.alice, "push", "-q", "origin", "HEAD:main", cwd=work)

    def refused(i: int) -> None:  # outside the agent's base; not on its disk
        for repo in ("aviato/outside", "aviato/absent"):
            assert kiln.ssh(w.alice, f"git-upload-pack '{repo}'", input=b"0000").returncode != 0

    def vanishes(i: int) -> None:
        with kiln.ssh_popen(w.alice, "hg -R aviato/hg-on-agent serve --stdio") as client:
            assert client.stdin is not None and client.stdout is not None
            client.stdin.write(b"hello\n")
            assert client.stdout.readline()
            client.kill()

    def killed_mid_clone(i: int) -> None:
        with kiln.ssh_popen(w.alice, "git-upload-pack 'aviato/big'") as client:
            assert client.stdout is not None and client.stdout.read(4)  # advertising
            client.kill()

    def worker_goes(i: int) -> None:
        """A session open while its worker is killed (the agent's connection is cut), or
        restarted by a HUP (it drains: the session ends, then the connection closes)."""
        with kiln.ssh_popen(w.alice, "hg -R aviato/hg-on-agent serve --stdio") as client:
            assert client.stdin is not None and client.stdout is not None
            client.stdin.write(b"hello\n")
            assert client.stdout.readline()
            old = kiln.worker()["pid"]
            if i % 2:
                os.kill(old, signal.SIGKILL)
            else:
                kiln.send(signal.SIGHUP)
                client.stdin.close()  # the session ends; the old worker can then exit
            client.wait(15)
        deadline = time.monotonic() + 20
        while kiln.wait_ready()[0] == old:
            assert time.monotonic() < deadline, "the worker was not replaced"
            time.sleep(0.05)
        clone(i)  # the new worker dials the agent

    return [clone, hg_clone, push, refused, vanishes, killed_mid_clone], worker_goes
