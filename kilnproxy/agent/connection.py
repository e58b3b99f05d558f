"""One proxy's TLS connection to the agent: frames in, each channel's command out.

The connection owns its channels; when it goes (the proxy closed it, or the network did),
every command still running is aborted as the local backend aborts one whose client left. When
the agent drains, the proxy is told (DRAINING), so that it opens its next sessions elsewhere;
an OPEN that comes all the same is refused with DRAINING, and the connection closes once its
last command has ended.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Protocol

from kilnproxy.agent.channel import Channel
from kilnproxy.backends.frames import (
    CONTROL,
    Frame,
    FrameError,
    Kind,
    OpenRequest,
    count_frame,
    frame,
)
from kilnproxy.backends.wire import FrameConnection
from kilnproxy.errors import client_line

log = logging.getLogger("kilnproxy.agent")
INTERNAL_ERROR_STATUS = 1  # as the proxy's own internal error (SPEC 3)
REPLIES_HELD = 8 << 20  # bytes waiting for a proxy, past which it is not read (see below)


class Host(Protocol):
    """What a connection needs of the agent serving it."""

    base: Path
    hook_rc: Path
    window: int

    @property
    def draining(self) -> bool: ...

    def refusal(self, channel: Channel) -> str | None:
        """Why `channel`'s command may not run now (logged), or None: it may."""
        ...

    def start(self, channel: Channel) -> None: ...

    def gone(self, conn: ProxyConnection) -> None: ...


class ProxyConnection(FrameConnection[Channel]):
    def __init__(self, host: Host, peer: str) -> None:
        super().__init__()
        self.host = host
        self.peer = peer
        self.draining = False  # the proxy was told
        self._replies_held = False  # reading paused: what we send waits, past REPLIES_HELD

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        cert = transport.get_extra_info("peercert") or {}
        subject = dict(pair[0] for pair in cert.get("subject", ()))
        log.info("proxy %s connected (certificate %s)", self.peer, subject.get("commonName", "?"))
        super().connection_made(transport)  # what was sent before start_tls handed it over

    def protocol_error(self, error: FrameError) -> None:
        log.warning("proxy %s: protocol error, closing: %s", self.peer, error)

    # Each PING is answered and each OPEN refused, whether the proxy reads the answers or not:
    # past REPLIES_HELD bytes waiting for it, what it sends is read no more, until they are
    # down to the write buffer's low mark. Well above what the channels' output puts there
    # (each stops at the buffer's high mark, give or take a pipe read), so that a proxy that
    # reads is never held up; only one that misbehaves meets it.

    def buffer_updated(self, nbytes: int) -> None:
        super().buffer_updated(nbytes)
        transport = self.transport
        if transport is not None and transport.get_write_buffer_size() > REPLIES_HELD:
            transport.pause_reading()
            self._replies_held = True

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._replies_held and self.transport is not None:
            self._replies_held = False
            self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        connected = self.transport is not None
        super().connection_lost(exc)
        if not connected:  # its handshake failed (asyncio tells the protocol all the same)
            return
        channels, self.channels = self.channels, {}
        for channel in channels.values():
            channel.close(f"connection from {self.peer} lost ({exc or 'closed'})")
        log.info("proxy %s disconnected", self.peer)
        self.host.gone(self)

    def channel_frame(self, each: Frame) -> None:
        if each.kind is Kind.OPEN:
            self._open(each)
            return
        channel = self.channels.get(each.channel)
        if channel is None:
            return  # ended here while the proxy was still sending
        try:
            self._to_channel(channel, each)
        except FrameError:
            raise  # the proxy broke the protocol: the connection goes, with every channel
        except Exception:  # a bug on one channel ends that command only, not the connection
            channel.log.exception("failed on a %s frame (repo %s)", each.kind.name,
                                  channel.request.repo)  # fmt: skip
            line = client_line("internal error", channel.request.session)
            self.send(frame(Kind.STDERR, each.channel, line.encode()))
            self.send(count_frame(Kind.EXIT, each.channel, INTERNAL_ERROR_STATUS))
            channel.close("internal error")

    def _to_channel(self, channel: Channel, each: Frame) -> None:
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
        if self.host.draining:  # the proxy sent it before it heard our DRAINING
            channel.log.info("refused %s (repo %s): the agent is draining, the proxy will try "
                             "another connection", request.verb, request.repo)  # fmt: skip
            self._tell_draining()
            self.send(frame(Kind.DRAINING, each.channel))
            self.forget(each.channel)  # closes the connection if it runs nothing
            return
        refusal = self.host.refusal(channel)
        if refusal is not None:
            self.send(frame(Kind.REFUSED, each.channel, refusal.encode()))
            return
        self.channels[each.channel] = channel
        self.host.start(channel)

    def forget(self, channel: int) -> None:
        self.channels.pop(channel, None)
        if self.host.draining and not self.channels:
            self.close()

    def drain(self) -> None:
        """The agent drains: tell the proxy to open nothing more here; close if idle."""
        self._tell_draining()
        if not self.channels:
            self.close()

    def _tell_draining(self) -> None:
        if not self.draining:
            self.draining = True
            self.send(frame(Kind.DRAINING, CONTROL))
