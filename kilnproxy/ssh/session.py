"""One client connection: its session id, its verified identity, its timers and its channels.

`Session` is the asyncssh `SSHServer` of one connection. It authenticates the key against the
directory, hands each channel to a `Relay`, and enforces the session timeouts of SPEC 4. It must
never decide access or parse commands itself (that is `commands`, `access` and `relay`), and it
must leave nothing behind: every timer it starts is cancelled in `connection_lost`.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import asyncssh

from kilnproxy.backends import Backends
from kilnproxy.config import Config, format_duration
from kilnproxy.directory import Directory, Identity
from kilnproxy.errors import CutReason
from kilnproxy.logs import SessionLog, access_line
from kilnproxy.ssh.keys import fingerprint, policy_problem
from kilnproxy.ssh.relay import Relay
from kilnproxy.ssh.signatures import restrict_signatures
from kilnproxy.worker.metrics import WorkerMetrics

log = logging.getLogger("kilnproxy.session")

CUT_GRACE = 5.0  # after a cut, how long the client gets to read its message before we hang up


class SessionState(enum.Enum):
    CONNECTING = "connecting"  # TCP accepted, not yet authenticated
    AUTHENTICATED = "authenticated"
    CLOSED = "closed"


@dataclass
class SessionHost:
    """What every session of a worker shares: settings, directory, backends, the live table."""

    config: Config
    directory: Directory
    backends: Backends
    sessions: dict[str, Session] = field(default_factory=dict)
    total: int = 0
    accepting: bool = True
    # Set whenever no session is open: what a drain waits for.
    no_sessions: asyncio.Event = field(default_factory=asyncio.Event)
    # Told the id of every session that ends (the worker reports it to the master).
    on_close: Callable[[str], None] | None = None
    metrics: WorkerMetrics = field(default_factory=WorkerMetrics)

    def opened(self, session: Session) -> None:
        self.sessions[session.id] = session
        self.total += 1
        self.no_sessions.clear()

    def closed(self, session: Session) -> None:
        self.sessions.pop(session.id, None)
        if not self.sessions:
            self.no_sessions.set()
        if self.on_close is not None:
            self.on_close(session.id)


@dataclass(frozen=True)
class SessionStats:
    """One row of the connection table (SPEC 7)."""

    session: str
    remote_addr: str
    login: str
    account: str | None
    user: str | None
    key_name: str | None
    key_fingerprint: str | None
    repo: str | None
    vcs: str | None
    verb: str | None
    backend: str | None
    started_at: float
    duration: float
    bytes_in: int
    bytes_out: int
    state: str


class Session(asyncssh.SSHServer):
    def __init__(self, host: SessionHost) -> None:
        self.host = host
        self.id = secrets.token_hex(4)
        self.log = SessionLog(log, self.id)
        self.state = SessionState.CONNECTING
        self.remote = ""
        self.login = ""
        self.identity: Identity | None = None
        self.relays: set[Relay] = set()
        self.started_at = time.time()
        self.cut_reason: CutReason | None = None
        self.draining = False
        self._loop = asyncio.get_running_loop()
        self._last_activity = self._loop.time()
        self._candidate: Identity | None = None
        self._auth_tries = 0
        self._had_relay = False
        self._conn: asyncssh.SSHServerConnection | None = None
        self._timers: dict[str, asyncio.TimerHandle] = {}

    def __repr__(self) -> str:
        return f"<Session {self.id} {self.state.value} {self.remote}>"

    # -- connection lifecycle -----------------------------------------------------------------

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self._conn = conn
        # The client's address from a PROXY header if a load balancer sent one (proxy_accept).
        peer = conn.get_extra_info("proxy_source") or conn.get_extra_info("peername") or ("?", 0)
        self.remote = f"{peer[0]}:{peer[1]}"
        self.host.opened(self)
        timeouts = self.host.config.timeouts
        self._timers["login_grace"] = self._loop.call_later(
            timeouts.login_grace, self.cut, CutReason.LOGIN_GRACE
        )
        self._timers["max_session"] = self._loop.call_later(
            timeouts.max_session, self.cut, CutReason.MAX_SESSION
        )
        self._timers["idle"] = self._loop.call_later(timeouts.idle, self._check_idle)
        self.log.info("connection from %s", self.remote)

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        self.state = SessionState.CLOSED
        self.host.closed(self)
        if not self._had_relay:
            self._log_without_command(exc)
        self.log.info("connection closed%s", f": {exc}" if exc else "")
        self._conn = None

    def _log_without_command(self, exc: Exception | None) -> None:
        """The access line of a connection that never ran a command (SPEC 4: every session)."""
        if self.cut_reason is not None:
            outcome = "timeout" if self.cut_reason is CutReason.LOGIN_GRACE else "cut"
        elif self.identity is None:
            outcome = "auth-failed"
        else:
            outcome = "no-command"
        self.log_access(outcome, None)

    def log_access(self, outcome: str, relay: Relay | None) -> None:
        """The one access line of SPEC 4, for one command (or a connection that ran none)."""
        identity = self.identity
        command = relay.command if relay else None
        verb = command.verb.value if command else None
        if relay is not None and relay.is_shell:
            verb = "shell"
        started = relay.started_at if relay else self.started_at
        self.host.metrics.session_ended(
            outcome, relay.bytes_in if relay else 0, relay.bytes_out if relay else 0
        )
        access_line(
            self.id,
            {
                "remote": self.remote,
                "login": self.login,
                "account": identity.account if identity else None,
                "user": identity.user if identity else None,
                "key_name": identity.key_name if identity else None,
                "key": identity.fingerprint if identity else None,
                "repo": command.repo if command else None,
                "verb": verb,
                "backend": relay.backend_name if relay else None,
                "exit": relay.exit_status if relay else None,
                "outcome": outcome,
                "bytes_in": relay.bytes_in if relay else 0,
                "bytes_out": relay.bytes_out if relay else 0,
                "duration": f"{time.time() - started:.3f}s",
            },
        )

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
        self._candidate = None
        self._auth_tries += 1
        if self._auth_tries > self.host.config.ssh.max_auth_tries:
            self.log.info("too many keys offered")
            return False
        try:  # the isolation boundary of authentication: a failure refuses this key only
            problem = policy_problem(key)
            if problem:
                self.log.info("refused key: %s", problem)
                return False
            restrict_signatures(key)
            print_ = fingerprint(key)
            started = time.perf_counter()
            identity = await self.host.directory.identity_for_key(print_)
            self.host.metrics.auth_lookup.observe(time.perf_counter() - started)
        except Exception:
            self.log.exception("cannot check key %s", key.get_algorithm())
            return False
        if identity is None:
            self.log.info("unknown key %s", print_)
            return False
        self._candidate = identity
        return True

    def auth_completed(self) -> None:
        identity = self._candidate
        assert identity is not None, "asyncssh completed auth without a validated key"
        self.identity = identity
        self.state = SessionState.AUTHENTICATED
        self._timers.pop("login_grace").cancel()
        self.log.info(
            "authenticated %s/%s as %s with key %r %s",
            identity.account,
            identity.user,
            self.login,
            identity.key_name,
            identity.fingerprint,
        )

    # -- channels ---------------------------------------------------------------------------------

    def session_requested(self) -> Relay | bool:
        if self.cut_reason is not None or len(self.relays) >= self.host.config.ssh.max_channels:
            return False
        if self.draining and self._had_relay:
            return False  # one more command on a draining connection: the client reconnects
        relay = Relay(self)
        self.relays.add(relay)
        self._had_relay = True
        self.touch()
        return relay

    def relay_closed(self, relay: Relay) -> None:
        self.relays.discard(relay)
        self.touch()
        if (self.cut_reason or self.draining) and not self.relays and self._conn is not None:
            self._conn.close()

    def drain(self) -> None:
        """Let running commands finish, then hang up; a connection running none goes now.

        A connection still authenticating may finish and run its command: its client
        connected before the drain began, so it is served, not refused.
        """
        self.draining = True
        if self.state is SessionState.AUTHENTICATED and not self.relays and self._conn:
            self.log.info("closing idle connection for drain")
            self._conn.close()

    # -- timeouts and cuts ------------------------------------------------------------------------

    def touch(self) -> None:
        """Note a byte in either direction. Called per chunk, so it only stores a float."""
        self._last_activity = self._loop.time()

    def _check_idle(self) -> None:
        idle = self.host.config.timeouts.idle
        remaining = self._last_activity + idle - self._loop.time()
        if remaining > 0:
            self._timers["idle"] = self._loop.call_later(remaining, self._check_idle)
        else:
            self.cut(CutReason.IDLE)

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
            conn.disconnect(asyncssh.DISC_BY_APPLICATION, f"kilnproxy: {reason.value}")
            return
        for relay in list(self.relays):
            relay.cut(reason)
        self._timers["cut_grace"] = self._loop.call_later(CUT_GRACE, conn.abort)

    def statistics(self) -> SessionStats:
        identity = self.identity
        relay = next(iter(self.relays), None)
        command = relay.command if relay else None
        return SessionStats(
            session=self.id,
            remote_addr=self.remote,
            login=self.login,
            account=identity.account if identity else None,
            user=identity.user if identity else None,
            key_name=identity.key_name if identity else None,
            key_fingerprint=identity.fingerprint if identity else None,
            repo=command.repo if command else None,
            vcs=relay.vcs if relay and relay.vcs else None,
            verb=command.verb.value if command else None,
            backend=relay.backend_name if relay and relay.backend_name else None,
            started_at=self.started_at,
            duration=time.time() - self.started_at,
            bytes_in=sum(r.bytes_in for r in self.relays),
            bytes_out=sum(r.bytes_out for r in self.relays),
            state=self.state.value,
        )
