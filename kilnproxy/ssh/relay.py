"""One SSH channel relayed to one backend command: the hot path of kilnproxy.

Owns the channel's command, its backend stream and its byte counts, and tells what happened in
one frozen `RelayStats` when asked. It must never buffer: bytes go from one side to the other
within the pass of the event loop that brought them (gathered into one write each way, see
`coalesce`), and each side's back-pressure pauses the other (asyncssh's channel window on the
client leg, the backend's own on the other). Everything that can fail while setting up runs in
one task, `_open`, which is the isolation boundary: whatever it raises ends this channel with
one line to the client, never the worker.

It knows its connection only as a `RelayOwner` and the worker only as `Services`, and must never
import `session`: the session imports the relay, never the other way round. The per-chunk
path (`data_received`, `backend_stdout`) stays direct calls and int additions: no records, no
events per chunk.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import asyncssh

from kilnproxy.backends import BackendRequest, BackendStream
from kilnproxy.directory import Identity
from kilnproxy.errors import (
    BackendError,
    BadCommand,
    ClientError,
    ClientFacing,
    CutReason,
    DirectoryUnavailable,
    NoShell,
    NotFound,
    ReadOnly,
)
from kilnproxy.logs import CLIENT_TEXT, quoted
from kilnproxy.policy.access import Access, required_access
from kilnproxy.policy.admission import TooManySessions
from kilnproxy.policy.commands import Command, git_protocol, parse_command
from kilnproxy.ssh.coalesce import Coalescer
from kilnproxy.ssh.services import Services


class RelayState(enum.Enum):
    REQUESTED = "requested"  # channel open, waiting for exec/shell
    OPENING = "opening"  # checking access, starting the backend
    RUNNING = "running"  # bytes flowing
    EXITING = "exiting"  # exit status known, waiting for the client to take the last bytes
    CLOSED = "closed"


class Outcome(enum.Enum):
    """How a command ended, or a connection that ran none: the access line's `outcome`."""

    OK = "ok"
    FAILED = "failed"  # the backend command exited non-zero
    DENIED = "denied"
    REFUSED = "refused"  # over an admission limit: max_sessions_per_account
    BAD_COMMAND = "bad-command"
    BACKEND_ERROR = "backend-error"
    UNAVAILABLE = "unavailable"  # the directory could not be asked
    INTERNAL_ERROR = "internal-error"
    TIMEOUT = "timeout"
    CUT = "cut"
    CLIENT_GONE = "client-gone"
    AUTH_FAILED = "auth-failed"  # a connection only: it never authenticated
    NO_COMMAND = "no-command"  # a connection only: it authenticated and ran nothing
    HEALTH_CHECK = "health-check"  # a connection only: a load balancer's (PROXY LOCAL)


_CUT_OUTCOME = {
    CutReason.LOGIN_GRACE: Outcome.TIMEOUT,
    CutReason.IDLE: Outcome.TIMEOUT,
    CutReason.MAX_SESSION: Outcome.TIMEOUT,
    CutReason.DRAIN: Outcome.CUT,
    CutReason.DRAIN_STOP: Outcome.CUT,
    CutReason.SHUTDOWN: Outcome.CUT,
    CutReason.ADMIN: Outcome.CUT,
}


class RelayOwner(Protocol):
    """What a relay needs of the connection it runs on (implemented by `Session`)."""

    @property
    def id(self) -> str: ...

    @property
    def log(self) -> logging.LoggerAdapter[logging.Logger]:
        """Tags every line with the session id."""
        ...

    @property
    def identity(self) -> Identity | None:
        """The verified identity, set before any channel can run a command; None only when
        the key was let in because the directory could not be asked (the command is then
        refused as unavailable)."""
        ...

    def touch(self) -> None:
        """A byte went one way or the other: called per chunk, so it must stay cheap."""

    def relay_closed(self, relay: Relay, stats: RelayStats) -> None:
        """Called once, when the channel has closed, with the final record of its command."""


class Channel(Protocol):
    """What a relay uses of its asyncssh `SSHServerChannel`, so that tests can give a fake."""

    def write(self, data: bytes) -> None: ...

    def write_stderr(self, data: bytes) -> None: ...

    def exit(self, status: int) -> None: ...

    def close(self) -> None: ...

    def abort(self) -> None: ...

    def is_closing(self) -> bool: ...

    def get_write_buffer_size(self) -> int: ...

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None: ...

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def get_environment(self) -> Mapping[str, str]: ...


@dataclass(frozen=True)
class RelayStats:
    """What one channel did, or is doing: a snapshot, made only when asked.

    The session writes its access line from the final one and its connection-table row from
    the current one.
    """

    command: Command | None  # None until the exec request parsed
    shell: bool  # a shell request rather than a command
    vcs: str | None
    backend: str | None  # None until the command was routed
    exit_status: int | None  # None while running
    outcome: Outcome | None  # None while running
    bytes_in: int  # client to backend
    bytes_out: int  # backend to client, stdout and stderr
    started_at: float  # wall clock


class Relay(asyncssh.SSHServerSession[bytes]):
    def __init__(self, owner: RelayOwner, services: Services) -> None:
        self._owner = owner
        self._services = services
        self._metrics = services.metrics  # its byte counts grow with every chunk
        self._touch = owner.touch  # bound once: it is called per chunk
        self.state = RelayState.REQUESTED
        self._command: Command | None = None
        self._backend: str | None = None
        self._bytes_in = 0  # client to backend
        self._bytes_out = 0  # backend to client, stdout and stderr
        self._started_at = time.time()
        self._exit_status: int | None = None
        self._outcome: Outcome | None = None
        self._chan: Channel | None = None
        self._line: str | None = None  # the exec request's command line
        self._shell = False
        self._stream: BackendStream | None = None
        self._task: asyncio.Task[None] | None = None
        self._window_full = False  # the client's window is full: the backend must wait
        self._backlogged = False  # so is the connection's write buffer (`client_backlogged`)
        self._input_paused = False  # the backend's stdin is full: the client must wait
        self._eof_pending = False
        self._early: list[bytes] = []
        self._exit_when_flushed: int | None = None
        self._account: str | None = None  # whose session admission counts, while it does
        loop = asyncio.get_running_loop()
        self._to_client = Coalescer(self._write_stdout, loop, self._relay_failed)
        self._to_backend = Coalescer(self._write_stdin, loop, self._relay_failed)

    def __repr__(self) -> str:
        return f"<Relay session {self._owner.id} {self.state.value} {quoted(self._line)}>"

    def statistics(self) -> RelayStats:
        command = self._command
        return RelayStats(
            command=command,
            shell=self._shell,
            vcs=command.verb.vcs.value if command else None,
            backend=self._backend,
            exit_status=self._exit_status,
            outcome=self._outcome,
            bytes_in=self._bytes_in,
            bytes_out=self._bytes_out,
            started_at=self._started_at,
        )

    @property
    def opened(self) -> bool:
        """asyncssh has given it its channel, and has yet to take it away."""
        return self._chan is not None

    # -- asyncssh session callbacks -------------------------------------------------------------

    def connection_made(self, chan: Channel) -> None:
        # Wider than asyncssh's SSHServerChannel[bytes], which fits `Channel` as it is.
        self._chan = chan

    def pty_requested(self, term_type: str, term_size: object, term_modes: object) -> bool:
        return False

    def shell_requested(self) -> bool:
        self._shell = True
        return True  # answered in session_started with the greeting of SPEC 3

    def exec_requested(self, command: str) -> bool:
        self._line = command  # validated in _open, so that a refusal carries a message
        return True

    def subsystem_requested(self, subsystem: str) -> bool:
        self._owner.log.info("refused subsystem %s", quoted(subsystem))
        return False

    def session_started(self) -> None:
        if self.state is not RelayState.REQUESTED:  # cut before its exec came: runs nothing
            return
        self.state = RelayState.OPENING
        name = f"session {self._owner.id}: {(self._line or 'shell')[:CLIENT_TEXT]}"
        self._task = asyncio.get_running_loop().create_task(self._open(), name=name)

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        self._bytes_in += len(data)
        self._metrics.bytes_in += len(data)
        self._touch()
        if datatype is not None:
            return  # extended data from a client is in no git or hg protocol: not stdin
        if self._stream is not None and self.state is RelayState.RUNNING:
            self._to_backend.add(data)
        elif self.state is RelayState.OPENING and self._chan is not None:
            # Bytes sent before the backend is up (hg says hello at once): hold this one
            # chunk and stop reading; asyncssh keeps the rest, within the channel window.
            self._early.append(data)
            self._chan.pause_reading()

    def eof_received(self) -> bool:
        if self._stream is not None and self.state is RelayState.RUNNING:
            self._to_backend.flush()
            self._stream.write_eof()
        else:
            self._eof_pending = True
        return True  # keep our side open: the backend still has output to send

    @property
    def _output_paused(self) -> bool:
        return self._window_full or self._backlogged

    def pause_writing(self) -> None:
        self._set_output(window_full=True)

    def resume_writing(self) -> None:
        if self._exit_when_flushed is not None:
            self._window_full = False
            self._exit(self._exit_when_flushed)
        else:
            self._set_output(window_full=False)

    def client_backlogged(self, backlogged: bool) -> None:
        """The client reads slower than it lets us write: a window is the client's to set (up
        to 4 GiB), so the connection's own write buffer bounds what waits for it too."""
        self._set_output(backlogged=backlogged)

    def _set_output(
        self, *, window_full: bool | None = None, backlogged: bool | None = None
    ) -> None:
        was = self._output_paused
        if window_full is not None:
            self._window_full = window_full
        if backlogged is not None:
            self._backlogged = backlogged
        if self._stream is not None and self._output_paused != was:
            if self._output_paused:
                self._stream.pause_output()
            else:
                self._stream.resume_output()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._outcome is None:  # every other ending said how it ended
            self._outcome = Outcome.CLIENT_GONE
        self._to_client.discard()
        try:
            self._close_backend()
        except Exception:  # a backend's bug: the account's count and the session still close
            self._owner.log.exception("failed to abort the backend")
        self._stop_opening()
        if self._account is not None:
            self._services.admission.close_session(self._account)
            self._account = None
        self.state = RelayState.CLOSED
        self._chan = None
        self._owner.relay_closed(self, self.statistics())

    # -- setting up: the isolation boundary -------------------------------------------------------

    async def _open(self) -> None:
        log = self._owner.log
        try:
            stream = await self._connect()
        except BadCommand as exc:
            log.info("bad command %s: %s", quoted(self._line), exc.message)
            self._refuse(exc, Outcome.BAD_COMMAND)
        except TooManySessions as exc:  # logged by admission, without flooding the log
            self._refuse(exc, Outcome.REFUSED)
        except ClientError as exc:
            log.info("denied: %s", exc.message)
            self._refuse(exc, Outcome.DENIED)
        except BackendError as exc:
            log.warning("backend %s failed: %s", self._backend or "", exc.detail)
            self._refuse(exc, Outcome.BACKEND_ERROR)
        except DirectoryUnavailable as exc:
            log.debug("directory unavailable: %s", exc.detail)  # the store says so, once
            self._refuse(exc, Outcome.UNAVAILABLE)
        except Exception:
            log.exception("internal error while opening %s", quoted(self._line))
            self._refuse(ClientError("internal error"), Outcome.INTERNAL_ERROR)
        else:
            if self.state is not RelayState.OPENING:  # cut or closed while we were starting
                stream.abort()
                return
            try:  # what the client sent meanwhile reaches the backend from in here
                self._run(stream)
            except Exception:
                self._relay_failed()

    def _run(self, stream: BackendStream) -> None:
        self._stream = stream
        self.state = RelayState.RUNNING
        if self._output_paused:
            stream.pause_output()
        for data in self._early:
            stream.write(data)
        self._early.clear()
        if self._eof_pending:
            stream.write_eof()
        assert self._chan is not None
        if not self._input_paused:
            self._chan.resume_reading()  # asyncssh passes on what it holds, its EOF too

    async def _connect(self) -> BackendStream:
        owner, services = self._owner, self._services
        identity = owner.identity
        assert self._chan is not None
        if identity is None:
            raise DirectoryUnavailable("the directory was down when the key was offered")
        if self._shell or self._line is None:
            raise NoShell(identity.user, identity.account)
        self._command = command = parse_command(self._line)
        services.admission.open_session(identity.account)
        self._account = identity.account
        started = time.perf_counter()
        route = await services.directory.route(identity, command.repo)
        services.metrics.route_lookup.observe(time.perf_counter() - started)
        if route is None or route.access < Access.READ or route.vcs is not command.verb.vcs:
            raise NotFound(command.repo)
        if route.access < required_access(command.verb):
            raise ReadOnly(command.repo)
        self._backend = route.backend
        env = self._chan.get_environment()
        request = BackendRequest(
            owner.id, command.verb, route, identity, git_protocol(env.get("GIT_PROTOCOL"))
        )
        owner.log.info(
            "%s %s on backend %s (%s access)",
            command.verb.value,
            command.repo,
            route.backend,
            route.access.label,
        )
        return await services.backends.for_route(route).open(request, self)

    def _refuse(self, error: ClientFacing, outcome: Outcome) -> None:
        if self._chan is None or self.state is not RelayState.OPENING:
            return
        self._outcome = outcome
        self._write_stderr(error.client_line(self._owner.id).encode())
        self._finish(error.exit_status)

    # -- the backend's side (BackendSink) --------------------------------------------------------

    def backend_stdout(self, data: bytes) -> None:
        self._bytes_out += len(data)
        self._metrics.bytes_out += len(data)
        self._touch()
        if self._chan is not None:
            self._to_client.add(data)

    def backend_stderr(self, data: bytes) -> None:
        self._bytes_out += len(data)
        self._metrics.bytes_out += len(data)
        self._touch()
        if self._chan is not None:
            self._to_client.flush()  # keep the order the backend wrote in
            self._write_stderr(data)

    def _write_stdout(self, data: bytes) -> None:
        # A pass later than the backend's callback: the client may have closed meanwhile.
        if self._chan is not None and not self._chan.is_closing():
            self._chan.write(data)

    def _write_stderr(self, data: bytes) -> None:
        # The client may have closed its channel while its connection stays: asyncssh then
        # raises on a write, and tells us (connection_lost) only later.
        if self._chan is not None and not self._chan.is_closing():
            self._chan.write_stderr(data)

    def _write_stdin(self, data: bytes) -> None:
        if self._stream is not None:
            self._stream.write(data)

    def backend_pause_input(self) -> None:
        self._input_paused = True
        if self._chan is not None:
            self._chan.pause_reading()

    def backend_resume_input(self) -> None:
        self._input_paused = False
        if self._chan is not None and self.state is RelayState.RUNNING:
            # asyncssh passes on what the client sent meanwhile, its EOF too, from inside this
            # call, so inside the backend's callback: a bug there must end this session only,
            # not the backend connection that other sessions share.
            try:
                self._chan.resume_reading()
            except Exception:
                self._relay_failed()

    def backend_lost(self, error: BackendError) -> None:
        self._stream = None
        self._owner.log.warning("backend %s failed: %s", self._backend or "", error.detail)
        self._outcome = Outcome.BACKEND_ERROR
        if self._chan is not None and self.state is not RelayState.EXITING:
            self._to_client.flush()  # what came before the loss, then the line about it
            self._write_stderr(error.client_line(self._owner.id).encode())
        self._finish(error.exit_status)

    def backend_finished(self, exit_status: int) -> None:
        self._stream = None
        if self._outcome is None:
            self._outcome = Outcome.OK if exit_status == 0 else Outcome.FAILED
        self._finish(exit_status)

    # -- ending ------------------------------------------------------------------------------------

    def _finish(self, status: int) -> None:
        """Send the exit status once the client has taken every byte before it."""
        chan = self._chan
        if chan is None or self.state in (RelayState.EXITING, RelayState.CLOSED):
            return
        self._to_client.flush()
        self.state = RelayState.EXITING
        self._exit_status = status
        self._exit_once_flushed(chan, status)

    def _exit_once_flushed(self, chan: Channel, status: int) -> None:
        """The exit status after every byte before it: asyncssh sends it at once, ahead of
        what its buffer holds for a client that is behind."""
        if chan.get_write_buffer_size() == 0:
            self._exit(status)
        else:
            self._exit_when_flushed = status
            # With both marks at zero, asyncssh calls resume_writing once the buffer is empty.
            chan.set_write_buffer_limits(high=0, low=0)
            # Nothing takes the client's bytes any more (data_received drops them now). Read
            # on: asyncssh alone passes a close on only after what came before it, so a client
            # that closes its channel instead of reading would never be heard.
            chan.resume_reading()

    def _exit(self, status: int) -> None:
        self._exit_when_flushed = None
        if self._chan is not None:
            self._exit_channel(self._chan, status)

    def _exit_channel(self, chan: Channel, status: int) -> None:
        """The exit status, if the client still takes one. If it closed the channel first,
        asyncssh tells us (connection_lost) only once it has passed on what the client sent
        before, which it holds while we read no more: closing drops that, and ends the channel."""
        closed_by_client = chan.is_closing()
        chan.exit(status)
        if closed_by_client:
            chan.close()

    def cut(self, reason: CutReason) -> None:
        """End now, telling the client why (timeouts, drain, administrator)."""
        self._end_now(_CUT_OUTCOME[reason], reason.client_line(self._owner.id), reason.exit_status)

    def _relay_failed(self) -> None:
        """Relaying bytes a pass after they came raised (a bug, called inside the `except`):
        they are lost, so the command cannot go on. It ends as an internal error; if even that
        cannot be said to the client, its channel is aborted."""
        self._owner.log.exception("internal error while relaying %s", quoted(self._line))
        error = ClientError("internal error")
        try:
            self._end_now(
                Outcome.INTERNAL_ERROR, error.client_line(self._owner.id), error.exit_status
            )
        except Exception:
            self._owner.log.exception("cannot tell the client; aborting its channel")
            if self._chan is not None:
                self._chan.abort()

    def _end_now(self, outcome: Outcome, line: str, status: int) -> None:
        if self.state is RelayState.EXITING and self._exit_when_flushed is not None:
            # The command ended, and its last bytes wait for a client that does not take them:
            # cut all the same. Its line goes after them, its status in place of the command's
            # (the session hangs up at the cut's grace if the client never reads).
            self._outcome = outcome
            self._exit_status = self._exit_when_flushed = status
            self._write_stderr(line.encode())
            return
        if self.state in (RelayState.EXITING, RelayState.CLOSED):
            return
        self._outcome = outcome
        self._to_client.discard()
        self._close_backend()
        self._stop_opening()
        self.state = RelayState.EXITING
        self._exit_status = status
        if self._chan is not None:
            self._write_stderr(line.encode())
            # Its line, and the output the client has yet to take, before the status (SPEC 3):
            # a client that stops at the status would not read them. The session hangs up at
            # the cut's grace on a client that never takes them.
            self._exit_once_flushed(self._chan, status)

    def _stop_opening(self) -> None:
        """A route lookup or a backend dial still under way is moot: cancelled."""
        if self._task is not None and not self._task.done():
            self._task.cancel()

    def _close_backend(self) -> None:
        self._to_backend.discard()
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.abort()
