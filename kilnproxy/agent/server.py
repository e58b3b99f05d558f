"""`kilnproxy agent`: the listener, TLS with client certificates, and the agent's signals.

The TLS handshake is ours to await (`start_tls`), not the server's to hide: a proxy whose
certificate is refused gets one log line here, with its address and the reason (at most
HANDSHAKE_LINES a minute, each with the count of those held back). At most
`[agent] max_handshakes` handshakes run at once: each holds asyncio's TLS buffers until it ends,
and a flood of connections that never speak must not grow the agent without bound.

Signals, as the proxy's master takes them (SPEC 6). TERM or QUIT: drain. The agent stops
accepting, tells every proxy connection that it drains (the proxy opens its next sessions
elsewhere: on the agent that replaces this one), closes those that run nothing, lets running
commands finish for up to `[timeouts] drain`, then cuts what is left and exits. INT, or a second
TERM: stop at once, cutting every command. A command cut has its client told why in one line
and exit status 1, and is stopped (SIGTERM to its process group, SIGKILL after the local
backend's grace). USR1: reopen the log file. HUP: load the CA, certificate and key again, for the
connections that come next (a renewed certificate, without a drain).

At most `[agent] max_commands` commands run at once, over every connection: a proxy's valid
certificate is trusted with what the agent runs, not with how much. An OPEN beyond them is
REFUSED (the proxy tells its client the storage is unavailable), with a log line, rate-limited.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import logging
import signal
import socket
import ssl
import time
from pathlib import Path
from typing import cast

from kilnproxy.agent.channel import Channel
from kilnproxy.agent.connection import ProxyConnection
from kilnproxy.backends.local import KILL_GRACE, LocalStream, write_hook_rc
from kilnproxy.config import Address, Config
from kilnproxy.errors import OperatorError, os_reason
from kilnproxy.logs import reopen
from kilnproxy.policy.admission import RefusalLog

log = logging.getLogger("kilnproxy.agent")
HANDSHAKE_LINES = 20  # failed handshakes logged a minute; the rest are counted in the next line
DRAIN_EXPIRED = "storage server is stopping and the drain timeout expired"
STOPPING = "storage server is shutting down"
BIND_PATIENCE = 30.0  # seconds an address that is not up yet, or still held, is tried again
USER_TIMEOUT_MS = 90_000  # sent data unacknowledged this long: the proxy host is gone
_NOT_YET = (errno.EADDRNOTAVAIL, errno.EADDRINUSE)


def server_context(ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    """TLS 1.3 only, and a client certificate signed by `ca` required."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.verify_mode = ssl.CERT_REQUIRED
    try:
        context.load_verify_locations(cafile=ca)
    except (OSError, ssl.SSLError) as exc:
        raise OperatorError(f"[agent] cannot load ca {ca}: {exc}") from None
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:  # either file: OpenSSL does not say which
        raise OperatorError(f"[agent] cannot load cert {cert} with key {key}: {exc}") from None
    return context


class _Handshake(asyncio.Protocol):
    """A TCP connection until its TLS handshake is done; it reads nothing itself."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        tcp = cast(asyncio.Transport, transport)
        # A proxy host that vanishes without a word must not leave its commands waiting for
        # credit forever: the kernel asks after a silent minute, and gives up 30 s later. That
        # is for a connection with nothing unacknowledged: one that was sending (a clone) is
        # retransmitted to for 15 minutes and more, unless the user timeout gives up sooner.
        sock = tcp.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for option, value in (("TCP_KEEPIDLE", 60), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3),
                              ("TCP_USER_TIMEOUT", USER_TIMEOUT_MS)):  # fmt: skip
            if hasattr(socket, option):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)
        # The ClientHello is for start_tls, not for us. (asyncio starts reading after this
        # call; uvloop 0.23 before it, losing the hello. The agent stays on asyncio: on uvloop,
        # accepting its own sockets, it cost the proxy 1.30x the CPU per large clone; README.)
        tcp.pause_reading()
        self.agent.handshake(tcp)


def _drop_tracebacks(exc: BaseException) -> None:
    """Let a failed handshake's memory go now. asyncio's SSL protocol keeps the error in a local
    of the frame that raised it (CPython 3.11; gh-109534), so the error, its traceback and that
    frame make a cycle holding the protocol and its 256 KiB buffer, which only the cyclic
    collector frees: a health check or a port scan that connects and closes cost the agent
    about 300 KiB each until a full collection came. And the traceback reaches start_tls's
    frame, whose waiter holds the error: a cycle too. Cutting the tracebacks (of the error and
    of those it was raised from) undoes both."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [exc]
    while pending:
        each = pending.pop()
        if each is None or id(each) in seen:
            continue
        seen.add(id(each))
        each.__traceback__ = None
        pending += [each.__context__, each.__cause__]


class Lifecycle(enum.Enum):
    SERVING = "serving"
    DRAINING = "draining"  # TERM or QUIT: no new connection or command; running ones finish
    STOPPING = "stopping"  # INT, or a second TERM: every command is cut


class Agent:
    def __init__(self, config: Config) -> None:
        settings = config.agent
        self.config = config
        self.base = settings.base
        self.window = settings.window
        self.listen = settings.listen
        self.context = server_context(settings.ca, settings.cert, settings.key)
        try:
            self.hook_rc = write_hook_rc(config.home / "state")
        except OSError as exc:
            raise OperatorError(f"cannot write {config.home / 'state'}: {exc.strerror}") from None
        self.handshake_timeout = config.timeouts.dial
        self.max_handshakes = settings.max_handshakes
        self.max_commands = settings.max_commands
        self.handshaking = 0  # handshakes under way
        self._refusals = RefusalLog()
        self._failures = RefusalLog(burst=HANDSHAKE_LINES)
        self.drain_timeout = config.timeouts.drain
        self.lifecycle = Lifecycle.SERVING
        self.connections: set[ProxyConnection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._starting: set[asyncio.Task[None]] = set()  # channels' starts (of `_tasks`)
        self._commands: set[LocalStream] = set()  # started and not exited, aborted ones too
        self._emptied = asyncio.Event()  # no connection is left
        self._emptied.set()
        self._servers: list[asyncio.Server] = []
        self._drain = asyncio.Event()  # a drain began (TERM, QUIT or INT)
        self._stop = asyncio.Event()  # draining and no connection left, or INT: finish now

    @property
    def draining(self) -> bool:
        return self.lifecycle is not Lifecycle.SERVING

    # -- Host ------------------------------------------------------------------------------------

    def refusal(self, channel: Channel) -> str | None:
        running = self._running()
        if not self.max_commands or running < self.max_commands:
            return None
        reason = f"busy: {running} command(s) running, [agent] max_commands = {self.max_commands}"
        held = self._refusals.should_log("commands", time.monotonic())
        if held is not None:
            request = channel.request
            more = f"; {held} more refused since the last such line" if held else ""
            channel.log.warning("refused %s (repo %s): %s%s", request.verb, request.repo, reason,
                                more)  # fmt: skip
        return reason

    def start(self, channel: Channel) -> None:
        task = self._spawn(channel.start(self.base, self.hook_rc))
        self._starting.add(task)
        task.add_done_callback(lambda _: self._follow(task, channel))

    def _follow(self, start: asyncio.Task[None], channel: Channel) -> None:
        """Keep its command in `_commands` until it has exited, however its channel ends: one
        aborted as its connection went (SIGTERM, SIGKILL after a grace on this loop) is waited
        for before the agent exits, and counts against max_commands until then."""
        self._starting.discard(start)
        stream = channel.stream
        if stream is not None:
            self._commands.add(stream)
            self._spawn(self._until_exited(stream))

    async def _until_exited(self, stream: LocalStream) -> None:
        try:
            await stream.wait_exited()
        finally:
            self._commands.discard(stream)

    def gone(self, conn: ProxyConnection) -> None:
        self.connections.discard(conn)
        if not self.connections:
            self._emptied.set()
            if self.draining:
                self._stop.set()

    # -- accepting -------------------------------------------------------------------------------

    def handshake(self, transport: asyncio.Transport) -> None:
        host, port = transport.get_extra_info("peername")[:2]
        peer = f"{host}:{port}"
        if self.handshaking >= self.max_handshakes:
            held = self._refusals.should_log("handshakes", time.monotonic())
            if held is not None:
                more = f"; {held} more refused since the last such line" if held else ""
                log.warning("refused connection from %s: %d TLS handshakes under way "
                            "([agent] max_handshakes)%s", peer, self.handshaking, more)  # fmt: skip
            transport.abort()
            return
        self.handshaking += 1
        self._spawn(self._handshake(transport, peer))

    async def _handshake(self, transport: asyncio.Transport, peer: str) -> None:
        try:
            await self._secure(transport, peer)
        finally:
            self.handshaking -= 1

    async def _secure(self, transport: asyncio.Transport, peer: str) -> None:
        conn = ProxyConnection(self, peer)
        loop = asyncio.get_running_loop()
        try:
            tls = await loop.start_tls(
                transport,
                conn,
                self.context,
                server_side=True,
                ssl_handshake_timeout=self.handshake_timeout,
            )
        except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError
            held = self._failures.should_log("handshake", time.monotonic())
            if held is not None:
                reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                more = f" ({held} more failed since the last such line)" if held else ""
                log.warning("refused connection from %s: TLS handshake failed: %s%s", peer, reason,
                            more)  # fmt: skip
            _drop_tracebacks(exc)
            transport.abort()
            return
        if tls is None:  # the loop closed meanwhile
            transport.abort()
            return
        conn.connection_made(tls)  # start_tls leaves that to us
        self.connections.add(conn)
        self._emptied.clear()
        if self.draining:
            conn.drain()

    def _spawn(self, work: object) -> asyncio.Task[None]:
        assert asyncio.iscoroutine(work)
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        for address in self.listen:
            server = await self._listen_on(address)
            self._servers.append(server)
            bound = ", ".join(str(Address(*sock.getsockname()[:2])) for sock in server.sockets)
            log.info("agent listening on %s, serving %s", bound, self.base)  # port 0: the port
        for signum, handler in (
            (signal.SIGTERM, self.handle_sigterm),
            (signal.SIGQUIT, self.handle_sigquit),
            (signal.SIGINT, self.handle_sigint),
            (signal.SIGUSR1, self.handle_sigusr1),
            (signal.SIGHUP, self.handle_sighup),
        ):
            loop.add_signal_handler(signum, handler)
        await self._drain.wait()
        await self._finish()

    async def _listen_on(self, address: Address) -> asyncio.Server:
        """A listener on `address`. An address not up yet (the storage network's, at boot) or
        still held (the agent this one replaces, closing) is tried again for BIND_PATIENCE
        seconds; anything else, or longer, is an operator's error (exit 2)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + BIND_PATIENCE
        waited = False
        while True:
            try:
                return await loop.create_server(
                    lambda: _Handshake(self), address.host, address.port, backlog=1024
                )
            except OSError as exc:
                # asyncio words it "error while attempting to bind on address ...": the errno's
                # own words say it once.
                reason = os_reason(exc)
                if exc.errno not in _NOT_YET or loop.time() >= deadline:
                    raise OperatorError(f"[agent] cannot listen on {address}: {reason}") from None
                if not waited:
                    log.warning("cannot listen on %s yet (%s); trying again each second for "
                                "up to %.0fs", address, reason, BIND_PATIENCE)  # fmt: skip
            waited = True
            await asyncio.sleep(1.0)

    # -- signals ---------------------------------------------------------------------------------

    def handle_sigterm(self) -> None:
        """Drain; a second TERM stops at once."""
        if self.draining:
            self.handle_sigint()
        else:
            self._begin_drain()

    def handle_sigquit(self) -> None:
        self._begin_drain()

    def handle_sigint(self) -> None:
        """Stop at once: every command is cut."""
        if self.lifecycle is Lifecycle.STOPPING:
            return
        self._begin_drain()
        self.lifecycle = Lifecycle.STOPPING
        self._stop.set()

    def handle_sigusr1(self) -> None:
        settings = self.config.log
        if reopen(settings.format, settings.level, settings.file):
            log.info("agent reopened its log")

    def handle_sighup(self) -> None:
        """Load the CA, certificate and key again, for the next connections."""
        settings = self.config.agent
        try:
            self.context = server_context(settings.ca, settings.cert, settings.key)
        except OperatorError as exc:
            log.error("HUP: still using the certificates loaded before: %s", exc)
            return
        log.info("HUP: loaded %s, %s and %s for the next connections", settings.ca,
                 settings.cert, settings.key)  # fmt: skip

    def _begin_drain(self) -> None:
        if self.draining:
            return
        self.lifecycle = Lifecycle.DRAINING
        self._drain.set()
        log.info("draining: %d command(s) running, waiting up to %.0fs", self._running(),
                 self.drain_timeout)  # fmt: skip
        for server in self._servers:
            server.close()
        for conn in list(self.connections):
            conn.drain()
        if not self.connections:
            self._stop.set()

    def _running(self) -> int:
        """Commands starting, or started and not exited. What runs, not what has a channel:
        the proxy closes a channel whose command is slow to start (its dial timeout), and an
        aborted command takes its grace to exit; counted by channels, an agent slow to start
        commands would run more the slower it got."""
        return len(self._starting) + len(self._commands)

    async def _finish(self) -> None:
        try:
            async with asyncio.timeout(self.drain_timeout):
                await self._stop.wait()
        except TimeoutError:
            log.warning("drain timeout: cutting %d command(s)", self._running())
            self._cut(DRAIN_EXPIRED)
        else:
            if self.lifecycle is Lifecycle.STOPPING:
                log.info("stopping at once: cutting %d command(s)", self._running())
                self._cut(STOPPING)
        await self._wrapped_up()
        log.info("agent stopped")

    def _cut(self, why: str) -> None:
        """Cut every command still running (`Channel.cut`) and close the connections."""
        for conn in list(self.connections):
            for channel in list(conn.channels.values()):
                channel.cut(why)
            conn.close()  # not abort: what was just sent goes first

    async def _wrapped_up(self) -> None:
        """Before the loop ends: every command has exited, those aborted as their connection
        went too, and each closed connection has sent what it had (a cut's line for its
        client). At most the grace before a command's SIGKILL, which runs on this loop, and a
        moment: a proxy that reads nothing does not hold the agent."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(KILL_GRACE + 0.5):
                if self._starting:  # a command cut while it started is aborted once it has
                    await asyncio.wait(self._starting)
                await asyncio.gather(*(stream.wait_exited() for stream in list(self._commands)))
                await self._emptied.wait()
        if self._commands:
            log.warning("exiting with %d command(s) still running", len(self._commands))


def run(config: Config) -> int:
    # Until serve() takes them: a `systemctl reload` or a log rotation during the start must
    # not end the agent (their default action).
    for signum in (signal.SIGHUP, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)
    base = config.agent.base
    try:
        if not base.is_dir():
            raise OperatorError(f"[agent] base {base} is not a directory")
    except PermissionError as exc:  # a parent the agent's user may not enter
        raise OperatorError(f"[agent] base {base}: {exc.strerror}") from None

    async def main() -> None:
        await Agent(config).serve()

    asyncio.run(main())
    return 0
