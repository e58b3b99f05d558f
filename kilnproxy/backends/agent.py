"""The agent:// backend (SPEC 5): a repository command run by `kilnproxy agent` on a storage
server, reached over TLS 1.3 with certificates both ways.

Owns one Pool of TLS connections per backend; each session is a channel on one of them (the
frames of `backends.frames`). The channel's credits map onto the relay's flow control both
ways: output is granted back only while the relay takes it, stdin pauses the client when the
agent has granted no more. A connection whose agent drains is retired from the pool, and a
session the agent refused for its drain is opened once more, on another connection (the agent
that replaced it, most often). A session whose relay fails on one of its frames ends alone: the
connection and its other channels go on. It must never trust an agent whose certificate its CA
did not sign for the backend's host name, and never hold more than one window of bytes per
channel.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from pathlib import Path

from kilnproxy.backends.base import BackendRequest, BackendSink, BackendStream, sink_failed
from kilnproxy.backends.frames import (
    CONTROL,
    Frame,
    FrameError,
    Kind,
    OpenRequest,
    count_frame,
    data_frames,
    frame,
)
from kilnproxy.backends.pool import DialFailed, Draining, Link, LinkState, Pool
from kilnproxy.backends.wire import FlowSwitch, FrameConnection
from kilnproxy.errors import BackendError

log = logging.getLogger("kilnproxy.backend")
KEEPALIVE_COUNT = 3  # unanswered pings before a connection is given up
# What an agent may send past the credit it was given: the command's stdout and stderr are each
# read once more as it runs out (256 KiB at most), and a cut adds its line. Twice that: beyond
# it, the agent is broken, and what it sends would pile up here and in asyncssh without bound.
OUTPUT_OVERSHOOT = 1 << 20


def client_context(ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    """TLS 1.3 only; the agent's certificate checked against `ca` and the backend's host."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED, check_hostname
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    try:
        context.load_verify_locations(cafile=ca)
    except (OSError, ssl.SSLError) as exc:
        raise DialFailed(f"cannot load [backend_agent] ca {ca}: {exc}") from None
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:  # either file: OpenSSL does not say which
        raise DialFailed(f"cannot load [backend_agent] cert {cert} with key {key}: {exc}") from None
    return context


class AgentConnection(FrameConnection["AgentStream"]):
    """One TLS connection to an agent; its sessions are channels."""

    def __init__(self, link: Link[AgentConnection], keepalive: float) -> None:
        super().__init__()
        self.link = link
        self.keepalive = keepalive
        self.answered: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._next_channel = 1
        self._heard = True  # anything received since the last keepalive tick
        self.received = 0  # bytes, all told (the pool's `heard`)
        self._missed = 0
        self._timer: asyncio.TimerHandle | None = None

    # -- asyncio callbacks -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.send(frame(Kind.PING, CONTROL))  # its PONG proves the agent accepted our cert
        self._timer = asyncio.get_running_loop().call_later(self.keepalive, self._tick)

    def buffer_updated(self, nbytes: int) -> None:
        self._heard = True
        self.received += nbytes
        super().buffer_updated(nbytes)

    def protocol_error(self, error: FrameError) -> None:
        log.warning("backend %s: protocol error: %s", self.link.pool.name, error)

    def pong(self) -> None:
        if not self.answered.done():
            self.answered.set_result(None)

    def peer_draining(self) -> None:
        self.link.pool.retire(self.link)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self.answered.done():
            why = exc or "closed before it answered (does it trust our certificate?)"
            self.answered.set_exception(ConnectionError(str(why)))
            self.answered.exception()  # retrieved: a dial that gave up does not leave it unread
        # An agent that drains closes a connection that runs nothing at once: an OPEN sent
        # before its DRAINING arrived goes unanswered, and may go to another connection.
        retired = self.link.state is LinkState.DRAINING
        self.link.lost(exc)
        self._lose_streams(f"connection lost ({exc or 'closed'})", retired)

    # -- frames ----------------------------------------------------------------------------------

    def channel_frame(self, each: Frame) -> None:
        stream = self.channels.get(each.channel)
        if stream is None:  # a channel we closed: its last frames were in flight
            return
        try:
            stream.received(each)
        except FrameError:
            raise  # the agent broke the protocol: the connection goes, with every channel
        except Exception:  # a bug in one session: it ends that session only
            log.exception("backend %s: failed on channel %d", self.link.pool.name, each.channel,
                          extra={"session": stream.session})  # fmt: skip
            stream.failed()

    def _tick(self) -> None:
        """Every `keepalive`: a connection silent since the last tick is asked (a PING), and
        one that left KEEPALIVE_COUNT of them unanswered is given up (as asyncssh's keepalive
        gives up an ssh:// connection)."""
        if self._heard:
            self._heard, self._missed = False, 0
        else:
            self._missed += 1
            if self._missed > KEEPALIVE_COUNT:
                log.warning("backend %s: keepalive timed out", self.link.pool.name)
                self.abort()
                # uvloop reports an abort as a plain close: say why to the sessions ourselves.
                self._lose_streams("connection lost (keepalive timed out)")
                return
            self.send(frame(Kind.PING, CONTROL))
        self._timer = asyncio.get_running_loop().call_later(self.keepalive, self._tick)

    def _lose_streams(self, detail: str, retired: bool = False) -> None:
        streams, self.channels = self.channels, {}
        for stream in streams.values():
            try:
                stream.lost(detail, retired)
            except Exception:  # one session's bug: every other session is still told
                log.exception("backend %s: failed on losing its connection",
                              self.link.pool.name, extra={"session": stream.session})  # fmt: skip

    def open_channel(self, stream: AgentStream) -> int:
        channel = self._next_channel
        self._next_channel += 1
        self.channels[channel] = stream
        return channel

    def forget(self, channel: int) -> None:
        self.channels.pop(channel, None)


AgentPool = Pool[AgentConnection]
AgentLink = Link[AgentConnection]


class AgentStream:
    """One command on a channel, relaying to a BackendSink (a BackendStream)."""

    def __init__(
        self, sink: BackendSink, link: AgentLink, session: str, repo: str, window: int
    ) -> None:
        assert link.conn is not None
        self.sink: BackendSink | None = sink
        self.session = session
        self.conn = link.conn
        self.channel = self.conn.open_channel(self)
        self.started: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pool = link.pool
        self._link: AgentLink | None = link
        self._repo = repo
        self._window = window
        self._credit = 0  # stdin bytes the agent will take
        self._held = bytearray()  # stdin past the credit, sent as credit comes
        self._eof = False  # the client's EOF, sent after what is held
        self._input_flow = FlowSwitch()  # the relay was told to stop reading the client
        self._output_paused = False
        self._owed = 0  # output bytes passed on, not yet granted back
        self._output_room = window  # output the agent may still send: the credit it was given

    # -- frames from the agent -------------------------------------------------------------------

    def received(self, each: Frame) -> None:
        sink = self.sink
        if each.kind is Kind.STDOUT or each.kind is Kind.STDERR:
            self._output_room -= len(each.payload)
            if self._output_room < -OUTPUT_OVERSHOOT:  # held here, and by asyncssh, unbounded
                raise FrameError(f"{each.kind.name} beyond its credit on channel {self.channel}")
            if sink is not None:
                if each.kind is Kind.STDOUT:
                    sink.backend_stdout(each.payload)
                else:
                    sink.backend_stderr(each.payload)
            self._owed += len(each.payload)
            self._grant_output()
        elif each.kind is Kind.CREDIT:
            self._credit += each.count()
            if not self.started.done():
                self.started.set_result(None)
            self._send_input()
        elif each.kind is Kind.EXIT:
            status = each.count()
            self._end()
            if not self.started.done():  # no CREDIT came first: the open fails, at once
                detail = f"agent ended the channel before it started (exit status {status})"
                self.started.set_exception(BackendError(self._repo, detail))
            elif sink is not None:
                sink.backend_finished(status)
        elif each.kind is Kind.REFUSED or each.kind is Kind.DRAINING:
            self._refused(each)
        else:
            raise FrameError(f"{each.kind.name} from an agent")

    def _refused(self, each: Frame) -> None:
        """The agent did not start the command. If because it drains, the connection is retired
        here too: its own DRAINING came first, but the retry must not depend on that. The open
        may have been given up meanwhile (the client left): the channel ends all the same."""
        if self.started.done() and not self.started.cancelled():
            raise FrameError(f"{each.kind.name} on a running channel")
        if each.kind is Kind.DRAINING:
            error: BackendError = Draining(self._repo, "agent refused: it drains")
            if self._link is not None:
                self._pool.retire(self._link)
        else:
            reason = each.payload.decode(errors="replace")
            error = BackendError(self._repo, f"agent refused: {reason}")
        self._end()
        if not self.started.done():
            self.started.set_exception(error)

    def lost(self, detail: str, retired: bool = False) -> None:
        """The connection went. A channel not started yet on a connection the pool had retired
        (its agent said it drains) ran nothing the client saw (no CREDIT, so no stdin either):
        it may be opened on another connection (`Draining`)."""
        self._release()
        error = BackendError(self._repo, f"backend {self._pool.name}: {detail}")
        if not self.started.done():
            if retired:
                error = Draining(self._repo, f"{detail} before the channel started")
            self.started.set_exception(error)
            return
        sink, self.sink = self.sink, None
        if sink is not None:
            sink.backend_lost(error)

    def failed(self) -> None:
        """Its sink raised (`AgentConnection.channel_frame` logged it): the command is closed,
        and the relay told, if it still can be."""
        sink = self.sink
        self.abort()
        if not self.started.done():
            self.started.set_exception(BackendError(self._repo, "internal error"))
        else:
            sink_failed(sink, self._repo, self._pool.name, self.session)

    def update_flow(self) -> None:
        """Pause or resume the client as the credit and the connection's buffer allow."""
        sink = self.sink
        if sink is None:
            return
        full = self._credit <= 0 or bool(self._held) or self.conn.write_paused
        self._input_flow.turn(full, sink.backend_pause_input, sink.backend_resume_input)

    def _grant_output(self) -> None:
        # A quarter window at a time: one CREDIT frame per few hundred KiB, and the agent
        # never runs dry while the relay keeps up.
        if not self._output_paused and self._owed >= self._window // 4 and self._link:
            self.conn.send(count_frame(Kind.CREDIT, self.channel, self._owed))
            self._output_room += self._owed
            self._owed = 0

    # -- BackendStream ---------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self._link is None:
            return
        self._held += data  # only past the credit: the relay is paused meanwhile
        self._send_input()

    def write_eof(self) -> None:
        self._eof = True
        self._send_input()

    def _send_input(self) -> None:
        """Send what the credit allows, hold the rest: the agent never gets more than it
        granted. What the relay writes after it was paused is bounded by its SSH window."""
        if self._link is None:
            return
        if self._held and self._credit > 0:
            piece = bytes(self._held[: self._credit])
            del self._held[: len(piece)]
            self.conn.send(data_frames(Kind.STDIN, self.channel, piece))
            self._credit -= len(piece)
        if self._eof and not self._held:
            self._eof = False
            self.conn.send(frame(Kind.STDIN_EOF, self.channel))
        self.update_flow()

    def pause_output(self) -> None:
        self._output_paused = True

    def resume_output(self) -> None:
        self._output_paused = False
        self._grant_output()

    def abort(self) -> None:
        self.sink = None
        if self._link is not None:
            self.conn.send(frame(Kind.CLOSE, self.channel))
        self._end()

    def _end(self) -> None:
        self.conn.forget(self.channel)
        self._release()

    def _release(self) -> None:
        link, self._link = self._link, None
        if link is not None:
            self._pool.release(link)


def agent_pool(
    name: str,
    address: tuple[str, int],
    context: Callable[[], ssl.SSLContext],
    settings: tuple[int, float, float],
    dial_timeout: float,
    on_dial: Callable[[float], None] | None = None,
) -> AgentPool:
    """`settings`: sessions per connection, idle seconds, keepalive seconds."""
    max_sessions, idle, keepalive = settings
    host, port = address

    async def connect(link: AgentLink) -> AgentConnection:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(
            lambda: AgentConnection(link, keepalive),
            host,
            port,
            ssl=context(),
            server_hostname=host,
            ssl_handshake_timeout=dial_timeout,
        )
        try:
            await conn.answered  # the agent accepted our certificate (TLS 1.3 says so only now)
        except ConnectionError as exc:
            raise DialFailed(f"refused by the agent: {exc}") from None
        except BaseException:  # the dial timed out after the handshake: nobody else has conn
            conn.abort()
            raise
        return conn

    return Pool(name, address, connect, max_sessions, idle, dial_timeout, on_dial,
                heard=lambda conn: conn.received)  # fmt: skip


class AgentBackend:
    def __init__(self, name: str, pool: AgentPool, window: int) -> None:
        self.name = name
        self.pool = pool
        self.window = window

    async def open(self, request: BackendRequest, sink: BackendSink) -> BackendStream:
        repo = request.route.repo
        opening = OpenRequest(
            request.session_id,
            repo,
            request.verb.value,
            request.route.path,
            request.environment(),
            self.window,
        )

        async def start(stream: AgentStream, conn: AgentConnection) -> None:
            conn.send(opening.encode(stream.channel))
            await stream.started  # the agent's CREDIT, or why not (refused, draining, lost)

        def stream_on(link: AgentLink) -> AgentStream:
            return AgentStream(sink, link, request.session_id, repo, self.window)

        return await self.pool.open_channel(repo, stream_on, start, request.session_id)

    async def close(self) -> None:
        await self.pool.close()
