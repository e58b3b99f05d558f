"""One connection that speaks the agent protocol (`frames`), from either end: what the proxy's
`AgentConnection` and the agent's `ProxyConnection` share.

It owns the frame decoder, the control channel (a PING is answered with a PONG; what a peer's
DRAINING means is the subclass's business), and the connection's write back-pressure, which it
passes to every channel (`Flow.update_flow`): a full socket pauses them all. Each end's channel
turns that, and its credit, into a pause or a resume of whatever feeds it (`FlowSwitch`). What a
channel's frames mean is the subclass's business. It never interprets a channel's bytes, and
never buffers beyond what is sent before the transport exists.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar, cast

from kilnproxy.backends.frames import CONTROL, Frame, FrameError, FrameReader, Kind, frame


class Flow(Protocol):
    def update_flow(self) -> None:
        """The connection's write buffer filled or drained: pause or resume as it allows."""


class FlowSwitch:
    """Whether a channel holds back what feeds it (the proxy its client, the agent its command's
    output): each end's `update_flow` says whether it must, and the switch calls `pause` or
    `resume` only when that changes, so the feeder hears each change once."""

    def __init__(self) -> None:
        self.paused = False

    def turn(self, paused: bool, pause: Callable[[], None], resume: Callable[[], None]) -> None:
        if paused is not self.paused:
            self.paused = paused
            if paused:
                pause()
            else:
                resume()


F = TypeVar("F", bound=Flow)


class FrameConnection(asyncio.BufferedProtocol, Generic[F]):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.channels: dict[int, F] = {}
        self.write_paused = False
        self._reader = FrameReader()
        self._early: list[bytes] = []  # sent before the transport was handed over
        self._lost = False

    # -- for subclasses --------------------------------------------------------------------------

    def channel_frame(self, each: Frame) -> None:
        """A frame of a channel (not the control channel's)."""
        raise NotImplementedError

    def protocol_error(self, error: FrameError) -> None:
        """The peer broke the protocol: log it; the connection is aborted after this."""

    def pong(self) -> None:
        """The peer answered a PING."""

    def peer_draining(self) -> None:
        """The peer takes no new channel on this connection (only an agent says so)."""
        raise FrameError("DRAINING from a proxy")

    # -- asyncio callbacks -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        early, self._early = self._early, []
        for data in early:
            self.send(data)

    def get_buffer(self, sizehint: int) -> memoryview:
        # A BufferedProtocol: TLS decrypts into the frame reader's area, not into bytes of its
        # own that it would then join (uvloop's and asyncio's SSL protocols both do that).
        return self._reader.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        try:
            for each in self._reader.buffer_updated(nbytes):
                if each.channel != CONTROL:
                    self.channel_frame(each)
                elif each.kind is Kind.PING:
                    self.send(frame(Kind.PONG, CONTROL))
                elif each.kind is Kind.PONG:
                    self.pong()
                elif each.kind is Kind.DRAINING:
                    self.peer_draining()
                else:
                    raise FrameError(f"{each.kind.name} on the control channel")
        except FrameError as exc:
            self.protocol_error(exc)
            self.abort()

    def eof_received(self) -> bool | None:
        return False  # the peer hung up: close; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        """Let go of the transport (subclasses call this first): the TLS protocol under it
        keeps this connection's `get_buffer` once the connection is lost (asyncio's and
        uvloop's alike), and a transport kept here closes the cycle. Only the cyclic collector
        would then free the connection, with the frame reader's area and the TLS buffers
        (about 800 KiB), and a process that allocates little runs it seldom: an agent whose
        proxies' connections came and went grew by that much for each, for as long as a full
        collection did not come."""
        self.transport = None
        self._lost = True

    def pause_writing(self) -> None:
        self.write_paused = True
        for channel in list(self.channels.values()):
            channel.update_flow()

    def resume_writing(self) -> None:
        self.write_paused = False
        for channel in list(self.channels.values()):
            channel.update_flow()

    # -- sending ---------------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        if self._lost:
            return
        if self.transport is None:
            self._early.append(data)
        elif not self.transport.is_closing():
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()
