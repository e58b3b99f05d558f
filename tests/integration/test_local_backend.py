"""The local backend's processes (SPEC 5): an aborted command ends, and all it started with it.

A command is aborted when its client leaves or its session is cut. It gets SIGTERM, so that git
and hg clean up after themselves (test_faults shows a push cut at any point leaves the repository
whole), and SIGKILL only if it is still there after KILL_GRACE. Here: a command that ignores
SIGTERM, as a hung hook might.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
import uvloop
from harness import gone, loop_ticks, wait_until
from sinks import RecordingSink

from kilnproxy.backends.base import BackendRequest, BackendStream
from kilnproxy.backends.local import KILL_GRACE, LocalBackend, start_command, write_hook_rc
from kilnproxy.backends.threads import DiskChecks
from kilnproxy.directory.model import Identity, Route
from kilnproxy.errors import BackendError
from kilnproxy.policy.access import Access, Role
from kilnproxy.policy.commands import Vcs, Verb

DEAF_GIT = """#!/bin/sh
trap '' TERM
sleep 60 &
echo started
wait
"""


def test_a_command_deaf_to_sigterm_is_killed_after_the_grace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An aborted local command gets SIGTERM, it and everything it started; whatever is still
    running KILL_GRACE later gets SIGKILL. No callback reaches the relay after the abort."""
    fake = tmp_path / "bin" / "git"
    fake.parent.mkdir()
    fake.write_text(DEAF_GIT)
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    route = Route("aviato/deaf", Vcs.GIT, "local", "local:///", str(tmp_path), Access.READ)
    who = Identity("aviato", "alice", Role.READ, "laptop", "SHA256:x")
    request = BackendRequest("0badf00d", Verb.UPLOAD_PACK, route, who, None)
    sink = RecordingSink()

    async def abort_and_watch() -> tuple[list[str], float]:
        stream = await LocalBackend("local", tmp_path / "state").open(request, sink)
        await asyncio.wait_for(sink.spoke.wait(), 10)  # "started": the sleep is forked
        running = ["git", "sleep"]  # once the fork has exec'd
        wait_until(lambda: names_of(command_group(fake)) == running, 10, "the sleep to start")
        return await aborted(stream, command_group(fake))

    deaf, ended = uvloop.run(abort_and_watch())
    assert deaf == ["git", "sleep"]  # SIGTERM reached both, and both ignored it
    assert KILL_GRACE <= ended < KILL_GRACE + 1
    assert sink.ended == []


async def aborted(stream: BackendStream, group: list[psutil.Process]) -> tuple[list[str], float]:
    """Abort `stream`: which of `group` are still running half a second later, and how long
    after the abort the last of them went."""
    stream.abort()
    started = time.monotonic()
    await asyncio.sleep(0.5)
    left = [p.name() for p in group if not gone(p.pid)()]
    while not all(gone(p.pid)() for p in group):
        assert time.monotonic() - started < KILL_GRACE + 5, group
        await asyncio.sleep(0.05)
    return left, time.monotonic() - started


def names_of(processes: list[psutil.Process]) -> list[str]:
    return [p.name() for p in processes]


def command_group(script: Path) -> list[psutil.Process]:
    """The process group of the command running `script`, among this process's children."""
    children = psutil.Process().children(recursive=True)
    leader = next(p for p in children if str(script) in " ".join(p.cmdline()))
    return [p for p in children if os.getpgid(p.pid) == leader.pid]


def test_a_command_starts_outside_its_repository(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The spawn waits for its child to exec: a child that entered the repository first would
    hold the loop as long as a disk that does not answer holds it. So the command starts in /,
    with the path in its arguments, and git (or hg) enters it itself."""
    fake = tmp_path / "bin" / "git"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\necho "$PWD $2"\n')  # `git upload-pack PATH`
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    repository = tmp_path / "site.git"
    repository.mkdir()
    route = Route("aviato/site", Vcs.GIT, "local", "local:///", str(repository), Access.READ)
    who = Identity("aviato", "alice", Role.READ, "laptop", "SHA256:x")
    sink = RecordingSink()

    async def run() -> None:
        request = BackendRequest("0badf00d", Verb.UPLOAD_PACK, route, who, None)
        stream = await LocalBackend("local", tmp_path / "state").open(request, sink)
        await asyncio.wait_for(sink.spoke.wait(), 10)
        for _ in range(500):  # until it has exited, and its transport with it
            if sink.ended:
                break
            await asyncio.sleep(0.01)
        stream.abort()

    uvloop.run(run())
    assert sink.stdout.decode().split() == ["/", str(repository)]


def test_a_repository_on_a_disk_that_does_not_answer_holds_only_its_own_session(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check that the repository is there reads its disk in a thread: on a hung mount the
    session fails after DiskChecks' time, the worker's loop (every other session) running
    meanwhile."""
    stuck = threading.Event()

    def hung(path: Path) -> str | None:
        stuck.wait(10)  # a stat on a mount that does not answer
        return None

    monkeypatch.setattr("kilnproxy.backends.local.absent", hung)
    route = Route("aviato/site", Vcs.GIT, "local", "local:///", str(tmp_path), Access.READ)
    who = Identity("aviato", "alice", Role.READ, "laptop", "SHA256:x")
    request = BackendRequest("0badf00d", Verb.UPLOAD_PACK, route, who, None)

    async def run() -> tuple[str, int]:
        backend = LocalBackend("local", tmp_path / "state")
        backend.disk = DiskChecks(within=1.0)
        async with loop_ticks() as ticks:
            with pytest.raises(BackendError) as failed:
                await backend.open(request, RecordingSink())
        return failed.value.detail, ticks[0]

    try:
        detail, ticks = uvloop.run(run())
    finally:
        stuck.set()
    assert detail == f"repository path {tmp_path}: the disk did not answer within 1s"
    assert ticks >= 10  # 1 s of a loop that was never held


def fake_git(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, script: str) -> Path:
    fake = tmp_path / "bin" / "git"
    fake.parent.mkdir()
    fake.write_text(script)
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    return fake


def upload_pack(tmp_path: Path) -> BackendRequest:
    route = Route("aviato/site", Vcs.GIT, "local", "local:///", str(tmp_path), Access.READ)
    who = Identity("aviato", "alice", Role.READ, "laptop", "SHA256:x")
    return BackendRequest("0badf00d", Verb.UPLOAD_PACK, route, who, None)


def test_a_start_cancelled_at_any_point_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client leaves while its command starts: the start is cancelled wherever it waits,
    and raises CancelledError (not an error of its own), leaving no descriptor open, and no
    process once the grace of those it started has passed."""
    fake_git(tmp_path, monkeypatch, "#!/bin/sh\nexec sleep 30\n")
    hook_rc = write_hook_rc(tmp_path / "state")
    children = {child.pid for child in psutil.Process().children()}

    async def cancelled_after(steps: int, counted: bool) -> None:
        fds = len(os.listdir("/proc/self/fd"))
        starting = start_command(Verb.UPLOAD_PACK, tmp_path, {}, hook_rc, "aviato/site",
                                 RecordingSink())  # fmt: skip
        opening = asyncio.ensure_future(starting)
        for _ in range(steps):
            await asyncio.sleep(0)
        if opening.done():  # started before the cancel came: its client leaves all the same
            (await opening).abort()
        else:
            opening.cancel()
            with pytest.raises(asyncio.CancelledError):
                await opening
        for _ in range(100):  # the loop lets go of what it closes; a command ends on SIGTERM
            if len(os.listdir("/proc/self/fd")) == fds:
                break
            await asyncio.sleep(0.02)
        assert len(os.listdir("/proc/self/fd")) == fds or not counted, steps

    async def run() -> None:
        for counted in (False, True):  # uvloop keeps a /dev/null of its own from the first
            for steps in range(8):
                await cancelled_after(steps, counted)
        await asyncio.sleep(KILL_GRACE + 0.2)  # the aborted ones' groups are killed, reaped

    uvloop.run(run())
    assert {child.pid for child in psutil.Process().children()} <= children


BACKGROUND_JOB = """#!/bin/sh
ls /proc/self/fd
nohup sleep 30 </dev/null >/dev/null 2>&1 &
echo "$!" > "$0.job"
"""


def test_a_hooks_background_job_does_not_hold_the_session(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A command gets its three streams and no other descriptor. A hook's job sent to the
    background with its streams closed (`nohup ci-trigger </dev/null >/dev/null 2>&1 &`) held
    a second copy of the command's stdout that uvloop's spawn left it, and the push with it,
    until the job ended."""
    fake = fake_git(tmp_path, monkeypatch, BACKGROUND_JOB)
    sink = RecordingSink()

    async def run() -> float:
        started = time.monotonic()
        stream = await LocalBackend("local", tmp_path / "state").open(upload_pack(tmp_path), sink)
        while not sink.ended:
            assert time.monotonic() - started < 10, "the session is held"
            await asyncio.sleep(0.01)
        stream.abort()
        return time.monotonic() - started

    try:
        took = uvloop.run(run())
    finally:
        job = fake.with_name("git.job")
        if job.exists():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(job.read_text()), signal.SIGKILL)
    assert sink.ended == ["exit 0"] and took < 5
    # ls's own listing of its directory is its 3; nothing else came from the worker.
    assert sink.stdout.decode().split() == ["0", "1", "2", "3"]


DEAF_CHILD = """#!/bin/sh
( trap '' TERM; exec sleep 60 ) &
echo started
sleep 60
"""


def test_what_an_aborted_command_started_goes_even_when_the_command_is_gone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM ends the command; a child of its that ignores it (a hook's) is still the
    session's, and gets SIGKILL after KILL_GRACE all the same."""
    fake = fake_git(tmp_path, monkeypatch, DEAF_CHILD)
    sink = RecordingSink()

    async def run() -> tuple[list[str], float]:
        stream = await LocalBackend("local", tmp_path / "state").open(upload_pack(tmp_path), sink)
        await asyncio.wait_for(sink.spoke.wait(), 10)
        running = ["git", "sleep", "sleep"]
        wait_until(lambda: sorted(names_of(command_group(fake))) == running, 10, "the sleeps")
        return await aborted(stream, command_group(fake))

    outlived, ended = uvloop.run(run())
    assert outlived == ["sleep"]  # the command and its other child took the SIGTERM
    assert KILL_GRACE <= ended < KILL_GRACE + 1
    assert sink.ended == []
