"""The ssh:// backend (SPEC 5): a repository command on a storage server's own sshd.

Owns one Pool per backend. Each request is a channel on a pooled connection: the command with
the backend path shell-quoted, and GIT_PROTOCOL and KILNPROXY_* as `env` requests (the storage
sshd must AcceptEnv them). The channel's flow control maps onto the relay's both ways, as the
local backend's pipes do. As the local backend and the agent do, it looks for the repository
first (the command runs only if its path is a directory): a missing one is the storage's failure,
said to the client as such, and never git's or hg's own words, which would show the storage path.
A session whose relay fails on its output ends alone: the pooled connection and its other
channels go on.
"""

from __future__ import annotations

import asyncio
import logging
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from signal import Signals
from typing import Any

import asyncssh

from kilnproxy.backends.base import (
    BackendRequest,
    BackendSink,
    BackendStream,
    StdinBackPressure,
    sink_failed,
)
from kilnproxy.backends.pool import DialFailed, Draining, Link, Pool
from kilnproxy.errors import BackendError
from kilnproxy.policy.commands import Verb

log = logging.getLogger("kilnproxy.backend")

# The backend leg is ours on both ends: AES-GCM is the cheapest AEAD in this stack.
BACKEND_CIPHERS = [
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "chacha20-poly1305@openssh.com",
]
BACKEND_KEX = ["curve25519-sha256", "curve25519-sha256@libssh.org", "diffie-hellman-group16-sha512"]
KEEPALIVE_COUNT = 3  # unanswered keepalives before a connection is given up

# A storage sshd reads at most 32 KiB from git per turn and sends what it has at once: with a
# window that is never short, it sends git's 8 KiB writes as 8 KiB packets, and each packet costs
# us a fixed amount of work. A window of a few hundred KiB ([backend_ssh] window) has it send
# fuller packets, up to this size, without holding a transfer back on a datacenter network.
MAX_PACKET = 256 * 1024
# What the command exits with, having said nothing, when the repository path is not a directory
# (sysexits' EX_NOINPUT): neither git nor hg exits with it, and each says something when it fails.
NO_REPOSITORY = 66


@dataclass(frozen=True)
class Target:
    """Where and how to reach one storage server's sshd."""

    name: str
    host: str
    port: int
    user: str
    key: Path
    known_hosts: Path
    keepalive: float = 15.0


SshPool = Pool[asyncssh.SSHClientConnection]
SshLink = Link[asyncssh.SSHClientConnection]


class _Client(asyncssh.SSHClient):
    """Tells the pool when its connection is gone."""

    def __init__(self, link: SshLink) -> None:
        self.link = link

    def connection_lost(self, exc: Exception | None) -> None:
        self.link.lost(exc)


def ssh_pool(
    target: Target,
    max_sessions: int,
    idle: float,
    dial_timeout: float,
    on_dial: Callable[[float], None] | None = None,
) -> SshPool:
    async def connect(link: SshLink) -> asyncssh.SSHClientConnection:
        try:
            conn, _ = await asyncssh.create_connection(
                lambda: _Client(link),
                target.host,
                target.port,
                username=target.user,
                client_keys=[str(target.key)],
                known_hosts=str(target.known_hosts),
                connect_timeout=dial_timeout,
                keepalive_interval=target.keepalive,
                keepalive_count_max=KEEPALIVE_COUNT,
                encryption_algs=BACKEND_CIPHERS,
                kex_algs=BACKEND_KEX,
                compression_algs=["none"],
                agent_path=None,
                config=None,
                preferred_auth=["publickey"],
            )
        except asyncssh.Error as exc:
            detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            raise DialFailed(detail) from None
        except asyncssh.KeyImportError as exc:  # a ValueError, not an asyncssh.Error
            raise DialFailed(f"cannot load [backend_ssh] key {target.key}: {exc}") from None
        return conn

    address = (target.host, target.port)
    return Pool(target.name, address, connect, max_sessions, idle, dial_timeout, on_dial,
                heard=received)  # fmt: skip


def received(conn: asyncssh.SSHClientConnection) -> int:
    """Packets received on `conn` so far (the pool's `heard`: a connection on which a channel
    did not open in time, and on which nothing else came, is given up). asyncssh counts them
    for its MACs; it has no public figure of its own."""
    count: int = getattr(conn, "_recv_seq", 0)
    return count


def signal_number(name: str) -> int:
    """The number of the signal an exit-signal names ("TERM", "USR1"), as a shell gives it;
    0 for a name this system does not know."""
    try:
        return int(Signals[f"SIG{name}"])
    except KeyError:
        return 0


def remote_command(request: BackendRequest) -> str:
    """What the storage sshd runs with the account's (POSIX) shell: the repository's command,
    if its path is a directory; else nothing is said, and the status is NO_REPOSITORY."""
    path = shlex.quote(request.route.path)
    if request.verb is Verb.HG_SERVE:
        command = f"hg -R {path} serve --stdio"
    else:
        command = f"{request.verb.value} {path}"  # a git verb is the command's name
    return f"test -d {path} || exit {NO_REPOSITORY}; exec {command}"


class SshStream(StdinBackPressure, asyncssh.SSHClientSession[bytes]):
    """One channel on a pooled connection, relaying to a BackendSink."""

    def __init__(
        self, sink: BackendSink, link: SshLink, session: str, repo: str, path: str
    ) -> None:
        self.sink: BackendSink | None = sink
        self._link: SshLink | None = link
        self._backend = link.pool.name
        self._session = session
        self._repo = repo
        self._path = path
        self._chan: asyncssh.SSHClientChannel[bytes] | None = None
        self._opening: asyncio.Task[tuple[Any, Any]] | None = None
        self._status: int | None = None
        self._silent = True  # nothing came on stdout or stderr yet

    async def open(
        self,
        conn: asyncssh.SSHClientConnection,
        command: str,
        env: dict[str | bytes, str | bytes],
        window: int,
    ) -> None:
        """Open this stream's channel and start its command. The open runs on, shielded, if
        this is cancelled (the dial timeout, or the client left): asyncssh's has no cleanup
        when cancelled, and a channel the storage server confirms later would stay open at
        both ends, holding one of sshd's MaxSessions. `abort` then closes it once it is open."""
        self._opening = asyncio.ensure_future(
            conn.create_session(
                lambda: self, command, env=env, encoding=None, window=window,
                max_pktsize=MAX_PACKET,
            )
        )  # fmt: skip
        await asyncio.shield(self._opening)

    # -- asyncssh callbacks ----------------------------------------------------------------------

    def connection_made(self, chan: asyncssh.SSHClientChannel[bytes]) -> None:
        self._chan = chan

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        self._silent = False
        sink = self.sink
        if sink is None:
            return
        try:
            if datatype == asyncssh.EXTENDED_DATA_STDERR:
                sink.backend_stderr(data)
            else:
                sink.backend_stdout(data)
        except Exception:  # asyncssh would close the pooled connection, with every session on it
            log.exception("backend %s: failed on its output", self._backend,
                          extra={"session": self._session})  # fmt: skip
            self.abort()
            sink_failed(sink, self._repo, self._backend, self._session)

    def exit_status_received(self, status: int) -> None:
        self._status = status

    def exit_signal_received(self, signal: str, core_dumped: bool, msg: str, lang: str) -> None:
        self._status = 128 + signal_number(signal)

    def connection_lost(self, exc: Exception | None) -> None:
        self._release()
        sink, self.sink = self.sink, None
        if sink is None:
            return
        if exc is not None or self._status is None:
            # The connection broke (OpenSSH sends exit-status as soon as the command exits,
            # while output may still be queued: a status is no proof that every byte came), or
            # the server closed the channel without a status.
            detail = f"channel lost ({exc or 'closed without exit status'})"
            sink.backend_lost(BackendError(self._repo, detail))
        elif self._status == NO_REPOSITORY and self._silent:
            detail = f"repository path {self._path} does not exist"
            sink.backend_lost(BackendError(self._repo, detail))
        else:
            sink.backend_finished(self._status)

    # -- BackendStream ---------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self._chan is not None and not self._chan.is_closing():
            self._chan.write(data)

    def write_eof(self) -> None:
        if self._chan is not None and not self._chan.is_closing():
            self._chan.write_eof()

    def pause_output(self) -> None:
        if self._chan is not None:
            self._chan.pause_reading()

    def resume_output(self) -> None:
        if self._chan is not None:
            self._chan.resume_reading()

    def abort(self) -> None:
        self.sink = None
        opening = self._opening
        if opening is not None and not opening.done():
            # Not confirmed yet: its slot stays taken (sshd counts the channel) until it is.
            opening.add_done_callback(self._opened_late)
            return
        if self._chan is not None:
            self._chan.close()
        self._release()

    def _opened_late(self, opening: asyncio.Task[tuple[Any, Any]]) -> None:
        opened = not opening.cancelled() and opening.exception() is None
        if opened and self._chan is not None:
            self._chan.close()  # connection_lost releases the slot
        else:
            self._release()  # refused, or lost: nothing is open

    def _release(self) -> None:
        link, self._link = self._link, None
        if link is not None:
            link.pool.release(link)

    def started_on_its_connection(self) -> bool:
        """Whether channels were started before on the connection this one is asked on."""
        return self._link is not None and self._link.started > 0


class SshBackend:
    def __init__(self, name: str, pool: SshPool, window: int) -> None:
        self.name = name
        self.pool = pool
        self.window = window

    async def open(self, request: BackendRequest, sink: BackendSink) -> BackendStream:
        repo, path = request.route.repo, request.route.path
        env: dict[str | bytes, str | bytes] = {k: v for k, v in request.environment().items()}

        async def start(stream: SshStream, conn: asyncssh.SSHClientConnection) -> None:
            try:
                await stream.open(conn, remote_command(request), env, self.window)
            except asyncssh.ChannelOpenError as exc:
                # On a connection that has started channels, sshd at its MaxSessions: a command
                # whose channel closed here may run on there (a hook, a lock waited for), and
                # sshd counts it until it exits; another connection takes it. On a new one,
                # sshd refuses sessions (overloaded, or misconfigured): another would too, and
                # retiring one connection after another would only add handshakes.
                detail = f"the storage refused a channel ({exc.reason})"
                if stream.started_on_its_connection():
                    raise Draining(repo, detail) from exc
                raise BackendError(repo, f"backend {self.name}: {detail}") from exc
            except (OSError, asyncssh.Error) as exc:
                detail = f"backend {self.name}: cannot open a channel: {exc}"
                raise BackendError(repo, detail) from exc

        return await self.pool.open_channel(
            repo,
            lambda link: SshStream(sink, link, request.session_id, repo, path),
            start,
            request.session_id,
        )

    async def close(self) -> None:
        await self.pool.close()
