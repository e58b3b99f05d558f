"""A relay that raises on what a pooled backend delivers ends its own session, not the pooled
connection it shares with other sessions: the ssh:// stream's boundary (the agent's is in
test_agent_connection.py), and the agent's own, where a request it did not foresee fails."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import cast

import asyncssh
import pytest
from harness import loop_ticks
from sinks import RecordingSink

from kilnproxy.agent.channel import Channel
from kilnproxy.agent.connection import ProxyConnection
from kilnproxy.agent.paths import PathChecks
from kilnproxy.backends import local
from kilnproxy.backends.base import BackendRequest
from kilnproxy.backends.frames import Kind, OpenRequest, count_frame, frame
from kilnproxy.backends.pool import Link, LinkState, Pool
from kilnproxy.backends.ssh import (
    SshBackend,
    SshLink,
    SshStream,
    Target,
    signal_number,
    ssh_pool,
)
from kilnproxy.backends.threads import DiskChecks
from kilnproxy.directory.model import Identity, Route
from kilnproxy.errors import BackendError
from kilnproxy.policy.access import Access, Role
from kilnproxy.policy.commands import Verb


class FakeChannel:
    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


class Connection:
    def close(self) -> None: ...


async def _connect(link: Link[Connection]) -> Connection:
    return Connection()


def test_a_relay_failing_on_ssh_output_ends_its_session_only(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def body() -> None:
        pool = Pool("storage", ("127.0.0.1", 22), _connect, 8, 60.0, 2.0)
        link = await pool.acquire("aviato/website")
        sink = RecordingSink(broken=True)
        # The stream needs only its link's pool: no SSH connection is made here.
        ssh_link = cast(SshLink, link)
        stream = SshStream(sink, ssh_link, "3f9c2a1b", "aviato/website", "/srv/a.git")
        chan = FakeChannel()
        stream.connection_made(chan)  # type: ignore[arg-type]
        stream.data_received(b"fatal: bad line\n", asyncssh.EXTENDED_DATA_STDERR)
        assert (chan.closed, sink.ended, link.active) == (True, ["internal error"], 0)
        stream.data_received(b"more", None)
        assert (sink.stdout, sink.ended) == (b"", ["internal error"])  # nothing more reached it
        await pool.close()

    asyncio.run(body())
    (failure,) = caplog.records
    assert failure.message == "backend storage: failed on its output"
    assert (failure.session, failure.exc_info is not None) == ("3f9c2a1b", True)  # type: ignore[attr-defined]


class Wire:
    write_paused = False

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.forgotten: list[int] = []

    def send(self, data: bytes) -> None:
        self.sent.append(data)

    def forget(self, channel: int) -> None:
        self.forgotten.append(channel)


def test_an_agent_channel_that_fails_to_start_is_refused_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A failure the agent did not foresee (here, starting the command) is still an answer to
    the proxy, at once: REFUSED, not a wait for the proxy's dial timeout."""

    async def broken(*args: object) -> local.LocalStream:
        raise RuntimeError("a bug")

    monkeypatch.setattr("kilnproxy.agent.channel.start_command", broken)
    (tmp_path / "a.git").mkdir()
    request = OpenRequest("3f9c2a1b", "aviato/website", "git-upload-pack",
                          str(tmp_path / "a.git"), {}, 65536)  # fmt: skip
    wire = Wire()
    caplog.set_level(logging.INFO)
    asyncio.run(Channel(wire, 1, request, 65536).start(tmp_path, tmp_path / "hg.rc"))
    assert wire.sent == [frame(Kind.REFUSED, 1, b"internal error")]
    assert wire.forgotten == [1]
    (failure,) = [r for r in caplog.records if r.message.startswith("cannot start")]
    assert failure.session == "3f9c2a1b"  # type: ignore[attr-defined]
    assert "RuntimeError: a bug" in caplog.text


def test_a_path_check_on_a_disk_that_does_not_answer_holds_only_its_own_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent's path check reads the disk in a thread: a repository on a hung mount is
    refused after its time, the agent's loop (every other session) running meanwhile; with as
    many checks stuck as it allows, the next is refused at once; and the agent's exit does not
    wait for a check the disk never answers."""
    stuck = threading.Event()

    def hung(base: Path, requested: str) -> Path:
        stuck.wait(10)  # a stat on a mount that does not answer
        return base / "a.git"

    monkeypatch.setattr("kilnproxy.agent.paths.confine", hung)
    monkeypatch.setattr("kilnproxy.agent.channel.CHECKS", PathChecks(within=0.3, stuck=1))
    request = OpenRequest("3f9c2a1b", "aviato/website", "git-upload-pack",
                          str(tmp_path / "a.git"), {}, 65536)  # fmt: skip
    first, second = Wire(), Wire()

    async def body() -> int:
        async with loop_ticks() as ticks:
            await Channel(first, 1, request, 65536).start(tmp_path, tmp_path / "hg.rc")
            await Channel(second, 2, request, 65536).start(tmp_path, tmp_path / "hg.rc")
        return ticks[0]

    started = time.monotonic()
    try:
        assert asyncio.run(body()) >= 10  # 0.3 s of a loop that was never held
        assert time.monotonic() - started < 5  # not joined at exit: it waits 10 s
    finally:
        stuck.set()
    path = str(tmp_path / "a.git")
    answer = f"path {path!r}: the disk did not answer within 0.3s".encode()
    assert first.sent == [frame(Kind.REFUSED, 1, answer)]
    answer = f"path {path!r}: 1 check(s) still wait on the disk".encode()
    assert second.sent == [frame(Kind.REFUSED, 2, answer)]


def test_checks_that_the_disk_answers_are_never_refused_however_many() -> None:
    """Only the checks left behind count against `stuck`: a burst of clones on a disk that
    answers is not refused, one whose caller went while its thread ran is counted until the
    thread ends."""
    checks = DiskChecks(within=5, stuck=2)
    release = threading.Event()

    async def burst() -> tuple[list[str], int, int]:
        answers = await asyncio.gather(*(checks.run(functools.partial(str, n)) for n in range(20)))
        held = asyncio.ensure_future(checks.run(functools.partial(release.wait, 10)))
        await asyncio.sleep(0.1)
        held.cancel()  # its session went while the disk was read
        with contextlib.suppress(asyncio.CancelledError):
            await held
        left = checks.left
        release.set()
        for _ in range(100):
            if checks.left == 0:
                break
            await asyncio.sleep(0.01)
        return answers, left, checks.left

    assert asyncio.run(burst()) == ([str(n) for n in range(20)], 1, 0)


class Host:
    base = Path("/srv")
    hook_rc = Path("/srv/hg.rc")
    window = 65536
    draining = False

    def refusal(self, channel: Channel) -> str | None:
        return None

    def start(self, channel: Channel) -> None: ...

    def gone(self, conn: ProxyConnection) -> None: ...


class Transport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.aborted = False

    def get_extra_info(self, name: str) -> None:
        return None

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def is_closing(self) -> bool:
        return self.aborted

    def abort(self) -> None:
        self.aborted = True

    def get_write_buffer_size(self) -> int:
        return 0  # the proxy takes what is written at once


class BrokenStdin:
    aborted = False

    def write(self, data: bytes) -> None:
        raise RuntimeError("a bug")

    def abort(self) -> None:
        self.aborted = True


def test_an_agent_channel_that_fails_on_a_frame_ends_that_command_only(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A failure on one channel's frame (here, passing stdin on) ends that command, with the
    internal error line and exit status 1 for its client: the connection and its other channels
    go on."""
    conn = ProxyConnection(Host(), "10.0.0.2:50000")
    transport = Transport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    request = OpenRequest("3f9c2a1b", "aviato/website", "git-receive-pack", "/srv/a.git", {}, 1)
    broken, other = Channel(conn, 1, request, 65536), Channel(conn, 2, request, 65536)
    stream = BrokenStdin()
    broken.stream = stream  # type: ignore[assignment]
    conn.channels.update({1: broken, 2: other})
    data = frame(Kind.STDIN, 1, b"0000")
    conn.get_buffer(-1)[: len(data)] = data
    conn.buffer_updated(len(data))
    line = b"kilnproxy: internal error (session 3f9c2a1b)\n"
    assert transport.written == [frame(Kind.STDERR, 1, line), count_frame(Kind.EXIT, 1, 1)]
    assert (stream.aborted, list(conn.channels), transport.aborted) == (True, [2], False)
    (failure,) = [r for r in caplog.records if r.exc_info]
    assert failure.message == "failed on a STDIN frame (repo aviato/website)"
    assert failure.session == "3f9c2a1b"  # type: ignore[attr-defined]


def test_a_command_the_agent_cuts_tells_its_client_why() -> None:
    """What the command wrote goes first, then the line and exit status 1; a command still
    starting (no CREDIT sent) is refused as for a drain, which the proxy opens elsewhere."""
    request = OpenRequest("3f9c2a1b", "aviato/website", "git-upload-pack", "/srv/a.git", {}, 1)
    wire = Wire()
    running = Channel(wire, 1, request, 65536)
    stream = BrokenStdin()
    running.stream = stream  # type: ignore[assignment]
    running._gathered, running._gathered_size = [b"PACK"], 4
    running.cut("storage server is shutting down")
    line = b"kilnproxy: storage server is shutting down (session 3f9c2a1b)\n"
    assert wire.sent == [frame(Kind.STDOUT, 1, b"PACK"), frame(Kind.STDERR, 1, line),
                         count_frame(Kind.EXIT, 1, 1)]  # fmt: skip
    assert (stream.aborted, wire.forgotten) == (True, [1])
    running.cut("again")  # nothing more: the channel has ended
    starting = Channel(wire, 2, request, 65536)
    wire.sent.clear()
    starting.cut("storage server is shutting down")
    assert wire.sent == [frame(Kind.DRAINING, 2)]
    assert wire.forgotten == [1, 2]


def test_a_dial_that_raises_what_no_one_foresaw_fails_that_dial_only(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A dial that raises something other than a connection error (a bug, a library's
    ValueError) used to leave its link dialling for good, and every later session of the
    backend waited on it until its idle cut."""
    attempts: list[int] = []

    async def connect(link: Link[Connection]) -> Connection:
        attempts.append(1)
        if len(attempts) <= 2:
            raise ValueError("unexpected")
        return Connection()

    async def body() -> None:
        pool = Pool("storage", ("127.0.0.1", 22), connect, 8, 60.0, 2.0)
        async with asyncio.timeout(1.0):
            for _ in range(2):
                with pytest.raises(BackendError, match="ValueError: unexpected"):
                    await pool.acquire("aviato/website")
                assert pool.links == []
            link = await pool.acquire("aviato/website")  # the next session dials again
        assert (link.state, len(attempts)) == (LinkState.OPEN, 3)
        await pool.close()

    asyncio.run(body())
    first, second = [r for r in caplog.records if "cannot connect" in r.message]
    assert first.message == "backend storage: cannot connect to 127.0.0.1:22"
    assert first.exc_info is not None  # a traceback, once a minute: each session dials again
    assert second.message == f"{first.message}: ValueError: unexpected"
    assert second.exc_info is None


def test_a_malformed_backend_key_fails_the_dial_with_its_reason(tmp_path: Path) -> None:
    key = tmp_path / "backend_id_ed25519"
    key.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nnot a key\n")
    target = Target("storage", "127.0.0.1", 9, "git", key, tmp_path / "known_hosts")

    async def body() -> None:
        pool = ssh_pool(target, 8, 60.0, 2.0)
        async with asyncio.timeout(3.0):
            with pytest.raises(BackendError, match=r"cannot load \[backend_ssh\] key .*"):
                await pool.acquire("aviato/website")
        assert pool.links == []

    asyncio.run(body())


class _Held(asyncssh.SSHServerSession[bytes]):
    """A storage server's session: it runs nothing, and says when its channel closes."""

    def __init__(self) -> None:
        self.lost = asyncio.Event()

    def exec_requested(self, command: str) -> bool:
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set()


class Storage(asyncssh.SSHServer):
    """A storage server's sshd that lets anyone in; `session` says what a channel gets, given
    the number of the channel on this connection (1, 2, ...)."""

    def __init__(self, session: Callable[[int], Awaitable[_Held] | bool]) -> None:
        self.session = session  # for this connection
        self.channels = itertools.count(1)

    def begin_auth(self, username: str) -> bool:
        return True

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        return True

    def session_requested(self) -> Awaitable[_Held] | bool:
        answer: Awaitable[_Held] | bool = self.session(next(self.channels))
        return answer


async def storage_server(
    tmp_path: Path, session: Callable[[int, int], Awaitable[_Held] | bool]
) -> tuple[asyncssh.SSHAcceptor, SshBackend]:
    """A storage server on 127.0.0.1, and a backend for it (dial timeout 2 s). `session` is
    given the number of the connection a channel is asked on, and of the channel on it."""
    numbers = itertools.count(1)
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    client_key = asyncssh.generate_private_key("ssh-ed25519")
    client_key.write_private_key(tmp_path / "id_ed25519")

    def storage() -> Storage:
        return Storage(functools.partial(session, next(numbers)))

    acceptor = await asyncssh.listen("127.0.0.1", 0, server_host_keys=[host_key],
                                     server_factory=storage)  # fmt: skip
    port = acceptor.sockets[0].getsockname()[1]
    public = host_key.export_public_key().decode().split()
    (tmp_path / "known_hosts").write_text(f"[127.0.0.1]:{port} {public[0]} {public[1]}\n")
    target = Target("storage", "127.0.0.1", port, "git", tmp_path / "id_ed25519",
                    tmp_path / "known_hosts")  # fmt: skip
    return acceptor, SshBackend("storage", ssh_pool(target, 8, 60.0, 2.0), 1 << 20)


def test_a_channel_confirmed_after_its_open_was_given_up_is_closed(tmp_path: Path) -> None:
    """The storage server confirms a channel after the dial timeout (or after the client left):
    asyncssh would leave it open at both ends, one of sshd's MaxSessions held on a pooled
    connection that the pool counts as free. It is closed as soon as it is open. Nothing else
    came on that connection meanwhile: new sessions go to another."""

    async def body() -> None:
        gate, session = asyncio.Event(), _Held()

        async def confirmed_late(connection: int, channel: int) -> _Held:
            await gate.wait()
            return session

        acceptor, backend = await storage_server(tmp_path, confirmed_late)
        with pytest.raises(BackendError, match=r"no channel within 2s"):
            await backend.open(ssh_request(), RecordingSink())
        (link,) = backend.pool.links
        assert link.active == 1  # the channel is still being opened: sshd counts it
        assert link.state is LinkState.DRAINING  # not handed out again
        gate.set()
        async with asyncio.timeout(5):
            await session.lost.wait()
        for _ in range(500):  # the client's end of the channel closes a moment later
            if not link.active:
                break
            await asyncio.sleep(0.01)
        assert link.active == 0
        await backend.close()
        acceptor.close()
        await acceptor.wait_closed()

    asyncio.run(body())


def confirmed() -> Awaitable[_Held]:
    async def session() -> _Held:
        return _Held()

    return session()


def test_a_channel_refused_is_opened_on_another_connection(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """sshd at its MaxSessions refuses a channel: it counts one closed here for as long as its
    command runs there (a hook, a lock waited for). That connection, which the pool counts as
    having room, is retired, and the channel is opened on another: every later session would
    otherwise be refused there."""

    def session(connection: int, channel: int) -> Awaitable[_Held] | bool:
        if connection == 1 and channel > 1:  # one session, still running after its close
            return False
        return confirmed()

    async def body() -> None:
        acceptor, backend = await storage_server(tmp_path, session)
        served = await backend.open(ssh_request(), RecordingSink())
        (first,) = backend.pool.links
        served.abort()
        stream = await backend.open(ssh_request(), RecordingSink())
        assert backend.pool.dials == 2 and backend.pool.links != [first]
        assert first.state is LinkState.CLOSED  # retired, and closed once its channel went
        stream.abort()
        await backend.close()
        acceptor.close()
        await acceptor.wait_closed()

    with caplog.at_level(logging.INFO, logger="kilnproxy.backend"):
        asyncio.run(body())
    said = [r.getMessage() for r in caplog.records]
    assert any(
        m.startswith("backend storage: the storage refused a channel (")
        and m.endswith(": new sessions go to another connection")
        for m in said
    ), said
    retry = next(r for r in caplog.records if "on another connection" in r.getMessage())
    assert retry.session == "3f9c2a1b"  # type: ignore[attr-defined]


def test_a_storage_that_refuses_every_channel_costs_no_handshakes(tmp_path: Path) -> None:
    """sshd that refuses sessions on a connection that never started one (overloaded, or
    misconfigured) would on another too: the session fails, and the connection stays."""

    async def body() -> None:
        acceptor, backend = await storage_server(tmp_path, lambda connection, channel: False)
        for _ in range(3):
            with pytest.raises(BackendError, match=r"the storage refused a channel"):
                await backend.open(ssh_request(), RecordingSink())
        (link,) = backend.pool.links
        assert backend.pool.dials == 1 and link.state is LinkState.OPEN
        await backend.close()
        acceptor.close()
        await acceptor.wait_closed()

    asyncio.run(body())


def ssh_request() -> BackendRequest:
    route = Route("aviato/website", Verb.UPLOAD_PACK.vcs, "storage", "ssh://git@127.0.0.1/srv",
                  "/srv/aviato/website.git", Access.READ)  # fmt: skip
    identity = Identity("aviato", "bob", Role.READ, "laptop", "SHA256:x")
    return BackendRequest("3f9c2a1b", Verb.UPLOAD_PACK, route, identity, None)


def test_an_exit_signal_is_a_shells_status() -> None:
    """128 + the signal's number, as a shell gives it, for any signal the system knows."""
    assert [signal_number(name) for name in ("TERM", "KILL", "USR1", "ALRM", "NOPE")] == [
        15, 9, 10, 14, 0,
    ]  # fmt: skip
