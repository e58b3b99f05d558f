"""One client connection: its session id, its verified identity, its timers and its channels.

`Session` is the asyncssh `SSHServer` of one connection. It authenticates the key against the
directory, hands each channel to a `Relay`, and enforces the session timeouts of SPEC 4. It
writes the access line of each command from the relay's final `RelayStats`, through the one
pure `access_fields`. It must never decide access or parse commands itself (that is `commands`,
`access` and `relay`), and it must leave nothing behind: every timer it starts is cancelled in
`connection_lost`, and its admission `Startup` (SPEC 4b) is ended there if authentication has
not ended it first. What `connection_lost` may leave for later (the closing log lines) goes to
the host's `Spread`, so that thousands of connections closing at once do not hold the loop.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import asyncssh

from kilnproxy.config import Config, format_duration
from kilnproxy.control import SessionStats
from kilnproxy.directory import Identity
from kilnproxy.errors import CutReason, DirectoryUnavailable
from kilnproxy.logs import CLIENT_TEXT, QuietSessionLog, SessionLog, access_line
from kilnproxy.policy.penalty import PenaltyEvent, event_for
from kilnproxy.ssh.keys import fingerprint, policy_problem
from kilnproxy.ssh.relay import Outcome, Relay, RelayState, RelayStats
from kilnproxy.ssh.services import Services, Startup
from kilnproxy.ssh.signatures import restrict_signatures
from kilnproxy.ssh.spread import Spread

log = logging.getLogger("kilnproxy.session")

CUT_GRACE = 5.0  # after a cut, how long the client gets to read its message before we hang up
# A connection that may run one command only (it drains, or the directory is unavailable):
# how long it may take to ask for it after authenticating.
FIRST_COMMAND_GRACE = 5.0
# Closed sessions' log lines written per pass of the loop (about 100 us each): 10,000
# connections dropped at once then hold the loop for 20 ms at a time, not for seconds.
CLOSE_LOGS_PER_PASS = 200


class SessionState(enum.Enum):
    CONNECTING = "connecting"  # TCP accepted, not yet authenticated
    AUTHENTICATED = "authenticated"
    CLOSED = "closed"


@dataclass
class SessionHost:
    """What every session of a worker shares: settings, the worker's services, the live table."""

    config: Config
    services: Services
    sessions: dict[str, Session] = field(default_factory=dict)
    total: int = 0
    accepting: bool = True
    # A drain is coming (control.DrainNotice): load-balancer health checks are failed on
    # purpose while sessions are still served.
    failing_health_checks: bool = False
    # Set whenever no session is open: what a drain waits for.
    no_sessions: asyncio.Event = field(default_factory=asyncio.Event)
    # Told the id of every session that ends (the worker reports it to the master).
    on_close: Callable[[str], None] | None = None
    # The log lines of sessions that closed, written a batch per pass of the loop.
    close_logs: Spread = field(default_factory=lambda: Spread(CLOSE_LOGS_PER_PASS))

    def fresh_id(self) -> str:
        """A session id (8 random hex characters, SPEC 3) that no open session here has."""
        while (candidate := secrets.token_hex(4)) in self.sessions:
            pass
        return candidate

    def opened(self, session: Session) -> None:
        assert session.id not in self.sessions, "`Session.connection_made` made it unique"
        self.sessions[session.id] = session
        self.total += 1
        self.no_sessions.clear()

    def closed(self, session: Session) -> None:
        self.sessions.pop(session.id, None)
        if not self.sessions:
            self.sessions = {}  # a dict never shrinks its table: a flood's would stay
            self.no_sessions.set()
        if self.on_close is not None:
            self.on_close(session.id)


def _who(identity: Identity | None) -> tuple[str | None, str | None, str | None, str | None]:
    """Account, user, key name and key fingerprint: all None until a key was verified."""
    if identity is None:
        return None, None, None, None
    return identity.account, identity.user, identity.key_name, identity.fingerprint


def access_fields(
    *,
    remote: str,
    login: str,
    identity: Identity | None,
    outcome: Outcome,
    command: RelayStats | None,
    connected_at: float,
    now: float,
) -> dict[str, object]:
    """The fields of SPEC 4's access line, in their order: for one command (the final record of
    its relay) or, with `command` None, for a connection that ran none."""
    account, user, key_name, key = _who(identity)
    parsed = command.command if command else None
    verb = "shell" if command and command.shell else parsed.verb.value if parsed else None
    started_at = command.started_at if command else connected_at
    return {
        "remote": remote,
        "login": login,
        "account": account,
        "user": user,
        "key_name": key_name,
        "key": key,
        "repo": parsed.repo if parsed else None,
        "verb": verb,
        # "" for a command that was never routed, None for a connection that ran no command.
        "backend": (command.backend or "") if command else None,
        "exit": command.exit_status if command else None,
        "outcome": outcome.value,
        "bytes_in": command.bytes_in if command else 0,
        "bytes_out": command.bytes_out if command else 0,
        "duration": f"{now - started_at:.3f}s",
    }


def transport_summary(extra: Callable[[str], object]) -> str:
    """The negotiated cipher, client to server, as the authenticated line names it: an AEAD
    cipher alone, any other with its MAC (`aes128-ctr+hmac-sha2-256-etm@openssh.com`); the
    other direction only where it differs. `extra` is the connection's get_extra_info."""

    def one(cipher: object, mac: object) -> str:
        return str(cipher) if mac in (cipher, None, "") else f"{cipher}+{mac}"

    inbound = one(extra("recv_cipher"), extra("recv_mac"))
    outbound = one(extra("send_cipher"), extra("send_mac"))
    return inbound if inbound == outbound else f"{inbound} (to client {outbound})"


class Session(asyncssh.SSHServer):
    def __init__(self, host: SessionHost) -> None:
        self.host = host
        self.id = host.fresh_id()
        self.log: SessionLog = SessionLog(log, self.id)
        self.health_check = False  # a load balancer's, not a client's: logged at debug level
        self.state = SessionState.CONNECTING
        self.remote = ""
        self.login = ""
        self.identity: Identity | None = None
        self.relays: set[Relay] = set()
        self.backlogged = False  # the connection's write buffer is full (`client_backlogged`)
        self.started_at = time.time()
        self.cut_reason: CutReason | None = None
        self.draining = False
        self._loop = asyncio.get_running_loop()
        self._last_activity = self._loop.time()
        self._ends_at = self._last_activity  # max_session's deadline, from connection_made
        self._candidate: Identity | None = None
        # The identity of the last key the directory knew, on this connection only: OpenSSH
        # offers a key, is told it would do (PK_OK), then signs with it, and asyncssh asks
        # validate_public_key both times. The second is answered from the first: one directory
        # round trip per login, not two (issue 13, small clone latency).
        self._known: Identity | None = None
        # The directory could not be asked when the last key was offered: that key is let in
        # so that the client can be told so (SPEC 2); it gets no identity, and so no access.
        self._unavailable: DirectoryUnavailable | None = None
        self.directory_unavailable = False
        self._auth_tries = 0
        self._had_relay = False
        self._relays_logged = 0  # channels that ended with their access line
        self._conn: asyncssh.SSHServerConnection | None = None
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._startup: Startup | None = None  # counted by admission until authenticated

    def __repr__(self) -> str:
        return f"<Session {self.id} {self.state.value} {self.remote}>"

    # -- connection lifecycle -----------------------------------------------------------------

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self._conn = conn
        # The client's address from a PROXY header if a load balancer sent one (proxy_accept).
        peer = conn.get_extra_info("proxy_source") or conn.get_extra_info("peername") or ("?", 0)
        self.remote = f"{peer[0]}:{peer[1]}"
        self._startup = conn.get_extra_info("startup")
        self.health_check = bool(conn.get_extra_info("health_check"))
        if self.id in self.host.sessions:  # two open sessions of one worker would be one here
            self.id = self.host.fresh_id()
            self.log = SessionLog(log, self.id)
        if self.health_check:
            self.log = QuietSessionLog(log, self.id)
        self.host.opened(self)
        if not self.host.accepting:  # handed over by a listener that was closing: drain it too
            self.draining = True
        timeouts = self.host.config.timeouts
        # From the TCP accept (SPEC 4): the time a PROXY header took counts.
        accepted_at = conn.get_extra_info("accepted_at")
        if accepted_at is None:  # not through ProxyListener (tests)
            accepted_at = self._loop.time()
        self._timers["login_grace"] = self._loop.call_at(
            accepted_at + timeouts.login_grace, self.cut, CutReason.LOGIN_GRACE
        )
        # One timer for both limits of a running session: each costs ~600 bytes in uvloop, for
        # as long as the connection lasts (issue 13: memory per idle connection).
        self._ends_at = self._loop.time() + timeouts.max_session
        self._timers["limits"] = self._loop.call_later(
            min(timeouts.idle, timeouts.max_session), self._check_limits
        )
        self.log.info("connection from %s", self.remote)

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        # A channel asked for as the connection went (in the same read as the client's
        # DISCONNECT, or before asyncssh finished opening it) never gets its channel, so never
        # closes: it ran nothing, and the connection's own line says so.
        unopened = {relay for relay in self.relays if not relay.opened}
        if unopened:
            self.relays -= unopened
            self._had_relay = bool(self.relays) or self._relays_logged > 0
        if self._startup is not None:
            self._startup.closed(self._offence())
        self.state = SessionState.CLOSED
        self.host.closed(self)
        self._conn = None
        self.host.close_logs.add(functools.partial(self._log_closed, exc, time.time()))

    def _log_closed(self, exc: Exception | None, ended_at: float) -> None:
        if not self._had_relay:
            self._log_without_command(exc, ended_at)
        if exc is None:
            self.log.info("connection closed")
        else:  # a client's disconnect gives its own reason: a line of the log, not pages
            self.log.info("connection closed: %s", str(exc)[:CLIENT_TEXT])

    def _offence(self) -> PenaltyEvent | None:
        """How a connection that never authenticated ended, for its source's penalty; None
        if we cut it ourselves (a drain, a shutdown, an administrator: not the client's doing).
        An authenticated one is never penalised: its startup has ended already."""
        if self.cut_reason is not None and self.cut_reason is not CutReason.LOGIN_GRACE:
            return None
        if self.health_check:  # the balancer's, every second or so: no client misbehaved
            return None
        return event_for(
            attempted=self._auth_tries > 0, grace_expired=self.cut_reason is CutReason.LOGIN_GRACE
        )

    def _log_without_command(self, exc: Exception | None, ended_at: float) -> None:
        """The access line of a connection that never ran a command (SPEC 4: every session)."""
        if self.health_check:
            outcome = Outcome.HEALTH_CHECK
        elif self.cut_reason is not None:
            timed_out = self.cut_reason is CutReason.LOGIN_GRACE
            outcome = Outcome.TIMEOUT if timed_out else Outcome.CUT
        elif self.directory_unavailable:
            outcome = Outcome.UNAVAILABLE
        elif self.identity is None:
            outcome = Outcome.AUTH_FAILED
        else:
            outcome = Outcome.NO_COMMAND
        self._log_access(outcome, None, ended_at)

    def _log_access(
        self, outcome: Outcome, command: RelayStats | None, now: float | None = None
    ) -> None:
        """The one access line of SPEC 4, for one command (or a connection that ran none)."""
        self.host.services.metrics.session_ended(outcome.value)
        fields = access_fields(
            remote=self.remote,
            login=self.login,
            identity=self.identity,
            outcome=outcome,
            command=command,
            connected_at=self.started_at,
            now=time.time() if now is None else now,
        )
        access_line(self.id, fields, logging.DEBUG if self.health_check else logging.INFO)

    # -- authentication: public key only, identity only from the verified key -------------------

    def begin_auth(self, username: str) -> bool:
        self.login = username[:64]
        return True

    def public_key_auth_supported(self) -> bool:
        return True

    async def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        """Accept a key the directory knows. asyncssh calls this for the key it then verifies.

        The candidate is set as the last step, with no await after it: asyncssh verifies the
        signature right after this returns, so when auth_completed() runs, the candidate is
        the identity of the key whose signature was verified, and of no other.
        """
        self._candidate = self._unavailable = None
        try:  # the isolation boundary of authentication: a failure refuses this key only
            print_ = fingerprint(key)
            known = self._known
            again = known is not None and known.fingerprint == print_  # its signature, not a key
            if not again:  # max_auth_tries counts the keys offered (the 6th of 6 gets in)
                self._auth_tries += 1
                if self._auth_tries > self.host.config.ssh.max_auth_tries:
                    self._too_many_keys()
                    return False
            problem = policy_problem(key)
            if problem:
                self.log.info("refused key: %s", problem)
                return False
            restrict_signatures(key)
            if again:
                identity: Identity | None = known
            else:
                identity = await self._look_up(print_)
        except DirectoryUnavailable as exc:
            self._unavailable = exc  # no await follows: this is the key asyncssh verifies
            return True
        except Exception:
            self.log.exception("cannot check key %s", key.get_algorithm())
            return False
        if identity is None:
            self.log.info("unknown key %s", print_)
            return False
        self._candidate = identity
        # The free re-ask is the signature of the key just offered, once: a client that signs
        # again (a bad signature, retried) is counted, as every key it offers is.
        self._known = None if again else identity
        return True

    def _too_many_keys(self) -> None:
        """Hang up on a client past max_auth_tries, as OpenSSH does: asyncssh would go on
        asking about every key it offers until the login grace, each a line of the log."""
        conn = self._conn
        if conn is None or "too_many_keys" in self._timers:
            return
        self.log.info("too many keys offered: disconnecting")
        # Not from inside asyncssh's auth request, which still has its failure to send.
        self._timers["too_many_keys"] = self._loop.call_later(
            0,
            conn.disconnect,
            asyncssh.DISC_NO_MORE_AUTH_METHODS_AVAILABLE,
            "Too many authentication failures",
        )

    async def _look_up(self, print_: str) -> Identity | None:
        started = time.perf_counter()
        services = self.host.services
        identity = await services.directory.identity_for_key(print_)
        services.metrics.auth_lookup.observe(time.perf_counter() - started)
        return identity

    def auth_completed(self) -> None:
        self.state = SessionState.AUTHENTICATED
        self._known = None
        self._timers.pop("login_grace").cancel()
        if self._startup is not None:
            self._startup.authenticated()
        if self.health_check:  # a balancer's connection that logs in is someone's: log it
            self.health_check = False
            self.log = SessionLog(log, self.id)
        if self._unavailable is not None:
            # Let in only to be told so: one command (refused), then hang up, as in a drain.
            self.directory_unavailable = True
            self.log.debug("key verified while the directory is unavailable: %s",
                           self._unavailable.detail)  # fmt: skip
            self._await_first_command()
            return
        if self.draining:  # authenticated during a drain: its first command is still served
            self._await_first_command()
        identity = self._candidate
        assert identity is not None, "asyncssh completed auth without a validated key"
        self.identity = identity
        conn = self._conn
        assert conn is not None, "asyncssh completed auth on a closed connection"
        self.log.info(
            "authenticated %s/%s as %s with key %r %s over %s from client %r",
            identity.account,
            identity.user,
            self.login,
            identity.key_name,
            identity.fingerprint,
            transport_summary(conn.get_extra_info),
            conn.get_extra_info("client_version"),
        )

    # -- channels ---------------------------------------------------------------------------------

    def session_requested(self) -> Relay | bool:
        if self.cut_reason is not None or len(self.relays) >= self.host.config.ssh.max_channels:
            return False
        if self._one_command and self._had_relay:
            return False  # one more command on a draining connection: the client reconnects
        relay = Relay(self, self.host.services)
        relay.client_backlogged(self.backlogged)
        self.relays.add(relay)
        self._had_relay = True
        self.touch()
        return relay

    def client_backlogged(self, backlogged: bool) -> None:
        """The connection's write buffer passed its high-water mark (True: the client reads
        slower than we write, or nothing) or fell back under its low one: every command's
        output waits meanwhile, as the connection stops reading the client (`server`)."""
        self.backlogged = backlogged
        for relay in self.relays:
            relay.client_backlogged(backlogged)

    def relay_closed(self, relay: Relay, stats: RelayStats) -> None:
        """A channel closed: its access line, then hang up if it was the last of a cut."""
        assert stats.outcome is not None, "a closed relay always says how it ended"
        self._log_access(stats.outcome, stats)
        self._relays_logged += 1
        self.relays.discard(relay)
        self.touch()
        if (self.cut_reason or self._one_command) and not self.relays and self._conn is not None:
            self._conn.close()

    @property
    def _one_command(self) -> bool:
        """At most one command on this connection, then hang up: it drains, or it was let in
        only to be told that the directory is unavailable."""
        return self.draining or self.directory_unavailable

    def drain(self) -> None:
        """Let running commands finish, then hang up; a connection idle after a command goes now.

        A connection that has not yet sent its first command (still authenticating, or just
        authenticated: a client opens its channel a few milliseconds after) may still run it:
        its client connected before the drain began, so it is served, not refused. It has
        FIRST_COMMAND_GRACE to ask (a channel opened for it counts for nothing until then).
        """
        self.draining = True
        if self.state is SessionState.AUTHENTICATED:
            if self._had_relay and not self.relays:
                self._close_for_drain()
            elif not self._asked():
                self._await_first_command()

    def _asked(self) -> bool:
        """Whether a channel of this connection asked for its command."""
        return any(relay.state is not RelayState.REQUESTED for relay in self.relays)

    def _await_first_command(self) -> None:
        """Hang up unless a command comes within FIRST_COMMAND_GRACE (scheduled once)."""
        if "first_command" not in self._timers:
            self._timers["first_command"] = self._loop.call_later(
                FIRST_COMMAND_GRACE, self._close_if_idle
            )

    def _close_for_drain(self) -> None:
        if not self.relays and self._conn is not None:
            self.log.info("closing idle connection for drain")
            self._conn.close()

    def _close_if_idle(self) -> None:
        """FIRST_COMMAND_GRACE after a one-command connection was let in: hang up unless its
        command was asked. A channel opened and never used for one holds the connection for
        nothing (and, with the directory down, any key at all gets this far)."""
        if self._conn is None or self._asked():
            return
        if self.directory_unavailable:
            self.log.debug("no command while the directory is unavailable: closing")
        else:
            self.log.info("closing idle connection for drain")
        self._conn.close()

    # -- timeouts and cuts ------------------------------------------------------------------------

    def touch(self) -> None:
        """Note a byte in either direction. Called per chunk, so it only stores a float."""
        self._last_activity = self._loop.time()

    def _check_limits(self) -> None:
        """Cut at max_session, or after `idle` without a byte; else look again when the
        sooner of the two can be due (activity only ever moves the idle deadline later)."""
        now = self._loop.time()
        idle_ends = self._last_activity + self.host.config.timeouts.idle
        if now >= self._ends_at:
            self.cut(CutReason.MAX_SESSION)
        elif now >= idle_ends:
            self.cut(CutReason.IDLE)
        else:
            due = min(idle_ends, self._ends_at) - now
            self._timers["limits"] = self._loop.call_later(due, self._check_limits)

    def abort(self) -> None:
        """Hang up at once (the worker exits): the connection and its channels end now."""
        if self._conn is not None:
            self._conn.abort()

    def cut(self, reason: CutReason) -> None:
        """End this session now with a message saying why (SPEC 3 and 4)."""
        conn = self._conn
        if conn is None or self.cut_reason is not None:
            return
        self.cut_reason = reason
        timeouts = self.host.config.timeouts
        detail = {
            CutReason.LOGIN_GRACE: format_duration(timeouts.login_grace),
            CutReason.IDLE: format_duration(timeouts.idle),
            CutReason.MAX_SESSION: format_duration(timeouts.max_session),
        }.get(reason)
        self.log.warning("cut: %s%s", reason.value, f" ({detail})" if detail else "")
        if not self.relays:
            conn.disconnect(asyncssh.DISC_BY_APPLICATION, reason.client_line(self.id).rstrip())
            return
        # First: a relay whose cut fails (a bug) must not leave the connection without an end.
        self._timers["cut_grace"] = self._loop.call_later(CUT_GRACE, conn.abort)
        for relay in list(self.relays):
            try:
                relay.cut(reason)
            except Exception:
                self.log.exception("failed to cut a channel; the connection is aborted")
                conn.abort()
                return

    def row_key(self) -> tuple[object, ...]:
        """What its status row shows that changes, duration aside: bytes each way, account,
        repository, state. Without a channel it costs a tuple, not a row."""
        if self.relays:
            row = self.statistics()
            return (row.bytes_in, row.bytes_out, row.account, row.repo, row.state)
        return (0, 0, self.identity.account if self.identity else None, None, self.state.value)

    def statistics(self) -> SessionStats:
        account, user, key_name, key = _who(self.identity)
        relays = [relay.statistics() for relay in self.relays]
        # The row has room for one command: git and hg open one channel per connection.
        first = relays[0] if relays else None
        command = first.command if first else None
        return SessionStats(
            session=self.id,
            remote_addr=self.remote,
            login=self.login,
            account=account,
            user=user,
            key_name=key_name,
            key_fingerprint=key,
            repo=command.repo if command else None,
            vcs=first.vcs if first else None,
            verb=command.verb.value if command else None,
            backend=first.backend if first else None,
            started_at=self.started_at,
            duration=time.time() - self.started_at,
            bytes_in=sum(r.bytes_in for r in relays),
            bytes_out=sum(r.bytes_out for r in relays),
            state=self.state.value,
        )
