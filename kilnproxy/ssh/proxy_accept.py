"""Accepting SSH connections: admission at accept, and the PROXY protocol behind a load balancer.

A worker accepts on the shared listening socket itself (`ProxyListener`), so that nothing reaches
asyncssh before it is admitted: with `[ssh] proxy_protocol` "off" each connection is put to
admission (SPEC 4b: `admit`, with the peer's address) as soon as it is accepted; with "optional"
or "require" its header is read first, and admission is asked with the address the header gave
(a balancer's health check, a header without a client, is not put to admission, up to a few at
once: `Uncounted`).
A peer outside `proxy_allowed` (in optional mode) is the client whatever it sends: it is put to
admission at accept, as with the protocol off, before it may wait for a header.
A refused connection is closed there and then: no banner, no key exchange. An admitted one is
handed on with that address and its `Startup` (`hand_off`).

The header is read with MSG_PEEK and a receive low-water mark (SO_RCVLOWAT) of the bytes `parse`
still needs, so the event loop wakes only when there is something new to look at, and only the
header's own bytes are ever consumed: a client that speaks SSH at once (optional mode) reaches
asyncssh with every byte it sent.

Rules: a connection whose header is refused, malformed, truncated, oversized or too slow is
closed with one log line (at most `LOG_BURST` such lines a second; admission logs its own
refusals), never an exception out of this module; an admitted connection that cannot be handed
on is closed and its `Startup` with it (it was never served, so never penalised); a peer that
is the client itself (optional mode, outside `proxy_allowed`) and is not served for what it
sent or did not send is penalised as an SSH client would be (`grace_exceeded` for a stall,
`noauth` for anything else): else a few sources could hold every startup by starting a header
and waiting, `proxy_timeout` at a time, for ever;
at most `PENDING_LIMIT` connections wait for their header at once (beyond that the worker stops
accepting and the kernel's listen queue holds the rest). It never speaks SSH: what happens after
the hand-off is asyncssh's and the session's (whose login grace runs from the TCP accept: a
header's time counts).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import socket
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any

from kilnproxy.config import Network, SshSettings, format_duration
from kilnproxy.policy.admission import Refusal, RefusalLog, source_address
from kilnproxy.policy.penalty import PenaltyEvent
from kilnproxy.ssh.proxy_header import MAX_HEADER, NeedMore, ProxyHeader, ProxyHeaderError, parse
from kilnproxy.ssh.services import Startup

log = logging.getLogger("kilnproxy.proxy")

Address = tuple[str, int]
# The connected socket, the header's client address (None: the peer's own), its startup,
# whether it is a balancer's health check rather than a client, and when it was accepted (the
# loop's clock: the login grace runs from then, SPEC 4).
HandOff = Callable[[socket.socket, Address | None, Startup, bool, float], Awaitable[None]]
# Admission with the client's address: a Startup, or None to close the connection now.
Admitter = Callable[[Address], Startup | None]

PENDING_LIMIT = 256  # connections of one worker waiting for their header at once
ACCEPT_BATCH = 64  # accepts per wake-up, so one busy listener cannot starve the loop
ACCEPT_RETRY = 1.0  # after EMFILE and the like, as asyncio's own servers do
LOG_BURST = 20  # refusal lines per second, per worker
HEALTH_CHECKS_AT_ONCE = 8  # unauthenticated health checks per listener outside admission


class ProxyMode(enum.Enum):
    OFF = "off"
    OPTIONAL = "optional"
    REQUIRE = "require"


@dataclass(frozen=True)
class TimedOut:
    """No decision within the header timeout; `received` bytes had arrived."""

    received: int


@dataclass(frozen=True)
class Silent:
    """The peer closed without sending a byte: a balancer's plain TCP health check."""


@dataclass(frozen=True)
class Admit:
    """Serve the connection; `source` is the client's address, None for the peer's own."""

    source: Address | None


@dataclass(frozen=True)
class Refuse:
    reason: str
    kind: Refusal  # its /metrics reason


# -- the policy: plain functions over plain data ---------------------------------------------------


def peer_allowed(host: str, allowed: Iterable[Network]) -> bool:
    """Whether a peer may send a header. An IPv4 peer on a dual-stack socket shows up as
    `::ffff:10.0.0.5`; it is matched as the IPv4 address it is (`source_address`)."""
    address = source_address(host)
    return address is not None and any(address in network for network in allowed)


def refuse_at_accept(mode: ProxyMode, allowed: bool) -> Refuse | None:
    """In require mode only the balancers may connect at all: no need to read a byte."""
    if mode is ProxyMode.REQUIRE and not allowed:
        return Refuse("peer not in [ssh] proxy_allowed", Refusal.PROXY_NOT_ALLOWED)
    return None


def decide(
    mode: ProxyMode, allowed: bool, seen: ProxyHeader | TimedOut | None, timeout: float
) -> Admit | Refuse:
    """What to do once the first bytes are known: a header, no header (None), or too slow."""
    if isinstance(seen, TimedOut):
        if seen.received == 0 and mode is ProxyMode.OPTIONAL:
            # A client that waits for the server's banner before it sends its own: a
            # balancer would have sent its header at once, so this is a direct client.
            return Admit(None)
        return Refuse(
            f"no complete PROXY header within {format_duration(timeout)} "
            f"({seen.received} bytes received)",
            Refusal.PROXY_TIMEOUT,
        )
    if seen is None:
        if mode is ProxyMode.REQUIRE:
            return Refuse("no PROXY header (proxy_protocol is 'require')", Refusal.PROXY_HEADER)
        return Admit(None)
    if not allowed:
        return Refuse("PROXY header from a peer not in [ssh] proxy_allowed",
                      Refusal.PROXY_NOT_ALLOWED)  # fmt: skip
    return Admit(seen.source)


def is_health_check(seen: ProxyHeader | TimedOut | None) -> bool:
    """A balancer's own connection (v2 LOCAL, v1 UNKNOWN): its health check, not a client."""
    return isinstance(seen, ProxyHeader) and seen.source is None


class Uncounted:
    """The startup of a balancer's health check: not among max_startups, nor put to
    admission at all (only a peer in proxy_allowed sends one). It is no client; and a flood of
    clients that fills max_startups would otherwise fail the checks of every host it reaches,
    and the balancer would take them all out, legitimate clients' connections with them. At
    most HEALTH_CHECKS_AT_ONCE of them per listening socket of a worker: such a connection
    is SSH like any other, and one past them (a balancer sends v1 UNKNOWN for a client whose
    address it cannot write, too) is put to admission as the balancer's.

    `ended` is told once, when it authenticates or closes, whichever comes first."""

    def __init__(self, ended: Callable[[], None]) -> None:
        self._ended: Callable[[], None] | None = ended

    def authenticated(self) -> None:
        self._end()

    def closed(self, event: PenaltyEvent | None) -> None:
        self._end()

    def _end(self) -> None:
        ended, self._ended = self._ended, None
        if ended is not None:
            ended()


def format_address(address: Address) -> str:
    return f"{address[0]}:{address[1]}"


@dataclass(frozen=True)
class ProxyStats:
    pending: int  # waiting for their header, or being handed on, now
    accepted: int
    admitted: int  # handed to SSH
    refused: int  # closed for their header, or by admission


# -- the I/O shell ---------------------------------------------------------------------------------


def _wake(ready: asyncio.Future[None]) -> None:
    if not ready.done():
        ready.set_result(None)


class ProxyListener(asyncio.AbstractServer):
    """An asyncio server over one listening socket that admits connections by admission and,
    when the PROXY protocol is on, by their header first.

    asyncssh wraps it in an `SSHAcceptor`, so the worker closes it like any other listener.
    """

    def __init__(
        self,
        sock: socket.socket,
        settings: SshSettings,
        hand_off: HandOff,
        admit: Admitter,
        failing_health_checks: Callable[[], bool] = lambda: False,
        count: Callable[[Refusal], None] = lambda kind: None,
    ) -> None:
        self._sock = sock
        self._count = count  # a refusal for its header, into /metrics (admission counts its own)
        self._failing_health_checks = failing_health_checks
        self._mode = ProxyMode(settings.proxy_protocol)
        self._allowed = settings.proxy_allowed
        self._timeout = settings.proxy_timeout
        self._hand_off = hand_off
        self._admit_source = admit
        self._loop = asyncio.get_running_loop()
        self._pending: set[asyncio.Task[None]] = set()
        self._reading = False
        self._serving = False
        self._retry: asyncio.TimerHandle | None = None
        # One line per refused connection, LOG_BURST a second at most, then a count.
        self._refusals = RefusalLog(burst=LOG_BURST, period=1.0)
        self._accepted = 0
        self._admitted = 0
        self._refused = 0
        self._health_checks = 0  # `Uncounted` ones not yet authenticated nor closed

    # -- asyncio.AbstractServer ----------------------------------------------------------------

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return (self._sock,) if self._serving else ()

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def is_serving(self) -> bool:
        return self._serving

    async def start_serving(self) -> None:
        if not self._serving:
            self._sock.setblocking(False)
            self._serving = True
            self._resume()

    async def serve_forever(self) -> None:
        await self.start_serving()
        await asyncio.Future()  # until cancelled, as asyncio.Server.serve_forever

    def close(self) -> None:
        """Stop accepting. Connections already accepted still get their header read and are
        handed on (within `proxy_timeout`): a balancer has sent them to this host, and cannot
        send them elsewhere once the TCP connection is up. `wait_closed` waits for them."""
        self._serving = False
        self._pause()
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None

    async def wait_closed(self) -> None:
        if self._pending:
            await asyncio.wait(list(self._pending))

    def statistics(self) -> ProxyStats:
        return ProxyStats(len(self._pending), self._accepted, self._admitted, self._refused)

    # -- accepting -----------------------------------------------------------------------------

    def _resume(self) -> None:
        self._retry = None
        if self._serving and not self._reading and len(self._pending) < PENDING_LIMIT:
            self._loop.add_reader(self._sock.fileno(), self._accept_ready)
            self._reading = True

    def _pause(self) -> None:
        if self._reading:
            self._loop.remove_reader(self._sock.fileno())
            self._reading = False

    def _accept_ready(self) -> None:
        for _ in range(ACCEPT_BATCH):
            if len(self._pending) >= PENDING_LIMIT:
                self._pause()  # resumed as a header is done
                return
            try:
                conn, peer = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return  # another worker took it: they all wait on one queue
            except ConnectionAbortedError:
                continue
            except OSError as exc:  # out of descriptors or memory: try again in a while
                log.error("cannot accept: %s; retrying in %ss", exc, ACCEPT_RETRY)
                self._pause()
                self._retry = self._loop.call_later(ACCEPT_RETRY, self._resume)
                return
            self._start(conn, (str(peer[0]), int(peer[1])))

    def _start(self, conn: socket.socket, peer: Address) -> None:
        self._accepted += 1
        accepted_at = self._loop.time()
        conn.setblocking(False)
        if self._mode is ProxyMode.OFF:  # the peer is the client: admission decides now
            startup = self._admitted_as(conn, peer)
            if startup is not None:
                self._track(self._serve(conn, peer, None, startup, False, accepted_at))
            return
        allowed = peer_allowed(peer[0], self._allowed)
        refusal = refuse_at_accept(self._mode, allowed)
        if refusal is not None:
            self._refuse(conn, peer, refusal.reason, refusal.kind)
            return
        startup = None
        if not allowed:  # optional mode: the peer is the client whatever it sends, and is
            # put to admission now, before it may hold a place among the pending
            startup = self._admitted_as(conn, peer)
            if startup is None:
                return
        self._track(self._admit(conn, peer, allowed, startup, accepted_at))

    def _track(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = self._loop.create_task(coroutine)
        self._pending.add(task)
        task.add_done_callback(self._admit_done)

    def _admitted_as(self, conn: socket.socket, client: Address) -> Startup | None:
        """Ask admission; a refused connection is closed now (admission logged it)."""
        startup = self._admit_source(client)
        if startup is None:
            self._refused += 1
            conn.close()
        return startup

    def _admit_done(self, task: asyncio.Task[None]) -> None:
        self._pending.discard(task)
        if self._retry is None:  # not while an accept error is waited out: its timer resumes
            self._resume()
        # The isolation boundary of one connection's admission: a bug here closes that
        # connection (its socket is closed by `_admit`) and is logged, nothing more.
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("admitting a connection failed", exc_info=exc)

    def _refuse(
        self, conn: socket.socket, peer: Address, reason: str, kind: Refusal | None = None
    ) -> None:
        """Close `conn` with a line; `kind`: its /metrics reason, if we refused it (None: the
        peer reset it, or it could not be handed on)."""
        self._refused += 1
        if kind is not None:
            self._count(kind)
        held = self._refusals.should_log("header", self._loop.time())
        if held is not None:
            more = f" ({held} more not logged)" if held else ""
            log.warning("closed connection from %s: %s%s", format_address(peer), reason, more)
        conn.close()

    # -- one connection ------------------------------------------------------------------------

    async def _admit(
        self,
        conn: socket.socket,
        peer: Address,
        allowed: bool,
        startup: Startup | None,
        accepted_at: float,
    ) -> None:
        """Read the header, decide, and hand the socket on or close it; never raises.
        `startup`: the peer's own, if admission was asked at accept (a peer not allowed to
        send a header); it ends here if the connection is not served."""
        admitted = None
        offence: PenaltyEvent | None = PenaltyEvent.NOAUTH  # if not served: the client's doing
        try:
            outcome = await self._by_header(conn, peer, allowed, startup)
            if isinstance(outcome, tuple):
                admitted = outcome
            else:
                offence = outcome
        except ProxyHeaderError as exc:
            self._refuse(conn, peer, str(exc), Refusal.PROXY_HEADER)
        except OSError as exc:  # reset by the peer while we looked
            self._refuse(conn, peer, f"connection failed: {exc.strerror or exc}")
        except BaseException:  # cancelled (the worker stops): not the client's doing
            offence = None
            raise
        finally:
            if admitted is None:
                conn.close()
                if startup is not None:
                    startup.closed(offence)
        if admitted is not None:
            await self._serve(conn, peer, *admitted, accepted_at)

    async def _by_header(
        self, conn: socket.socket, peer: Address, allowed: bool, startup: Startup | None
    ) -> tuple[Address | None, Startup, bool] | PenaltyEvent | None:
        """The header's client address (None: the peer's own) and the startup admission gave
        it (or had given it at accept); if the connection is not to be served, how the peer
        misbehaved (for the startup it was given at accept), or None."""
        seen = await self._read_header(conn)
        if isinstance(seen, Silent):
            log.debug("%s closed before sending anything", format_address(peer))
            return PenaltyEvent.NOAUTH
        decision = decide(self._mode, allowed, seen, self._timeout)
        if isinstance(decision, Refuse):
            self._refuse(conn, peer, decision.reason, decision.kind)
            stalled = isinstance(seen, TimedOut)
            return PenaltyEvent.GRACE_EXCEEDED if stalled else PenaltyEvent.NOAUTH
        if self._failing_health_checks() and is_health_check(seen):
            log.debug("health check from %s failed on purpose: a drain is coming",
                      format_address(peer))  # fmt: skip
            return None
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
        if isinstance(seen, ProxyHeader):
            _consume(conn, seen.length)
        health_check = is_health_check(seen)
        if health_check and self._health_checks < HEALTH_CHECKS_AT_ONCE:
            self._health_checks += 1
            return None, Uncounted(self._health_check_ended), True
        startup = startup or self._admitted_as(conn, decision.source or peer)
        return None if startup is None else (decision.source, startup, health_check)

    def _health_check_ended(self) -> None:
        self._health_checks -= 1

    async def _serve(
        self,
        conn: socket.socket,
        peer: Address,
        source: Address | None,
        startup: Startup,
        health_check: bool,
        accepted_at: float,
    ) -> None:
        """Hand an admitted connection to SSH; one that cannot be was never served."""
        self._admitted += 1
        try:
            await self._hand_off(conn, source, startup, health_check, accepted_at)
        except OSError as exc:
            startup.closed(None)
            self._refuse(conn, peer, f"connection failed: {exc.strerror or exc}")
        except BaseException:
            startup.closed(None)
            conn.close()
            raise

    async def _read_header(self, conn: socket.socket) -> ProxyHeader | TimedOut | Silent | None:
        """Peek at the first bytes until `parse` decides (None: they are not a header); consume
        nothing."""
        deadline = self._loop.time() + self._timeout
        need, received = 1, 0
        while True:
            # Readable only once `need` bytes are buffered (or at EOF): a v2 header, whose
            # length is known after 16 bytes, wakes us twice; a v1 line, whose end is not known
            # before it comes, once per new byte at most; bytes already seen never again.
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, need)
            if not await self._readable(conn, deadline):
                return TimedOut(received)
            try:
                data = conn.recv(MAX_HEADER, socket.MSG_PEEK)
            except BlockingIOError:  # a spurious wake-up: nothing new after all
                continue
            if not data:
                return Silent()
            if len(data) < need:  # readable below the low-water mark: the peer has closed
                raise ProxyHeaderError(f"connection closed after {len(data)} bytes of a header")
            received = len(data)
            result = parse(data)
            if not isinstance(result, NeedMore):
                return result
            need = result.total

    async def _readable(self, conn: socket.socket, deadline: float) -> bool:
        ready: asyncio.Future[None] = self._loop.create_future()
        self._loop.add_reader(conn.fileno(), _wake, ready)
        try:
            async with asyncio.timeout_at(deadline):
                await ready
        except TimeoutError:
            return False
        finally:
            self._loop.remove_reader(conn.fileno())
        return True


def _consume(conn: socket.socket, length: int) -> None:
    """Take the header's bytes off the socket: they were all buffered when we peeked."""
    data = conn.recv(length)
    if len(data) != length:
        raise ProxyHeaderError(f"header of {length} bytes shrank to {len(data)}")
