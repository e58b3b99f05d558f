"""A worker's pool of SSH connections to one storage server (SPEC 5).

Owns the connections it dials and nothing else. Each session is a channel on a pooled connection
(at most `max_sessions` at once), so a clone does not pay a handshake. A connection that is being
dialled already counts its reservations, so a burst of sessions shares a few dials instead of
each opening its own. Idle connections close after `idle` seconds (a timer, not a task); a broken
one leaves the pool at once and the next session dials a new one. Every dial is bounded by the
dial timeout, TCP connect and handshake together.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import asyncssh

from kilnproxy.errors import BackendError

log = logging.getLogger("kilnproxy.backend")

# The backend leg is ours on both ends: AES-GCM is the cheapest AEAD in this stack.
BACKEND_CIPHERS = [
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "chacha20-poly1305@openssh.com",
]
BACKEND_KEX = ["curve25519-sha256", "curve25519-sha256@libssh.org", "diffie-hellman-group16-sha512"]
KEEPALIVE_COUNT = 3  # unanswered keepalives before a connection is given up


class LinkState(enum.Enum):
    DIALING = "dialing"
    OPEN = "open"
    CLOSED = "closed"


@dataclass(frozen=True)
class Target:
    """Where and how to reach one storage server."""

    name: str
    host: str
    port: int
    user: str
    key: Path
    known_hosts: Path


class Link(asyncssh.SSHClient):
    """One pooled connection; its `active` count includes reservations made while dialing."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.state = LinkState.DIALING
        self.active = 0
        self.conn: asyncssh.SSHClientConnection | None = None
        # Done when the dial is over: None, or why it failed (each waiter names its own repo).
        self.ready: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self.idle_timer: asyncio.TimerHandle | None = None
        self.dial_task: asyncio.Task[None] | None = None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.state is LinkState.OPEN:
            log.warning("backend %s: connection lost (%s)", self.pool.target.name, exc or "closed")
        self.pool.drop(self)


class Pool:
    def __init__(
        self,
        target: Target,
        max_sessions: int,
        idle: float,
        dial_timeout: float,
        on_dial: Callable[[float], None] | None = None,
        keepalive: float = 15.0,
    ) -> None:
        self.target = target
        self.keepalive = keepalive
        self.on_dial = on_dial  # told how long each successful dial took
        self.max_sessions = max_sessions
        self.idle = idle
        self.dial_timeout = dial_timeout
        self.links: list[Link] = []
        self.dials = 0  # total connections dialled, for statistics and tests

    async def acquire(self, repo: str) -> Link:
        """A link with a free channel slot, dialing one if none has room."""
        for link in self.links:
            if link.active < self.max_sessions and link.state is not LinkState.CLOSED:
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
            self.release(link)
            raise BackendError(repo, failure or f"backend {self.target.name}: connection closed")
        return link

    def release(self, link: Link) -> None:
        link.active -= 1
        if link.active == 0 and link.state is LinkState.OPEN:
            loop = asyncio.get_running_loop()
            link.idle_timer = loop.call_later(self.idle, self._close_idle, link)

    def _close_idle(self, link: Link) -> None:
        link.idle_timer = None
        if link.active == 0 and link.conn is not None:
            log.info("backend %s: closing idle connection", self.target.name)
            self.drop(link)  # ours: connection_lost will find it gone, and not warn
            link.conn.close()

    def drop(self, link: Link) -> None:
        link.state = LinkState.CLOSED
        if link.idle_timer is not None:
            link.idle_timer.cancel()
            link.idle_timer = None
        if link in self.links:
            self.links.remove(link)

    async def _dial(self, link: Link) -> None:
        target = self.target
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.dial_timeout):
                link.conn, _ = await asyncssh.create_connection(
                    lambda: link,
                    target.host,
                    target.port,
                    username=target.user,
                    client_keys=[str(target.key)],
                    known_hosts=str(target.known_hosts),
                    connect_timeout=self.dial_timeout,
                    keepalive_interval=self.keepalive,
                    keepalive_count_max=KEEPALIVE_COUNT,
                    encryption_algs=BACKEND_CIPHERS,
                    kex_algs=BACKEND_KEX,
                    compression_algs=["none"],
                    agent_path=None,
                    config=None,
                    preferred_auth=["publickey"],
                )
        except (OSError, TimeoutError, asyncssh.Error) as exc:
            detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            log.warning("backend %s: cannot connect to %s:%d: %s",
                        target.name, target.host, target.port, detail)  # fmt: skip
            self.drop(link)
            link.ready.set_result(f"backend {target.name}: {detail}")
            return
        finally:
            link.dial_task = None
        if link.state is LinkState.CLOSED:  # lost during the handshake
            link.ready.set_result(None)
            return
        link.state = LinkState.OPEN
        took = time.monotonic() - started
        log.info("backend %s: connected in %.3fs", target.name, took)
        if self.on_dial is not None:
            self.on_dial(took)
        link.ready.set_result(None)

    async def close(self) -> None:
        for link in list(self.links):
            if link.conn is not None:
                link.conn.close()
        self.links.clear()

    def statistics(self) -> dict[str, int]:
        return {
            "connections": len(self.links),
            "channels": sum(link.active for link in self.links),
            "dials": self.dials,
        }
