"""The local backend (SPEC 5): git and hg run as subprocesses on the proxy host.

Owns the subprocesses it starts, and nothing else. The relay's flow control maps directly onto
the pipes: a full stdin pipe pauses the client channel, a paused client pauses reading stdout
and stderr, so no bytes pile up here. A command that is aborted (its client left, or it was cut)
loses its pipes and gets SIGTERM, with everything it started (its process group): git and hg
remove their lock files and temporary objects on SIGTERM, so a push cut at any point leaves the
repository as it was before or after. It must never be SIGKILLed first: a receive-pack killed
while it holds a ref's lock leaves `refs/heads/X.lock` behind, and every later push to that
branch fails until an administrator removes it. SIGKILL comes only after KILL_GRACE.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import subprocess
from pathlib import Path
from typing import cast

from kilnproxy.backends.base import (
    BackendRequest,
    BackendSink,
    BackendStream,
    StdinBackPressure,
)
from kilnproxy.backends.threads import DiskChecks, StuckDisk
from kilnproxy.errors import BackendError, ReadOnly
from kilnproxy.policy.commands import Verb

# After SIGTERM, how long an aborted command has to clean up and exit before SIGKILL.
KILL_GRACE = 2.0
# What the backend processes inherit from the proxy's own environment.
_INHERITED = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "HGRCPATH", "GIT_CONFIG_NOSYSTEM")


# hg refuses `serve --stdio` with any extra option (its own safety rule), so the read-only
# check reaches hg through HGRCPATH: a hook that fires for every write (changegroups, bookmarks,
# phases) and refuses it unless KILNPROXY_ACCESS says write. SSH backends use the same hook.
_DENY_LINE = ReadOnly("$KILNPROXY_REPO").client_line("$KILNPROXY_SESSION").strip()
READ_ONLY_HOOK = (
    "[hooks]\n"
    'pretxnopen.kilnproxy = test "$KILNPROXY_ACCESS" = write || '
    f'{{ echo "{_DENY_LINE}" >&2; exit 1; }}\n'
)
# For a session that may only read, hg also takes a push as it comes (`server.streamunbundle`)
# instead of spooling it whole to a temporary file first: the hook then refuses it at its first
# part, before a read-only user's bundle can fill a disk. Writers keep the spooling, which takes
# the repository's lock only once the bundle is all there.
READ_ONLY_STREAMED = READ_ONLY_HOOK + "[server]\nstreamunbundle = True\n"
HOOK_RC, STREAMED_RC = "hg-read-only.rc", "hg-read-only-streamed.rc"  # in the state directory
_RC_FILES = {HOOK_RC: READ_ONLY_HOOK, STREAMED_RC: READ_ONLY_STREAMED}
# What hg reads when HGRCPATH is unset (POSIX); setting HGRCPATH would otherwise drop these.
_HG_DEFAULT_RC = ("/etc/mercurial/hgrc", "/etc/mercurial/hgrc.d", "~/.hgrc", "~/.config/hg/hgrc")


def command_argv(verb: Verb, path: str) -> list[str]:
    if verb is Verb.HG_SERVE:
        return ["hg", "-R", path, "serve", "--stdio"]
    # `git upload-pack`, not `git-upload-pack`: git finds its own helpers, PATH may not have them.
    return ["git", verb.value.removeprefix("git-"), path]


def command_env(verb: Verb, variables: dict[str, str], hook_rc: Path) -> dict[str, str]:
    """The process environment: a few of ours, then the session's `variables` (SPEC 5)."""
    env = {name: os.environ[name] for name in _INHERITED if name in os.environ}
    env.update(variables)
    if verb is Verb.HG_SERVE:
        inherited = os.environ.get("HGRCPATH")
        if inherited is not None:
            rc_path = inherited.split(os.pathsep)
        else:
            rc_path = [os.path.expanduser(p) for p in _HG_DEFAULT_RC]
        if variables.get("KILNPROXY_ACCESS") != "write":
            hook_rc = hook_rc.with_name(STREAMED_RC)
        env["HGRCPATH"] = os.pathsep.join([*rc_path, str(hook_rc)])
    return env


def write_hook_rc(state_dir: Path) -> Path:
    """Write the read-only hook's files, once per worker start (their content never varies):
    the one for writers is returned, and `command_env` finds the other beside it."""
    state_dir.mkdir(parents=True, exist_ok=True)
    for name, text in _RC_FILES.items():
        path = state_dir / name
        if not path.exists() or path.read_text() != text:
            temporary = path.with_suffix(f".{os.getpid()}.tmp")
            temporary.write_text(text)
            temporary.replace(path)
    return state_dir / HOOK_RC


class _Process(StdinBackPressure, asyncio.SubprocessProtocol):
    """Turns subprocess pipe events into sink calls; finishes once exited and drained."""

    def __init__(self, sink: BackendSink) -> None:
        self.sink: BackendSink | None = sink
        self.transport: asyncio.SubprocessTransport | None = None
        self.kill_timer: asyncio.TimerHandle | None = None  # set while an abort waits
        self._open_pipes = {1, 2}
        self.exited = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's process transport implements SubprocessTransport without subclassing it.
        self.transport = cast(asyncio.SubprocessTransport, transport)

    def pipe_data_received(self, fd: int, data: bytes | str) -> None:
        assert isinstance(data, bytes)
        if self.sink is None:
            return
        if fd == 1:
            self.sink.backend_stdout(data)
        else:
            self.sink.backend_stderr(data)

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        self._open_pipes.discard(fd)
        self._maybe_finish()

    def process_exited(self) -> None:
        self.exited.set()
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        if not self.exited.is_set() or self._open_pipes or self.transport is None:
            return
        if self.kill_timer is not None:
            self.kill_timer.cancel()
            self.kill_timer = None
        code = self.transport.get_returncode()
        self.transport.close()
        sink, self.sink = self.sink, None
        if sink is not None:
            sink.backend_finished(exit_status(code))


def exit_status(returncode: int | None) -> int:
    """A shell-style status: a process killed by signal N reports 128 + N."""
    if returncode is None:
        return 255
    return 128 - returncode if returncode < 0 else returncode


class LocalStream:
    def __init__(self, process: _Process) -> None:
        assert process.transport is not None
        self._process = process
        self._transport = transport = process.transport
        # uvloop's pipe transports implement these interfaces without subclassing them.
        self._stdin = cast(asyncio.WriteTransport | None, transport.get_pipe_transport(0))
        outputs = (transport.get_pipe_transport(fd) for fd in (1, 2))
        self._outputs = [cast(asyncio.ReadTransport, pipe) for pipe in outputs if pipe]

    def write(self, data: bytes) -> None:
        if self._stdin is not None and not self._stdin.is_closing():
            self._stdin.write(data)

    def write_eof(self) -> None:
        if self._stdin is not None and not self._stdin.is_closing():
            self._stdin.write_eof()

    def pause_output(self) -> None:
        for pipe in self._outputs:
            if not pipe.is_closing() and pipe.is_reading():
                pipe.pause_reading()

    def resume_output(self) -> None:
        for pipe in self._outputs:
            if not pipe.is_closing() and not pipe.is_reading():
                pipe.resume_reading()

    async def wait_exited(self) -> None:
        """Until the command's process has exited (aborted or not)."""
        await self._process.exited.wait()

    def abort(self) -> None:
        process, transport = self._process, self._transport
        process.sink = None
        if transport.get_returncode() is not None:
            transport.close()
            return
        # Not transport.close(): with the process running, it sends SIGKILL. The pipes go now
        # (the fds are released at once); the transport closes when the process has exited.
        for pipe in (self._stdin, *self._outputs):
            if pipe is not None:
                pipe.close()
        signal_group(transport.get_pid(), signal.SIGTERM)
        loop = asyncio.get_running_loop()
        process.kill_timer = loop.call_later(KILL_GRACE, self._kill_if_running)

    def _kill_if_running(self) -> None:
        self._process.kill_timer = None
        if self._transport.get_returncode() is None:  # its pid is still its own
            signal_group(self._transport.get_pid(), signal.SIGKILL)


def signal_group(pid: int, signum: int) -> None:
    """Signal a command and every process it started (it leads its own process group)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signum)


def absent(path: Path) -> str | None:
    """Why `path` is no repository directory to run a command in, or None: one stat of its
    disk, which the caller makes where a disk that stops answering would hold nothing else."""
    return None if path.is_dir() else f"repository path {path} does not exist"


async def start_command(
    verb: Verb, path: Path, variables: dict[str, str], hook_rc: Path, repo: str, sink: BackendSink
) -> LocalStream:
    """Run one repository command on `path` (checked by `absent`), its output to `sink` (the
    storage agent's too). The command is started in /, not in the repository: the spawn waits
    until its child has exec'd, and a child entering a directory on a disk that does not
    answer would hold the loop with it. git and hg go to the path they are given themselves."""
    loop = asyncio.get_running_loop()
    try:
        _, process = await loop.subprocess_exec(
            lambda: _Process(sink),
            *command_argv(verb, str(path)),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=command_env(verb, variables, hook_rc),
            cwd="/",
            start_new_session=True,
        )
    except OSError as exc:
        raise BackendError(repo, f"cannot start backend command: {exc}") from exc
    return LocalStream(process)


class LocalBackend:
    def __init__(self, name: str, state_dir: Path) -> None:
        self.name = name
        self.hook_rc = write_hook_rc(state_dir)
        self.disk = DiskChecks()  # its repositories may be on a mount that stops answering

    async def open(self, request: BackendRequest, sink: BackendSink) -> BackendStream:
        path, repo = Path(request.route.path), request.route.repo
        try:
            missing = await self.disk.run(functools.partial(absent, path))
        except StuckDisk as exc:
            raise BackendError(repo, f"repository path {path}: {exc}") from None
        if missing is not None:
            raise BackendError(repo, missing)
        return await start_command(
            request.verb, path, request.environment(), self.hook_rc, repo, sink
        )

    async def close(self) -> None:
        return None
