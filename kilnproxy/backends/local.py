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
import socket
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


class _Process(StdinBackPressure):
    """A started command: its pipes' events turned into sink calls, its exit watched through a
    pidfd; finishes once it has exited and its output is drained."""

    def __init__(self, sink: BackendSink) -> None:
        self.sink: BackendSink | None = sink
        self.popen: subprocess.Popen[bytes] | None = None
        self.kill_timer: asyncio.TimerHandle | None = None  # set while an abort waits
        self._open_pipes = {1, 2}
        self._pidfd = -1
        self.exited = asyncio.Event()

    def watch(self, popen: subprocess.Popen[bytes]) -> None:
        """Watch `popen`'s exit (OSError if its pidfd cannot be had: EMFILE)."""
        self._pidfd = os.pidfd_open(popen.pid)
        self.popen = popen
        asyncio.get_running_loop().add_reader(self._pidfd, self._reap)

    def _reap(self) -> None:
        asyncio.get_running_loop().remove_reader(self._pidfd)
        os.close(self._pidfd)
        assert self.popen is not None
        # Reaped now, unless an abort's SIGKILL is still to come (`LocalStream._kill_group`):
        # till then it stays a zombie, so that its pid, its group's id, is no one else's.
        if self.kill_timer is None:
            self.popen.poll()
        self.exited.set()
        self._maybe_finish()

    def output(self, fd: int, data: bytes) -> None:
        if self.sink is None:
            return
        if fd == 1:
            self.sink.backend_stdout(data)
        else:
            self.sink.backend_stderr(data)

    def output_closed(self, fd: int) -> None:
        self._open_pipes.discard(fd)
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        if not self.exited.is_set() or self._open_pipes or self.popen is None:
            return
        sink, self.sink = self.sink, None
        if sink is not None:
            sink.backend_finished(exit_status(self.popen.returncode))


class _Pipe(asyncio.Protocol):
    """One of the command's standard streams, as this end sees it."""

    def __init__(self, process: _Process, fd: int) -> None:
        self.process = process
        self.fd = fd

    def data_received(self, data: bytes) -> None:
        self.process.output(self.fd, data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.fd != 0:
            self.process.output_closed(self.fd)

    def pause_writing(self) -> None:
        self.process.pause_writing()

    def resume_writing(self) -> None:
        self.process.resume_writing()


def exit_status(returncode: int | None) -> int:
    """A shell-style status: a process killed by signal N reports 128 + N."""
    if returncode is None:
        return 255
    return 128 - returncode if returncode < 0 else returncode


class LocalStream:
    def __init__(self, process: _Process, pipes: list[asyncio.BaseTransport]) -> None:
        assert process.popen is not None
        self._process = process
        self._popen = process.popen
        self._pipes = pipes
        # uvloop's pipe transports implement these interfaces without subclassing them.
        self._stdin = cast(asyncio.WriteTransport, pipes[0])
        self._outputs = [cast(asyncio.ReadTransport, pipe) for pipe in pipes[1:]]

    def write(self, data: bytes) -> None:
        if not self._stdin.is_closing():
            self._stdin.write(data)

    def write_eof(self) -> None:
        if not self._stdin.is_closing():
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
        """The pipes go now (the fds are released at once); a command still running gets
        SIGTERM, with everything it started, and KILL_GRACE later SIGKILL goes to whatever of
        them is left, the command gone or not: a hook's child deaf to SIGTERM is no less
        the session's."""
        self._process.sink = None
        for pipe in self._pipes:
            pipe.close()
        if self._popen.returncode is not None:  # reaped: its pid may be another's by now
            return
        signal_group(self._popen.pid, signal.SIGTERM)
        loop = asyncio.get_running_loop()
        self._process.kill_timer = loop.call_later(KILL_GRACE, self._kill_group)

    def _kill_group(self) -> None:
        # The command is not reaped before this (`_Process._reap`): its group's id is its own.
        self._process.kill_timer = None
        signal_group(self._popen.pid, signal.SIGKILL)
        self._popen.poll()  # the command, if it had exited: reaped now


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
    storage agent's too). The command gets its three streams and no other descriptor: uvloop's
    own spawn leaves it a second copy of each of its pipes (it has no close_fds), and a hook's
    background job that closes 0, 1 and 2 (`nohup ci-trigger </dev/null >/dev/null 2>&1 &`)
    then still held the output open, and the push with it, until the job ended. The spawn
    (vfork and exec, which it waits for) is a fraction of uvloop's fork of a large worker.
    It starts in /, not in the repository: a child entering a directory on a disk that does
    not answer would hold the loop with it. git and hg go to the path they are given."""
    loop = asyncio.get_running_loop()
    process = _Process(sink)
    pairs = [socket.socketpair() for _ in range(3)]  # as uvloop's pipes: close-on-exec here
    unwrapped = [ours for ours, _ in pairs]  # ours to close, until a transport has them
    pipes: list[asyncio.BaseTransport] = []
    popen: subprocess.Popen[bytes] | None = None
    try:
        try:
            for fd, ours in enumerate(list(unwrapped)):  # before the spawn: no wait after it
                made = functools.partial(_Pipe, process, fd)
                unwrapped.remove(ours)
                try:
                    pipe: asyncio.BaseTransport
                    if fd == 0:
                        pipe, _ = await loop.connect_write_pipe(made, ours)
                    else:
                        pipe, _ = await loop.connect_read_pipe(made, ours)
                except BaseException:  # cancelled, say: uvloop closed the descriptor itself,
                    ours.detach()  # so the socket object must not close it again
                    raise
                pipes.append(pipe)
            popen = subprocess.Popen(  # noqa: ASYNC220 (it waits for the exec only, as uvloop's)
                command_argv(verb, str(path)),
                stdin=pairs[0][1].fileno(),
                stdout=pairs[1][1].fileno(),
                stderr=pairs[2][1].fileno(),
                env=command_env(verb, variables, hook_rc),
                cwd="/",
                close_fds=True,
                start_new_session=True,
            )
        finally:
            for _, theirs in pairs:
                theirs.close()
        process.watch(popen)
    except BaseException as exc:
        process.sink = None
        for pipe in pipes:
            pipe.close()
        for ours in unwrapped:
            ours.close()
        if popen is not None:  # not watched: it goes at once (subprocess reaps it later)
            signal_group(popen.pid, signal.SIGKILL)
        if isinstance(exc, OSError):
            raise BackendError(repo, f"cannot start backend command: {exc}") from exc
        raise
    return LocalStream(process, pipes)


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
