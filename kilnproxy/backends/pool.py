"""A worker's pool of connections to one storage server (SPEC 5), whatever speaks on them.

Owns the connections it dials and nothing else. Each session is a channel on a pooled connection
(at most `max_sessions` at once), so a clone does not pay a handshake. A connection that is
being dialled already counts its reservations, so a burst of sessions shares a few dials instead
of each opening its own. Idle connections close after `idle` seconds (a timer, not a task); a
broken one leaves the pool at once and the next session dials a new one. A connection whose peer
said it takes no new channel (an agent that drains) is retired: never handed out again, and
closed once its last channel has ended; a session that was to open its channel there is told so
(`Draining`), and opens it once more on another connection. So is a connection that has started
channels and then has one refused (an sshd at its MaxSessions: it counts a channel closed here
as long as its command runs there). Every dial is bounded by the dial timeout, TCP connect and
handshake together, and so is opening a channel on a connection (`open_channel`). A connection
on which a channel did not open in time, and on which nothing at all came meanwhile, is retired
too: a peer that has stopped answering there (a frozen host, a firewall that forgot the flow)
would otherwise be handed every next session, each to wait out the dial timeout in turn, until
the keepalive gives the connection up. (One that is only slow to start that command, while its
other channels flow, is not: a new dial would not help.) What a connection is (an SSH connection
for ssh://, a TLS one for agent://) and how a channel starts on it are the backend's business:
the pool only counts.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Generic, Protocol, TypeVar

from kilnproxy.errors import BackendError, KilnproxyError
from kilnproxy.policy.admission import RefusalLog

log = logging.getLogger("kilnproxy.backend")
TRACEBACK_EVERY = 60.0  # seconds between tracebacks of the same pool's unforeseen dial errors


class LinkState(enum.Enum):
    DIALING = "dialing"
    OPEN = "open"
    DRAINING = "draining"  # open, but the peer takes no new channel: handed out no more
    CLOSED = "closed"


class Closable(Protocol):
    def close(self) -> None: ...


class Abortable(Protocol):
    def abort(self) -> None: ...


C = TypeVar("C", bound=Closable)
S = TypeVar("S", bound=Abortable)


class Draining(BackendError):
    """The peer takes no new channel on the connection (it drains): another connection may."""


class DialFailed(KilnproxyError):
    """A connect function's own failure (its library's exception, put in words)."""


class Link(Generic[C]):
    """One pooled connection; its `active` count includes reservations made while dialing."""

    def __init__(self, pool: Pool[C]) -> None:
        self.pool = pool
        self.state = LinkState.DIALING
        self.active = 0
        self.conn: C | None = None
        # Done when the dial is over: None, or why it failed (each waiter names its own repo).
        self.ready: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self.idle_timer: asyncio.TimerHandle | None = None
        self.dial_task: asyncio.Task[None] | None = None
        self.started = 0  # channels started on it, all told

    def lost(self, exc: Exception | None) -> None:
        """The connection went away (the connection's own callback says so)."""
        if self.state is LinkState.OPEN:
            log.warning("backend %s: connection lost (%s)", self.pool.name, exc or "closed")
        self.pool.drop(self)
        # The connection refers to its link: the pair would wait for the cyclic collector.
        # Sessions still on it hold the connection themselves.
        self.conn = None


Connect = Callable[[Link[C]], Awaitable[C]]
_HANDED_OUT = (LinkState.DIALING, LinkState.OPEN)


class Pool(Generic[C]):
    def __init__(
        self,
        name: str,
        address: tuple[str, int],
        connect: Connect[C],
        max_sessions: int,
        idle: float,
        dial_timeout: float,
        on_dial: Callable[[float], None] | None = None,
        heard: Callable[[C], int] | None = None,
    ) -> None:
        self.name = name
        self.address = address
        self.connect = connect
        self.on_dial = on_dial  # told how long each successful dial took
        self.heard = heard  # what a connection has received so far (bytes, packets), if known
        self.max_sessions = max_sessions
        self.idle = idle
        self.dial_timeout = dial_timeout
        self.links: list[Link[C]] = []
        self.dials = 0  # total connections dialled, for statistics and tests
        # Unforeseen dial errors: each session dials again, so a traceback once a minute.
        self._tracebacks = RefusalLog(burst=1, period=TRACEBACK_EVERY)

    async def acquire(self, repo: str) -> Link[C]:
        """A link with a free channel slot, dialing one if none has room."""
        for link in self.links:
            if link.active < self.max_sessions and link.state in _HANDED_OUT:
                link.active += 1
                break
        else:
            link = Link(self)
            link.active = 1
            self.links.append(link)
            self.dials += 1
            link.dial_task = asyncio.get_running_loop().create_task(self._dial(link))
        if link.idle_timer is not None:
            link.idle_timer.cancel()
            link.idle_timer = None
        try:
            # Shielded: one waiter giving up must not cancel the dial the others wait for.
            failure = await asyncio.shield(link.ready)
        except BaseException:
            self.release(link)
            raise
        if link.state is not LinkState.OPEN:
            state = link.state  # a release may close it
            self.release(link)
            if state is LinkState.DRAINING:  # the peer said so while it was dialled
                raise Draining(repo, "the peer drains the connection dialled")
            raise BackendError(repo, failure or f"backend {self.name}: connection {state.value}")
        return link

    async def open_channel(
        self,
        repo: str,
        stream_on: Callable[[Link[C]], S],
        start: Callable[[S, C], Awaitable[object]],
        session: str,
    ) -> S:
        """A channel for `repo`: a slot on a connection, the stream that holds it, and its start
        (`start` raises BackendError for its own failures) within the dial timeout, so that a
        wedged storage server cannot hang the session. However the start fails, cancelled too
        (the client left meanwhile), the stream is aborted, which gives its slot back. If the
        peer takes no new channel on that connection (`Draining`: an agent that drains, an
        sshd at its MaxSessions), the connection is retired, and the channel is opened once
        more, on another: dialled anew unless one has room, and refused for good if that one
        takes none either."""
        try:
            return await self._open_channel(repo, stream_on, start)
        except Draining as exc:
            log.info("backend %s: %s; opening the channel on another connection", self.name,
                     exc.detail, extra={"session": session})  # fmt: skip
        return await self._open_channel(repo, stream_on, start)

    async def _open_channel(
        self,
        repo: str,
        stream_on: Callable[[Link[C]], S],
        start: Callable[[S, C], Awaitable[object]],
    ) -> S:
        link = await self.acquire(repo)
        conn = link.conn
        assert conn is not None
        heard = self.heard(conn) if self.heard is not None else None
        stream = stream_on(link)
        try:
            async with asyncio.timeout(self.dial_timeout):
                await start(stream, conn)
        except TimeoutError:
            late = f"no channel within {self.dial_timeout:g}s"
            if heard is not None and self.heard is not None and self.heard(conn) == heard:
                self.retire(link, f"{late}, and nothing else came: new sessions go to another "
                                  "connection")  # fmt: skip
            stream.abort()
            raise BackendError(repo, f"backend {self.name}: {late}") from None
        except Draining as exc:
            self.retire(link, f"{exc.detail}: new sessions go to another connection")
            stream.abort()
            raise
        except BaseException:
            stream.abort()
            raise
        link.started += 1
        return stream

    def release(self, link: Link[C]) -> None:
        link.active -= 1
        if link.active > 0:
            return
        if link.state is LinkState.OPEN:
            self._idle_from_now(link)
        elif link.state is LinkState.DRAINING:
            self._close(link, "closing a drained connection")

    def retire(self, link: Link[C], why: str = "") -> None:
        """No new channel on `link` (its peer drains, or `why`): sessions go to another
        connection, and this one closes once its channels have ended."""
        if link.state is LinkState.CLOSED or link.state is LinkState.DRAINING:
            return
        if why:
            log.warning("backend %s: %s", self.name, why)
        else:
            log.info("backend %s: the peer drains a connection (%d channel(s) on it); new "
                     "sessions go to another", self.name, link.active)  # fmt: skip
        link.state = LinkState.DRAINING
        if link.active == 0:
            self._close(link, "closing a drained connection")

    def _idle_from_now(self, link: Link[C]) -> None:
        link.idle_timer = asyncio.get_running_loop().call_later(self.idle, self._close_idle, link)

    def _close_idle(self, link: Link[C]) -> None:
        link.idle_timer = None
        if link.active == 0:
            self._close(link, "closing idle connection")

    def _close(self, link: Link[C], why: str) -> None:
        if link.conn is not None:
            log.info("backend %s: %s", self.name, why)
            self.drop(link)  # ours: the connection's loss will find it gone, and not warn
            link.conn.close()

    def drop(self, link: Link[C]) -> None:
        link.state = LinkState.CLOSED
        if link.idle_timer is not None:
            link.idle_timer.cancel()
            link.idle_timer = None
        if link in self.links:
            self.links.remove(link)

    async def _dial(self, link: Link[C]) -> None:
        host, port = self.address
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.dial_timeout):
                link.conn = await self.connect(link)
        except (OSError, TimeoutError, DialFailed) as exc:
            if isinstance(exc, DialFailed):
                detail = str(exc)
            else:
                detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            log.warning("backend %s: cannot connect to %s:%d: %s", self.name, host, port, detail)
            self._dial_failed(link, detail)
            return
        except Exception as exc:  # a bug, or what no one foresaw (asyncssh's ValueError for a
            # malformed key): this dial fails, and the next session dials again; a link left
            # dialling would hold every later session of the backend on its `ready`
            detail = f"{type(exc).__name__}: {exc}"
            if self._tracebacks.should_log("dial", time.monotonic()) is not None:
                log.exception("backend %s: cannot connect to %s:%d", self.name, host, port)
            else:
                log.warning("backend %s: cannot connect to %s:%d: %s", self.name, host, port,
                            detail)  # fmt: skip
            self._dial_failed(link, detail)
            return
        finally:
            link.dial_task = None
        if link.state is not LinkState.DIALING:  # lost, retired or closed during the handshake
            if link.state is LinkState.CLOSED:  # as `Link.lost`; and the pool's: closed with it
                conn, link.conn = link.conn, None
                if conn is not None:
                    conn.close()  # (a connection already lost closes again: nothing)
            link.ready.set_result(None)
            return
        link.state = LinkState.OPEN
        took = time.monotonic() - started
        log.info("backend %s: connected in %.3fs", self.name, took)
        if self.on_dial is not None:
            self.on_dial(took)
        link.ready.set_result(None)
        if link.active == 0:  # every session that waited for it has given up
            self._idle_from_now(link)

    def _dial_failed(self, link: Link[C], detail: str) -> None:
        self.drop(link)
        link.ready.set_result(f"backend {self.name}: {detail}")

    async def close(self) -> None:
        for link in list(self.links):
            conn = link.conn
            self.drop(link)  # ours: the connection's loss will find it gone, and not warn
            if conn is not None:
                conn.close()
        self.links.clear()

    def statistics(self) -> dict[str, int]:
        return {
            "connections": len(self.links),
            "channels": sum(link.active for link in self.links),
            "dials": self.dials,
        }
