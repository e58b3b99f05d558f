"""The relay's state machine, driven with fakes: a channel, a backend stream, a directory.

What these pin down is the order of things a client or a backend sees: bytes sent before the
backend is up, an EOF that arrives early, the exit status held back until the client has taken
every byte before it, a cut, a backend lost halfway. The same flows run end to end, with real
git, hg and sshd, in tests/integration.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any, cast

import asyncssh
import pytest
import uvloop

from kilnproxy.backends import BackendRequest, BackendSink, BackendStream
from kilnproxy.config import from_mapping
from kilnproxy.directory import Identity, Route
from kilnproxy.errors import BackendError, CutReason, DirectoryUnavailable
from kilnproxy.logs import SessionLog
from kilnproxy.policy.access import Access, Role
from kilnproxy.policy.admission import AccountSessions, Refusal
from kilnproxy.policy.commands import Command, Vcs, Verb
from kilnproxy.ssh import server
from kilnproxy.ssh.relay import Outcome, Relay, RelayState, RelayStats
from kilnproxy.ssh.services import Services
from kilnproxy.ssh.session import Session, SessionHost

SESSION = "3f9c2a1b"
BOB = Identity("aviato", "bob", Role.WRITE, "laptop", "SHA256:bobkey")
UPLOAD = "git-upload-pack 'aviato/website.git'"
STORAGE = "storage for aviato/website is unavailable, try again later"
STORAGE_LINE = f"kilnproxy: {STORAGE} (session {SESSION})\n".encode()


def on_a_loop(body: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[], None]:
    """An async test body, run on a fresh loop: a relay takes the running loop when made."""

    def test() -> None:
        asyncio.run(body())

    return test


async def settle() -> None:
    """Let the loop run what is ready: the relay's opening task, the coalescers' flushes."""
    for _ in range(5):
        await asyncio.sleep(0)


class FakeChannel:
    """An SSH channel that records, in one list and in order, what the client would get. As
    asyncssh's, it raises on a write once it is closing (exit sent, or the client closed it),
    and ignores an exit then."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        self.sent: list[tuple[str, object]] = []  # ("out" | "err" | "exit", payload)
        self.reading = True
        self.buffered = 0  # bytes the client has not taken yet
        self.limits: tuple[int | None, int | None] | None = None
        self.client_closed = False  # CHANNEL_CLOSE came; asyncssh's connection_lost not yet
        self.closed_by_relay = False
        self._env = dict(env or {})

    def write(self, data: bytes) -> None:
        self._open_for_sending()
        self.sent.append(("out", data))

    def write_stderr(self, data: bytes) -> None:
        self._open_for_sending()
        self.sent.append(("err", data))

    def exit(self, status: int) -> None:
        if not self.is_closing():
            self.sent.append(("exit", status))

    def close(self) -> None:
        self.closed_by_relay = True

    def abort(self) -> None:
        self.closed_by_relay = True

    def is_closing(self) -> bool:
        return self.client_closed or any(kind == "exit" for kind, _ in self.sent)

    def _open_for_sending(self) -> None:
        if self.is_closing():
            raise BrokenPipeError("Channel not open for sending")

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.limits = (high, low)

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def get_environment(self) -> Mapping[str, str]:
        return self._env


class FakeStream:
    """A running backend command that records what the relay did to it."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bytes]] = []
        self.output_paused = False

    def write(self, data: bytes) -> None:
        self.calls.append(("write", data))

    def write_eof(self) -> None:
        self.calls.append(("eof", b""))

    def pause_output(self) -> None:
        self.output_paused = True

    def resume_output(self) -> None:
        self.output_paused = False

    def abort(self) -> None:
        self.calls.append(("abort", b""))


class FakeBackend:
    """Starts a `FakeStream` once `up` is set, or fails with `error`."""

    name = "local"

    def __init__(self) -> None:
        self.up = asyncio.Event()
        self.up.set()
        self.error: BackendError | None = None
        self.stream = FakeStream()
        self.requests: list[BackendRequest] = []

    async def open(self, request: BackendRequest, sink: BackendSink) -> BackendStream:
        self.requests.append(request)
        await self.up.wait()
        if self.error is not None:
            raise self.error
        return self.stream

    async def close(self) -> None:
        pass


class FakeBackends:
    def __init__(self, backend: FakeBackend) -> None:
        self.backend = backend

    def for_route(self, route: Route) -> FakeBackend:
        return self.backend


class FakeDirectory:
    """Knows one route (or none), or fails with `error`."""

    def __init__(self, route: Route | None) -> None:
        self.route_found = route
        self.error: Exception | None = None

    async def identity_for_key(self, fingerprint: str) -> Identity | None:
        return None

    async def route(self, identity: Identity, repo: str) -> Route | None:
        if self.error is not None:
            raise self.error
        return self.route_found

    def close(self) -> None:
        pass


class FakeObserver:
    def __init__(self) -> None:
        self.values: list[float] = []

    def observe(self, seconds: float) -> None:
        self.values.append(seconds)


class FakeMetrics:
    def __init__(self) -> None:
        self.auth_lookup = FakeObserver()
        self.route_lookup = FakeObserver()
        self.bytes_in = 0
        self.bytes_out = 0

    def session_ended(self, outcome: str) -> None:
        raise AssertionError("a relay never counts sessions: its owner does, once")

    def refused(self, reason: Refusal) -> None:
        raise AssertionError("a relay refuses no connection")


class FakeAdmission:
    """Sessions per account against a cap, counted as the worker's admission counts them."""

    def __init__(self, cap: int = 0) -> None:
        self.sessions = AccountSessions(cap)

    def admit(self, peer: tuple[str, int]) -> None:
        raise AssertionError("connections are admitted by the listener, never by a relay")

    def open_session(self, account: str) -> None:
        self.sessions.open(account)

    def close_session(self, account: str) -> None:
        self.sessions.close(account)


class FakeOwner:
    """The connection a relay runs on: counts touches, keeps the final records."""

    def __init__(self) -> None:
        self.id = SESSION
        self.log = SessionLog(logging.getLogger("kilnproxy.test.relay"), SESSION)
        self.identity: Identity | None = BOB
        self.touches = 0
        self.closed: list[RelayStats] = []

    def touch(self) -> None:
        self.touches += 1

    def relay_closed(self, relay: Relay, stats: RelayStats) -> None:
        self.closed.append(stats)


def website(access: Access = Access.WRITE, vcs: Vcs = Vcs.GIT) -> Route:
    return Route("aviato/website", vcs, "local", "local:/srv", "/srv/aviato/website.git", access)


class Rig:
    """One relay on its fakes, as asyncssh would drive it up to `session_started`."""

    def __init__(
        self,
        route: Route | None = None,
        env: Mapping[str, str] | None = None,
        admission: FakeAdmission | None = None,
    ) -> None:
        self.owner = FakeOwner()
        self.chan = FakeChannel(env)
        self.backend = FakeBackend()
        self.directory = FakeDirectory(route)
        self.metrics = FakeMetrics()
        self.admission = admission or FakeAdmission()
        backends = FakeBackends(self.backend)
        services = Services(self.directory, backends, self.metrics, self.admission)
        self.relay = Relay(self.owner, services)
        self.relay.connection_made(self.chan)

    def start(self, line: str | None = UPLOAD) -> None:
        if line is None:
            assert self.relay.shell_requested()
        else:
            assert self.relay.exec_requested(line)
        self.relay.session_started()

    async def running(self, line: str = UPLOAD) -> FakeStream:
        self.start(line)
        await settle()
        assert self.relay.state is RelayState.RUNNING
        return self.backend.stream


async def hello_before_the_backend() -> Rig:
    """An hg session whose client says hello at once, before its backend is up."""
    rig = Rig(website(vcs=Vcs.HG))
    rig.backend.up.clear()
    rig.start("hg -R aviato/website serve --stdio")
    await settle()
    rig.relay.data_received(b"hello\n", None)
    return rig


@on_a_loop
async def test_bytes_before_the_backend_is_up_wait_then_go_first() -> None:
    rig = await hello_before_the_backend()
    assert not rig.chan.reading  # one chunk held; asyncssh keeps the rest within the window
    rig.relay.eof_received()
    assert rig.backend.stream.calls == []
    rig.backend.up.set()
    await settle()
    assert rig.backend.stream.calls == [("write", b"hello\n"), ("eof", b"")]
    assert rig.chan.reading
    assert rig.relay.statistics().bytes_in == 6


@on_a_loop
async def test_chunks_of_one_pass_are_one_write_each_way_in_order() -> None:
    rig = Rig(website())
    stream = await rig.running()
    rig.relay.data_received(b"want ", None)
    rig.relay.data_received(b"abc\n", None)
    rig.relay.data_received(b"not stdin", 1)  # extended data: counted, never relayed
    rig.relay.backend_stdout(b"pack ")
    rig.relay.backend_stdout(b"data")
    rig.relay.backend_stderr(b"counting objects\n")  # after the stdout that came before it
    rig.relay.backend_stdout(b" more")
    await settle()
    assert stream.calls == [("write", b"want abc\n")]
    assert rig.chan.sent == [
        ("out", b"pack data"),
        ("err", b"counting objects\n"),
        ("out", b" more"),
    ]
    stats = rig.relay.statistics()
    assert (stats.bytes_in, stats.bytes_out) == (18, 31)
    # The worker's counters have them already, while the session runs (/metrics).
    assert (rig.metrics.bytes_in, rig.metrics.bytes_out) == (18, 31)
    assert rig.owner.touches == 7


@on_a_loop
async def test_the_exit_status_waits_until_the_client_took_every_byte() -> None:
    rig = Rig(website())
    stream = await rig.running()
    rig.relay.pause_writing()
    assert stream.output_paused
    rig.chan.buffered = 65536
    rig.relay.backend_stdout(b"last bytes")
    rig.relay.backend_finished(0)
    assert rig.chan.sent == [("out", b"last bytes")]  # flushed at once, but no exit yet
    assert rig.chan.limits == (0, 0)  # so that asyncssh says when the buffer is empty
    assert rig.relay.state is RelayState.EXITING
    rig.chan.buffered = 0
    rig.relay.resume_writing()
    assert rig.chan.sent == [("out", b"last bytes"), ("exit", 0)]
    assert stream.output_paused  # the command is over: nothing to resume
    rig.relay.connection_lost(None)
    (stats,) = rig.owner.closed
    assert (stats.outcome, stats.exit_status) == (Outcome.OK, 0)


@on_a_loop
async def test_a_channel_the_client_closed_gets_nothing_more_and_nothing_raises() -> None:
    """The client closed its channel, not its connection: the backend's stderr, its loss and a
    cut find the channel closing before asyncssh says it is lost, and must not raise (out of a
    shared agent connection's callback, that would end every session on it). The relay closes
    the channel in the end, for asyncssh holds its connection_lost while reading is paused."""
    for end in ("stderr", "lost", "cut"):
        rig = Rig(website())
        await rig.running()
        rig.relay.backend_stdout(b"sent before")
        await settle()
        rig.chan.client_closed = True
        rig.relay.backend_stdout(b"not sent")
        rig.relay.backend_stderr(b"remote: error\n")
        if end == "lost":
            rig.relay.backend_lost(BackendError("aviato/website", "connection lost"))
        elif end == "cut":
            rig.relay.cut(CutReason.DRAIN)
        else:
            rig.relay.backend_finished(128)
        await settle()
        assert rig.chan.sent == [("out", b"sent before")], end
        assert rig.chan.closed_by_relay, end
        rig.relay.connection_lost(None)
        assert len(rig.owner.closed) == 1


@on_a_loop
async def test_an_empty_buffer_exits_at_once_with_the_backends_status() -> None:
    rig = Rig(website())
    await rig.running()
    rig.relay.backend_finished(3)
    assert rig.chan.sent == [("exit", 3)]
    assert rig.chan.limits is None
    assert not rig.chan.closed_by_relay  # asyncssh's exit closes it
    rig.relay.connection_lost(None)
    assert rig.owner.closed[0].outcome is Outcome.FAILED


@pytest.mark.parametrize(
    ("reason", "outcome"),
    [(CutReason.IDLE, Outcome.TIMEOUT), (CutReason.DRAIN, Outcome.CUT)],
)
def test_a_cut_says_why_stops_the_backend_and_exits_1(reason: CutReason, outcome: Outcome) -> None:
    async def body() -> None:
        rig = Rig(website())
        stream = await rig.running()
        rig.relay.backend_stdout(b"not yet sent")
        rig.relay.cut(reason)
        rig.relay.backend_finished(0)  # too late: the relay is exiting already
        await settle()
        line = f"kilnproxy: {reason.value} (session {SESSION})\n".encode()
        assert rig.chan.sent == [("err", line), ("exit", 1)]
        assert stream.calls == [("abort", b"")]
        rig.relay.connection_lost(None)
        (stats,) = rig.owner.closed
        assert (stats.outcome, stats.exit_status) == (outcome, 1)

    asyncio.run(body())


@on_a_loop
async def test_a_cut_while_opening_gives_up_the_opening() -> None:
    """A route lookup or a backend dial under way is cancelled, not waited for (a dial may take
    the dial timeout): no command is started for a session that has ended."""
    rig = Rig(website())
    rig.backend.up.clear()
    rig.start()
    await settle()
    assert rig.backend.requests  # the backend is being opened
    rig.relay.cut(CutReason.ADMIN)
    await settle()
    rig.backend.up.set()
    await settle()
    assert rig.backend.stream.calls == []  # never handed over: nothing to abort
    assert rig.relay.state is RelayState.EXITING
    assert rig.chan.sent[-1] == ("exit", 1)


@on_a_loop
async def test_a_cut_while_the_last_bytes_wait_for_the_client_is_still_a_cut() -> None:
    """The command has ended and its last bytes wait for a client that reads nothing: a cut
    (idle, drain, an administrator) is what the session's end is, in its line and for the
    client, who gets its message after those bytes and exit status 1, not the command's 0."""
    rig = Rig(website())
    await rig.running()
    rig.relay.pause_writing()
    rig.chan.buffered = 65536
    rig.relay.backend_stdout(b"last bytes")
    rig.relay.backend_finished(0)
    rig.relay.cut(CutReason.IDLE)
    line = f"kilnproxy: {CutReason.IDLE.value} (session {SESSION})\n".encode()
    assert rig.chan.sent == [("out", b"last bytes"), ("err", line)]
    rig.chan.buffered = 0
    rig.relay.resume_writing()
    assert rig.chan.sent[-1] == ("exit", 1)
    rig.relay.connection_lost(None)
    (stats,) = rig.owner.closed
    assert (stats.outcome, stats.exit_status) == (Outcome.TIMEOUT, 1)


@on_a_loop
async def test_an_exec_that_comes_after_a_cut_starts_nothing() -> None:
    rig = Rig(website())
    rig.relay.cut(CutReason.ADMIN)  # its channel open, its exec still on the way
    rig.start()
    await settle()
    assert rig.backend.requests == []
    assert rig.relay.state is RelayState.EXITING


@on_a_loop
async def test_a_lost_backend_ends_with_what_it_sent_then_one_line() -> None:
    rig = Rig(website())
    await rig.running()
    rig.relay.backend_stdout(b"half a pack")
    rig.relay.backend_lost(BackendError("aviato/website", "connection reset"))
    assert rig.chan.sent == [("out", b"half a pack"), ("err", STORAGE_LINE), ("exit", 1)]
    rig.relay.connection_lost(None)
    assert rig.owner.closed[0].outcome is Outcome.BACKEND_ERROR


@on_a_loop
async def test_a_client_that_goes_away_takes_the_backend_with_it() -> None:
    rig = Rig(website())
    stream = await rig.running()
    rig.relay.data_received(b"want", None)
    rig.relay.connection_lost(ConnectionResetError())
    await settle()
    assert stream.calls == [("abort", b"")]  # the pending stdin is dropped, not written
    (stats,) = rig.owner.closed
    assert (stats.outcome, stats.exit_status, stats.bytes_in) == (Outcome.CLIENT_GONE, None, 4)
    assert rig.relay.state is RelayState.CLOSED


@on_a_loop
async def test_a_client_gone_while_opening_cancels_the_opening() -> None:
    rig = Rig(website())
    rig.backend.up.clear()
    rig.start()
    await settle()
    rig.relay.connection_lost(None)
    await settle()
    assert rig.backend.stream.calls == []  # the open was cancelled before any stream existed
    assert rig.owner.closed[0].outcome is Outcome.CLIENT_GONE


@on_a_loop
async def test_back_pressure_both_ways() -> None:
    rig = Rig(website())
    rig.backend.up.clear()
    rig.start()
    await settle()
    rig.relay.pause_writing()  # the client's window filled before the backend was up
    rig.relay.backend_pause_input()  # and the backend's stdin is full
    rig.backend.up.set()
    await settle()
    assert rig.backend.stream.output_paused
    assert not rig.chan.reading  # the client waits until the backend's stdin drains
    rig.relay.backend_resume_input()
    assert rig.chan.reading
    rig.relay.resume_writing()
    assert not rig.backend.stream.output_paused


@on_a_loop
async def test_a_client_that_reads_nothing_pauses_the_backend_whatever_its_window() -> None:
    """The client's window is the client's to set: output also waits while the connection's
    write buffer is full (`Session.client_backlogged`), and goes on only once neither is."""
    rig = Rig(website())
    rig.start()
    await settle()
    stream = rig.backend.stream
    rig.relay.client_backlogged(True)
    assert stream.output_paused
    rig.relay.pause_writing()
    rig.relay.client_backlogged(False)
    assert stream.output_paused  # the window is still full
    rig.relay.client_backlogged(True)
    rig.relay.resume_writing()
    assert stream.output_paused  # the buffer is still full
    rig.relay.client_backlogged(False)
    assert not stream.output_paused


@on_a_loop
async def test_a_routed_command_tells_the_backend_who_and_what() -> None:
    rig = Rig(website(), env={"GIT_PROTOCOL": "version=2", "LANG": "C"})
    await rig.running()
    (request,) = rig.backend.requests
    assert (request.session_id, request.verb, request.identity) == (SESSION, Verb.UPLOAD_PACK, BOB)
    assert request.git_protocol == "version=2"
    assert len(rig.metrics.route_lookup.values) == 1
    stats = rig.relay.statistics()
    assert stats.command == Command(Verb.UPLOAD_PACK, "aviato/website")
    assert (stats.vcs, stats.backend, stats.shell) == ("git", "local", False)
    assert (stats.exit_status, stats.outcome) == (None, None)


REFUSALS = [
    # what the client asked, what the directory says, the line, the status, the outcome
    (
        "rm -rf /",
        website(),
        "kilnproxy: unknown command; only git and hg transport commands are served (session {})",
        128,
        Outcome.BAD_COMMAND,
    ),
    (
        UPLOAD,
        None,
        "kilnproxy: repository 'aviato/website' not found or access denied (session {})",
        1,
        Outcome.DENIED,
    ),
    (
        UPLOAD,
        website(vcs=Vcs.HG),
        "kilnproxy: repository 'aviato/website' not found or access denied (session {})",
        1,
        Outcome.DENIED,
    ),
    (
        "git-receive-pack aviato/website",
        website(Access.READ),
        "kilnproxy: you have read-only access to 'aviato/website' (session {})",
        1,
        Outcome.DENIED,
    ),
    (
        None,
        website(),
        "Hi bob (aviato)! You have authenticated, but kilnproxy does not provide shell access.",
        1,
        Outcome.DENIED,
    ),
]


@pytest.mark.parametrize(("line", "route", "told", "status", "outcome"), REFUSALS)
def test_a_refusal_is_one_line_and_one_status(
    line: str | None, route: Route | None, told: str, status: int, outcome: Outcome
) -> None:
    async def body() -> None:
        rig = Rig(route)
        rig.start(line)
        await settle()
        assert rig.chan.sent == [("err", (told.format(SESSION) + "\n").encode()), ("exit", status)]
        assert rig.backend.requests == []
        rig.relay.connection_lost(None)
        (stats,) = rig.owner.closed
        assert (stats.outcome, stats.exit_status, stats.shell) == (outcome, status, line is None)

    asyncio.run(body())


@on_a_loop
async def test_an_unreachable_backend_is_a_storage_line_and_exit_1() -> None:
    rig = Rig(website())
    rig.backend.error = BackendError("aviato/website", "dial timed out")
    rig.start()
    await settle()
    assert rig.chan.sent == [("err", STORAGE_LINE), ("exit", 1)]
    rig.relay.connection_lost(None)
    assert rig.owner.closed[0].outcome is Outcome.BACKEND_ERROR


def test_a_bug_while_opening_ends_this_channel_only(caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        rig = Rig(website())
        rig.directory.error = RuntimeError("the directory's bug")
        rig.start()
        await settle()
        line = f"kilnproxy: internal error (session {SESSION})\n"
        assert rig.chan.sent == [("err", line.encode()), ("exit", 1)]
        rig.relay.connection_lost(None)
        assert rig.owner.closed[0].outcome is Outcome.INTERNAL_ERROR

    asyncio.run(body())
    (record,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert getattr(record, "session", None) == SESSION
    assert record.exc_info is not None and "the directory's bug" in str(record.exc_info[1])


UNAVAILABLE_LINE = (
    f"kilnproxy: service temporarily unavailable, try again later (session {SESSION})\n".encode()
)


@pytest.mark.parametrize("line", [UPLOAD, None])
def test_a_directory_down_at_the_route_or_at_the_key_is_one_line_and_exit_1(
    line: str | None,
) -> None:
    async def body() -> None:
        rig = Rig(website())
        if line is None:  # the key was let in while the directory was down: no identity
            rig.owner.identity = None
        else:
            rig.directory.error = DirectoryUnavailable("connection refused")
        rig.start(line)
        await settle()
        assert rig.chan.sent == [("err", UNAVAILABLE_LINE), ("exit", 1)]
        assert rig.backend.requests == []
        rig.relay.connection_lost(None)
        assert rig.owner.closed[0].outcome is Outcome.UNAVAILABLE

    asyncio.run(body())


@on_a_loop
async def test_a_session_over_the_accounts_cap_is_refused_and_a_closed_one_gives_back() -> None:
    admission = FakeAdmission(cap=1)
    first = Rig(website(), admission=admission)
    await first.running()
    assert admission.sessions.statistics() == {"aviato": 1}
    second = Rig(website(), admission=admission)
    second.start()
    await settle()
    line = f"kilnproxy: too many concurrent sessions for account 'aviato' (session {SESSION})\n"
    assert second.chan.sent == [("err", line.encode()), ("exit", 1)]
    assert second.backend.requests == []
    second.relay.connection_lost(None)
    assert second.owner.closed[0].outcome is Outcome.REFUSED
    assert admission.sessions.statistics() == {"aviato": 1}  # the refused one never counted
    first.relay.connection_lost(None)
    assert admission.sessions.statistics() == {}
    third = Rig(website(), admission=admission)
    await third.running()
    third.relay.cut(CutReason.ADMIN)
    third.relay.connection_lost(None)
    assert admission.sessions.statistics() == {}


@on_a_loop
async def test_bad_commands_and_shells_take_no_session() -> None:
    admission = FakeAdmission(cap=1)
    for line in ("rm -rf /", None):
        rig = Rig(website(), admission=admission)
        rig.start(line)
        await settle()
        assert rig.chan.sent[-1] == ("exit", 128 if line else 1)
        assert admission.sessions.statistics() == {}  # while the channel is still open
        rig.relay.connection_lost(None)


@pytest.mark.parametrize("first", ["the backend ends", "the client closes"])
def test_a_client_that_closes_instead_of_reading_is_heard(first: str) -> None:
    """On a real asyncssh channel, for what FakeChannel cannot show: asyncssh passes a client's
    CHANNEL_CLOSE on (connection_lost) only after the data that came before it, which it holds
    while the relay reads no more. A client that has not taken its output and closes its
    channel instead of reading it, before or after the backend ends, must still end the
    session, not leave it for the idle timeout."""
    asyncio.run(_close_instead_of_reading(first))


class EndingOwner(FakeOwner):
    """An owner that says when its relay has closed."""

    def __init__(self) -> None:
        super().__init__()
        self.ended = asyncio.Event()

    def relay_closed(self, relay: Relay, stats: RelayStats) -> None:
        super().relay_closed(relay, stats)
        self.ended.set()


async def _close_instead_of_reading(first: str) -> None:
    owner = EndingOwner()
    services = Services(FakeDirectory(website()), FakeBackends(FakeBackend()), FakeMetrics(),
                        FakeAdmission())  # fmt: skip
    relay = Relay(owner, services)

    class Server(asyncssh.SSHServer):
        def begin_auth(self, username: str) -> bool:
            return False  # no authentication: the relay is what is tested

        def session_requested(self) -> Relay:
            return relay

    host_key = asyncssh.generate_private_key("ssh-ed25519")
    listener = await asyncssh.listen("127.0.0.1", 0, server_host_keys=[host_key],
                                     server_factory=Server, encoding=None,
                                     line_editor=False)  # fmt: skip
    port = listener.sockets[0].getsockname()[1]
    try:
        async with asyncssh.connect("127.0.0.1", port, username="git", known_hosts=None,
                                    config=None, agent_path=None,
                                    client_keys=None) as client:  # fmt: skip
            chan, _ = await client.create_session(
                asyncssh.SSHClientSession, UPLOAD, encoding=None, window=4096
            )
            chan.pause_reading()  # the client takes none of the output
            for _ in range(100):
                if relay.state is RelayState.RUNNING:
                    break
                await asyncio.sleep(0.01)
            relay.backend_pause_input()  # the command's stdin is full
            relay.backend_stdout(bytes(65536))  # more than the client's window
            chan.write(b"0032want 0123456789012345678901234567890123456789\n")  # held by asyncssh
            await asyncio.sleep(0.1)
            if first == "the client closes":
                chan.close()
                await asyncio.sleep(0.1)
                assert not owner.closed  # asyncssh holds the close behind the client's bytes
            relay.backend_finished(0)
            if first == "the backend ends":
                assert relay.state is RelayState.EXITING  # the exit waits for the output
                chan.close()
            async with asyncio.timeout(2):
                await owner.ended.wait()
    finally:
        listener.close()
    assert owner.closed[0].outcome is Outcome.OK  # the command ended well; the client left


def test_a_backend_whose_abort_fails_still_lets_its_session_close(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The account's session is given back and the session closes: a bug in one backend's
    abort must not hold its account's count for good."""

    def broken() -> None:
        raise RuntimeError("a bug")

    async def body() -> None:
        admission = FakeAdmission(cap=1)
        rig = Rig(website(), admission=admission)
        stream = await rig.running()
        stream.abort = broken  # type: ignore[method-assign]
        rig.relay.connection_lost(None)
        assert admission.sessions.statistics() == {}
        assert rig.owner.closed[0].outcome is Outcome.CLIENT_GONE

    asyncio.run(body())
    assert "failed to abort the backend" in caplog.text


def ended_as_an_internal_error(rig: Rig, stream: FakeStream) -> None:
    """The client was told of an internal error (exit 1), the backend stopped, and the
    command's line says so."""
    line = f"kilnproxy: internal error (session {SESSION})\n".encode()
    assert rig.chan.sent == [("err", line), ("exit", 1)]
    assert stream.calls == [("abort", b"")]
    rig.relay.connection_lost(None)
    assert rig.owner.closed[0].outcome is Outcome.INTERNAL_ERROR


def test_a_write_to_the_client_that_fails_a_pass_later_ends_the_command_as_an_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Backend output is written to the client a pass after it came (coalesced): a bug there
    is outside the backend callback's boundary. The bytes are lost, so the command ends, with
    the internal error line and exit status 1, the backend aborted; the session goes on."""

    async def body() -> None:
        rig = Rig(website())
        stream = await rig.running()
        written = rig.chan.write

        def broken(data: bytes) -> None:
            if data == b"boom":
                raise RuntimeError("a bug")
            written(data)

        rig.chan.write = broken  # type: ignore[method-assign]
        rig.relay.backend_stdout(b"boom")
        await settle()
        ended_as_an_internal_error(rig, stream)

    asyncio.run(body())
    (failure,) = [r for r in caplog.records if r.exc_info]
    assert failure.message.startswith("internal error while relaying")


def test_a_bug_on_what_a_resumed_client_sent_ends_this_session_not_the_backends(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Resuming the client inside the backend's callback makes asyncssh hand over what the
    client sent meanwhile: a bug there ends the command as an internal error, and nothing
    escapes into the backend connection's callback (that would end every session on it)."""

    async def body() -> None:
        rig = Rig(website())
        stream = await rig.running()
        rig.relay.backend_pause_input()

        def broken() -> None:
            raise RuntimeError("a bug")

        rig.chan.resume_reading = broken  # type: ignore[method-assign]
        rig.relay.backend_resume_input()  # raises nothing
        ended_as_an_internal_error(rig, stream)

    asyncio.run(body())
    (failure,) = [r for r in caplog.records if r.exc_info]
    assert failure.message.startswith("internal error while relaying")


class FakeConnection:
    """What a Session asks of asyncssh's connection before any channel has opened."""

    def __init__(self, accepted_at: float | None = None) -> None:
        self.accepted_at = accepted_at

    def get_extra_info(self, name: str) -> object:
        if name == "accepted_at":
            return self.accepted_at
        return ("192.0.2.7", 40000) if name == "peername" else None


@on_a_loop
async def test_the_login_grace_runs_from_the_accept() -> None:
    """SPEC 4: from TCP accept to authenticated; a PROXY header's time counts."""
    host = SessionHost(from_mapping({}, Path("/nonexistent")), Services(
        FakeDirectory(website()), FakeBackends(FakeBackend()), FakeMetrics(), FakeAdmission()
    ))  # fmt: skip
    accepted_at = asyncio.get_running_loop().time() - 4.0
    session = Session(host)
    session.connection_made(cast(asyncssh.SSHServerConnection, FakeConnection(accepted_at)))
    assert session._timers["login_grace"].when() == accepted_at + 30
    session.connection_lost(None)


@on_a_loop
async def test_a_channel_asked_for_as_the_connection_went_leaves_the_connections_line() -> None:
    """A channel the client asked for in the same read as its DISCONNECT (or before asyncssh
    finished opening it) never gets its channel, so never closes: the connection still logs
    its one access line, as one that ran no command, and keeps no relay."""
    ended: list[str] = []

    class CountingMetrics(FakeMetrics):
        def session_ended(self, outcome: str) -> None:
            ended.append(outcome)

    services = Services(FakeDirectory(website()), FakeBackends(FakeBackend()), CountingMetrics(),
                        FakeAdmission())  # fmt: skip
    host = SessionHost(from_mapping({}, Path("/nonexistent")), services)
    session = Session(host)
    session.connection_made(cast(asyncssh.SSHServerConnection, FakeConnection()))
    session.identity = BOB  # authenticated, as asyncssh requires before a channel
    relay = session.session_requested()
    assert isinstance(relay, Relay) and not relay.opened  # asyncssh raised on its channel
    session.connection_lost(None)
    host.close_logs.run_all()
    assert session.relays == set()
    assert ended == ["no-command"]


def test_a_client_past_max_auth_tries_is_hung_up_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """OpenSSH hangs up at MaxAuthTries. asyncssh alone asks about every key a client offers,
    until the login grace: thousands of log lines a second from one unauthenticated client."""
    caplog.set_level(logging.INFO, "kilnproxy")
    looked_up: list[str] = []

    class Counting(FakeDirectory):
        async def identity_for_key(self, fingerprint: str) -> Identity | None:
            looked_up.append(fingerprint)
            return None

    class Quiet(FakeMetrics):
        def session_ended(self, outcome: str) -> None:
            pass

    async def offer(keys: int) -> str:
        services = Services(Counting(None), FakeBackends(FakeBackend()), Quiet(), FakeAdmission())
        host = SessionHost(from_mapping({}, tmp_path), services)
        pairs = [asyncssh.load_keypairs([asyncssh.generate_private_key("ssh-ed25519")])[0]]
        options = await asyncssh.SSHServerConnectionOptions.construct(
            server.server_options(host.config, pairs), server_factory=lambda: Session(host)
        )
        loop = asyncio.get_running_loop()
        listener = await loop.create_server(
            lambda: server._Connection(loop, options), "127.0.0.1", 0
        )
        offered = [asyncssh.generate_private_key("ssh-ed25519") for _ in range(keys)]
        try:
            with pytest.raises(asyncssh.DisconnectError) as hung_up:
                await asyncssh.connect(
                    "127.0.0.1", listener.sockets[0].getsockname()[1], username="git",
                    known_hosts=None, config=None, agent_path=None, client_keys=offered,
                )  # fmt: skip
            return hung_up.value.reason
        finally:
            listener.close()

    assert uvloop.run(offer(40)) == "Too many authentication failures"
    assert len(looked_up) == 6  # max_auth_tries
    told = [m for m in caplog.messages if "too many keys offered" in m]
    assert len(told) == 1, caplog.messages


def test_what_a_client_sent_is_quoted_short_in_the_log(caplog: pytest.LogCaptureFixture) -> None:
    """An exec request or a subsystem's name is as long as an SSH packet (256 KiB), and each
    byte that is not UTF-8 is six characters quoted: a line of the log quotes 200 of them."""
    caplog.set_level(logging.INFO, "kilnproxy")
    line = "git-upload-pack '" + "\udcff" * 250_000

    async def body() -> None:
        rig = Rig(website())
        assert not rig.relay.subsystem_requested("sftp" * 60_000)
        rig.start(line)
        await settle()
        assert rig.chan.sent[-1] == ("exit", 128)
        assert len(asyncio.all_tasks()) == 1  # this one: the opening has ended
        rig.relay.connection_lost(None)

    asyncio.run(body())
    subsystem, command = caplog.messages
    assert subsystem.startswith("refused subsystem 'sftpsftp") and len(subsystem) < 300
    assert subsystem.endswith("... (240000 characters)")
    assert command.startswith("bad command \"git-upload-pack '\\udcff") and len(command) < 1300
    assert command.endswith("... (250017 characters): command too long")


def test_a_bug_on_what_the_client_sent_before_the_backend_was_up_ends_this_command(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """hg says hello before the backend is up: the relay holds it, and passes it on once the
    backend is. A bug there ends the command as an internal error, with its session's id in
    the log, not as a task's exception nobody retrieves, the command left running."""

    async def body() -> None:
        rig = await hello_before_the_backend()

        def broken(data: bytes) -> None:
            raise RuntimeError("a bug")

        stream = rig.backend.stream
        stream.write = broken  # type: ignore[method-assign]
        rig.backend.up.set()
        await settle()
        ended_as_an_internal_error(rig, stream)

    asyncio.run(body())
    (failure,) = [r for r in caplog.records if r.exc_info]
    assert failure.message.startswith("internal error while relaying")
    assert failure.session == SESSION  # type: ignore[attr-defined]


class Heard(asyncssh.SSHClientSession[bytes]):
    """What a client is sent on its channel, in order."""

    def __init__(self) -> None:
        self.heard: list[tuple[str, object]] = []

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        kind = "err" if datatype == asyncssh.EXTENDED_DATA_STDERR else "out"
        if self.heard and self.heard[-1][0] == kind:
            data = cast(bytes, self.heard.pop()[1]) + data
        self.heard.append((kind, data))

    def exit_status_received(self, status: int) -> None:
        self.heard.append(("exit", status))


@contextlib.asynccontextmanager
async def kilnproxy_channel(relay: Relay) -> AsyncIterator[tuple[Any, Heard]]:
    """A client's channel to `relay` through kilnproxy's own connection and channel classes
    (`ssh.server`), with a window of 4 KiB, reading nothing until the test says so."""

    class Server(asyncssh.SSHServer):
        def begin_auth(self, username: str) -> bool:
            return False  # no authentication: the relay is what is tested

        def session_requested(self) -> Relay:
            return relay

    loop = asyncio.get_running_loop()
    keys = [asyncssh.load_keypairs([asyncssh.generate_private_key("ssh-ed25519")])[0]]
    options = await asyncssh.SSHServerConnectionOptions.construct(
        server.server_options(from_mapping({}, Path("/nonexistent")), keys),
        server_factory=Server,
    )
    listener = await loop.create_server(lambda: server._Connection(loop, options), "127.0.0.1", 0)
    try:
        async with asyncssh.connect(
            "127.0.0.1", listener.sockets[0].getsockname()[1], username="git",
            known_hosts=None, config=None, agent_path=None, client_keys=None,
        ) as client:  # fmt: skip
            chan, session = await client.create_session(Heard, UPLOAD, encoding=None, window=4096)
            chan.pause_reading()
            for _ in range(200):
                if relay.state is RelayState.RUNNING:
                    break
                await asyncio.sleep(0.01)
            assert relay.state is RelayState.RUNNING
            yield chan, cast(Heard, session)
    finally:
        listener.close()


@on_a_loop
async def test_a_client_that_closes_its_channel_with_both_ways_full_ends_its_session() -> None:
    """The client's window is full (the command's output paused) and the command's stdin too
    (the client's last bytes held): a close must end the session now, not at the idle timeout.
    asyncssh ends a channel only once it has passed on what the client sent before closing
    it, and the command, its output paused, would never read that."""
    owner = EndingOwner()
    backend = FakeBackend()
    relay = Relay(owner, Services(FakeDirectory(website()), FakeBackends(backend),
                                  FakeMetrics(), FakeAdmission()))  # fmt: skip
    async with kilnproxy_channel(relay) as (chan, _):
        relay.backend_pause_input()  # the command's stdin is full
        for _ in range(3):  # far past the client's window, and asyncssh's buffer's high mark
            relay.backend_stdout(bytes(65536))
            await settle()
        assert backend.stream.output_paused
        chan.write(b"0032want 0123456789012345678901234567890123456789\n")  # held by asyncssh
        await asyncio.sleep(0.1)
        chan.close()
        async with asyncio.timeout(2):
            await owner.ended.wait()
    assert owner.closed[0].outcome is Outcome.CLIENT_GONE
    assert backend.stream.calls == [("abort", b"")]


@on_a_loop
async def test_a_cut_sends_its_line_after_what_the_client_has_yet_to_take_then_the_status() -> None:
    """SPEC 3: a cut is a line saying why, then exit status 1. asyncssh sends an exit status
    at once, ahead of what waits in its buffer for a client that is behind: a client that
    stops at the status would miss the line."""
    owner = EndingOwner()
    relay = Relay(owner, Services(FakeDirectory(website()), FakeBackends(FakeBackend()),
                                  FakeMetrics(), FakeAdmission()))  # fmt: skip
    async with kilnproxy_channel(relay) as (chan, client):
        relay.backend_stdout(bytes(65536))
        await settle()
        relay.cut(CutReason.ADMIN)
        await asyncio.sleep(0.1)
        chan.resume_reading()
        async with asyncio.timeout(2):
            await owner.ended.wait()
    line = CutReason.ADMIN.client_line(SESSION).encode()
    assert client.heard == [("out", bytes(65536)), ("err", line), ("exit", 1)]
