"""One proxy's TLS connection to the agent: frames in, each channel's command out.

The connection owns its channels; when it goes (the proxy closed it, or the network did),
every command still running is aborted as the local backend aborts one whose client left.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Protocol, cast

from kilnproxy.agent.channel import Channel
from kilnproxy.backends.frames import (
    CONTROL,
    Frame,
    FrameError,
    FrameReader,
    Kind,
    OpenRequest,
    frame,
)

log = logging.getLogger("kilnproxy.agent")


class Host(Protocol):
    """What a connection needs of the agent serving it."""

    base: Path
    hook_rc: Path
    window: int
    draining: bool

    def start(self, channel: Channel) -> None: ...

    def gone(self, conn: ProxyConnection) -> None: ...


class ProxyConnection(asyncio.Protocol):
    def __init__(self, host: Host, peer: str) -> None:
        self.host = host
        self.peer = peer
        self.transport: asyncio.Transport | None = None
        self.channels: dict[int, Channel] = {}
        self.write_paused = False
        self._reader = FrameReader()
        # What was sent before start_tls handed us the transport (the proxy's first PING may
        # come with the end of the handshake).
        self._early: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        cert = self.transport.get_extra_info("peercert") or {}
        subject = dict(pair[0] for pair in cert.get("subject", ()))
        log.info("proxy %s connected (certificate %s)", self.peer, subject.get("commonName", "?"))
        early, self._early = self._early, []
        for data in early:
            self.send(data)

    def data_received(self, data: bytes) -> None:
        try:
            for each in self._reader.feed(data):
                self._dispatch(each)
        except FrameError as exc:
            log.warning("proxy %s: protocol error, closing: %s", self.peer, exc)
            self.abort()

    def eof_received(self) -> bool | None:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        channels, self.channels = self.channels, {}
        for channel in channels.values():
            channel.close(f"connection from {self.peer} lost ({exc or 'closed'})")
        log.info("proxy %s disconnected", self.peer)
        self.host.gone(self)

    def pause_writing(self) -> None:
        self.write_paused = True
        for channel in list(self.channels.values()):
            channel.update_output()

    def resume_writing(self) -> None:
        self.write_paused = False
        for channel in list(self.channels.values()):
            channel.update_output()

    def _dispatch(self, each: Frame) -> None:
        if each.channel == CONTROL:
            if each.kind is Kind.PING:
                self.send(frame(Kind.PONG, CONTROL))
            elif each.kind is not Kind.PONG:
                raise FrameError(f"{each.kind.name} on the control channel")
            return
        if each.kind is Kind.OPEN:
            self._open(each)
            return
        channel = self.channels.get(each.channel)
        if channel is None:
            return  # ended here while the proxy was still sending
        if each.kind is Kind.STDIN:
            channel.stdin(each.payload)
        elif each.kind is Kind.STDIN_EOF:
            channel.stdin_eof()
        elif each.kind is Kind.CREDIT:
            channel.credit(each.count())
        elif each.kind is Kind.CLOSE:
            channel.close("closed by the proxy")
        else:
            raise FrameError(f"{each.kind.name} from a proxy")

    def _open(self, each: Frame) -> None:
        if each.channel in self.channels:
            raise FrameError(f"channel {each.channel} opened twice")
        request = OpenRequest.decode(each.payload)
        channel = Channel(self, each.channel, request, self.host.window)
        if self.host.draining:
            channel.log.warning("refused %s (repo %s): the agent is shutting down",
                                request.verb, request.repo)  # fmt: skip
            self.send(frame(Kind.REFUSED, each.channel, b"the agent is shutting down"))
            return
        self.channels[each.channel] = channel
        self.host.start(channel)

    def send(self, data: bytes) -> None:
        if self.transport is None:
            self._early.append(data)
        elif not self.transport.is_closing():
            self.transport.write(data)

    def forget(self, channel: int) -> None:
        self.channels.pop(channel, None)
        if self.host.draining and not self.channels:
            self.close()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
