"""One command the agent runs for a proxy: a channel's frames in, a local command's pipes out.

The command itself is the local backend's (`backends.local.start_command`): the same argv,
environment, read-only hg hook and abort (SIGTERM to its process group, SIGKILL after a grace).
This module only maps credits onto its pipes: output is read while the proxy has granted room
for it, and stdin credit is granted back only once the command's stdin pipe took the bytes. It
trusts a proxy's certificate, not its requests: what the local backend would never run (another
command, a variable that is not one of kilnproxy's own, a path outside the base) is refused.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Protocol

from kilnproxy.agent.paths import PathChecks, Refused
from kilnproxy.backends.base import BACKEND_VARIABLES
from kilnproxy.backends.frames import (
    MAX_PAYLOAD,
    FrameError,
    Kind,
    OpenRequest,
    count_frame,
    data_frame_of,
    data_frames,
    frame,
)
from kilnproxy.backends.local import LocalStream, start_command
from kilnproxy.backends.wire import FlowSwitch
from kilnproxy.errors import BackendError, client_line
from kilnproxy.logs import SessionLog
from kilnproxy.policy.commands import Verb

log = logging.getLogger("kilnproxy.agent")
# git writes its pack in pieces of 8 to 64 KiB, and the agent reads them as they come: sent as
# they are, the proxy pays its per-frame work every 20 KiB or so. Output that follows other
# output within GATHER seconds is gathered into frames of up to MAX_PAYLOAD; output after a
# silence goes at once, so a reply in a conversation (a negotiation, hg's commands) waits for
# nothing.
GATHER = 0.001
CUT_STATUS = 1  # a command the agent cut (its drain expired, or it stops at once): SPEC 3
CHECKS = PathChecks()  # the agent's: one loop, one process


class Wire(Protocol):
    """What a channel needs of its connection."""

    write_paused: bool

    def send(self, data: bytes) -> None: ...

    def forget(self, channel: int) -> None: ...


class Channel:
    """A BackendSink for the command's pipes, and the channel's frames for the command."""

    def __init__(self, wire: Wire, number: int, request: OpenRequest, window: int) -> None:
        self.wire = wire
        self.number = number
        self.request = request
        self.log = SessionLog(log, request.session)
        self.stream: LocalStream | None = None
        self.closed = False  # CLOSE came, or the connection went: nothing more is sent
        self._window = window
        self._output_credit = request.window
        self._output_flow = FlowSwitch()  # the command's stdout and stderr are not read
        self._input_room = window  # stdin the proxy may still send
        self._input_owed = 0  # stdin passed to the pipe, not yet granted back
        self._input_held = False  # the stdin pipe is full
        self._gathered: list[bytes] = []  # stdout held for one frame
        self._gathered_size = 0
        self._gather_timer: asyncio.TimerHandle | None = None

    async def start(self, base: Path, hook_rc: Path) -> None:
        """Check the request and start its command; REFUSED to the proxy if it may not run."""
        request = self.request
        try:
            try:
                verb = Verb(request.verb)
            except ValueError:
                raise Refused(f"command {request.verb!r} is not one the agent runs") from None
            unexpected = sorted(set(request.env) - BACKEND_VARIABLES)
            if unexpected:  # GIT_CONFIG_PARAMETERS, LD_PRELOAD: any command at all
                raise Refused(f"variable {unexpected[0]!r} is not one the agent passes on")
            if any("\0" in value for value in request.env.values()):
                raise Refused("a variable's value holds a NUL byte")
            if verb is Verb.RECEIVE_PACK and request.env.get("KILNPROXY_ACCESS") != "write":
                raise Refused("git-receive-pack without KILNPROXY_ACCESS=write")  # as a proxy
            path = await CHECKS.served(base, request.path)
            if self.closed:  # the proxy gave up while the path was checked: nothing to start
                return
            self.stream = await start_command(verb, path, request.env, hook_rc, request.repo, self)
        except (Refused, BackendError) as exc:
            detail = exc.detail if isinstance(exc, BackendError) else str(exc)
            self.log.warning("refused %s %s (repo %s): %s", request.verb, request.path,
                             request.repo, detail)  # fmt: skip
            self._refuse(detail)
            return
        except Exception:  # a bug of ours ends this channel only, and the proxy hears so at once
            self.log.exception("cannot start %s %s (repo %s)", request.verb, request.path,
                               request.repo)  # fmt: skip
            self._refuse("internal error")
            return
        self.log.info("started %s %s (repo %s)", request.verb, path, request.repo)
        if self.closed:  # the proxy gave up while the command was starting
            self.stream.abort()
            return
        self.wire.send(count_frame(Kind.CREDIT, self.number, self._window))

    def _refuse(self, detail: str) -> None:
        if self.closed:  # its number may be another's by now (a proxy's bug): not refused
            return
        self.wire.send(frame(Kind.REFUSED, self.number, detail.encode()))
        self.wire.forget(self.number)

    # -- frames from the proxy -------------------------------------------------------------------

    def stdin(self, data: bytes) -> None:
        self._input_room -= len(data)
        if self.stream is None or self._input_room < 0:
            raise FrameError(f"STDIN beyond its credit on channel {self.number}")
        self.stream.write(data)
        self._input_owed += len(data)
        self._grant_input()

    def stdin_eof(self) -> None:
        if self.stream is not None:
            self.stream.write_eof()

    def credit(self, count: int) -> None:
        self._output_credit += count
        self.update_flow()

    def close(self, why: str) -> None:
        """The proxy closed the channel, or lost the connection: the command is aborted."""
        if self.closed:
            return
        self.closed = True
        self._stop_gathering()
        self._gathered.clear()
        self.wire.forget(self.number)
        if self.stream is not None:
            self.log.info("aborting %s (repo %s): %s", self.request.verb, self.request.repo, why)
            self.stream.abort()

    def cut(self, why: str) -> None:
        """The agent stops before the command has ended: what it wrote goes first, then `why`
        for the client (one line, SPEC 3) and exit status 1, and the command is aborted. A
        command still starting is refused as a draining agent refuses one (DRAINING): the proxy
        opens it once more on another connection, on the agent that replaces this one, if any."""
        if self.closed:
            return
        if self.stream is None:  # still starting, no CREDIT sent: the proxy opens it elsewhere
            self.wire.send(frame(Kind.DRAINING, self.number))
        else:
            self._stop_gathering()
            self._flush()
            line = client_line(why, self.request.session).encode()
            self.wire.send(frame(Kind.STDERR, self.number, line))
            self.wire.send(count_frame(Kind.EXIT, self.number, CUT_STATUS))
        self.close(why)

    def update_flow(self) -> None:
        """Read the command's output while the proxy has room for it and our socket takes it."""
        stream = self.stream
        if stream is None or self.closed:
            return
        full = self._output_credit <= 0 or self.wire.write_paused
        self._output_flow.turn(full, stream.pause_output, stream.resume_output)

    def _grant_input(self) -> None:
        if not self._input_held and self._input_owed >= self._window // 4:
            self.wire.send(count_frame(Kind.CREDIT, self.number, self._input_owed))
            self._input_room += self._input_owed
            self._input_owed = 0

    # -- BackendSink: the command's pipes --------------------------------------------------------

    def backend_stdout(self, data: bytes) -> None:
        self._output(Kind.STDOUT, data)

    def backend_stderr(self, data: bytes) -> None:
        self._output(Kind.STDERR, data)

    def _output(self, kind: Kind, data: bytes) -> None:
        if self.closed:
            return
        self._output_credit -= len(data)
        if kind is Kind.STDERR or self._gather_timer is None:
            self._flush()  # what came before goes first
            self.wire.send(data_frames(kind, self.number, data))
            if kind is Kind.STDOUT:  # more may follow: gather it for a moment
                loop = asyncio.get_running_loop()
                self._gather_timer = loop.call_later(GATHER, self._gathered_enough)
        else:
            if self._gathered_size + len(data) > MAX_PAYLOAD:
                self._flush()  # frames of at most MAX_PAYLOAD: each is one copy (_flush)
            self._gathered.append(data)
            self._gathered_size += len(data)
            if self._gathered_size >= MAX_PAYLOAD:
                self._flush()
        self.update_flow()

    def _gathered_enough(self) -> None:
        self._gather_timer = None
        if self._gathered and not self.closed:
            self._flush()
            loop = asyncio.get_running_loop()  # still streaming: keep gathering
            self._gather_timer = loop.call_later(GATHER, self._gathered_enough)

    def _flush(self) -> None:
        if self._gathered:
            if self._gathered_size <= MAX_PAYLOAD:
                self.wire.send(data_frame_of(Kind.STDOUT, self.number, self._gathered))
            else:  # one pipe read larger than a frame
                data = b"".join(self._gathered)
                self.wire.send(data_frames(Kind.STDOUT, self.number, data))
            self._gathered.clear()
            self._gathered_size = 0

    def _stop_gathering(self) -> None:
        if self._gather_timer is not None:
            self._gather_timer.cancel()
            self._gather_timer = None

    def backend_pause_input(self) -> None:
        self._input_held = True

    def backend_resume_input(self) -> None:
        self._input_held = False
        self._grant_input()

    def backend_finished(self, exit_status: int) -> None:
        self.log.info("exit=%d %s (repo %s)", exit_status, self.request.verb, self.request.repo)
        self._stop_gathering()
        if not self.closed:
            self._flush()  # every byte of output before the status
            self.closed = True
            self.wire.send(count_frame(Kind.EXIT, self.number, exit_status))
            self.wire.forget(self.number)

    def backend_lost(self, error: BackendError) -> None:  # a local command is never "lost"
        self.backend_finished(255)
