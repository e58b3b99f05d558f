"""The proxy's side of an agent connection, driven in one process: a scripted agent speaks the
frames over a socketpair, so what a real agent cannot be made to do on cue is played out every
time. An agent's drain: the proxy's OPEN reaches the agent after it began draining, before the
proxy heard so (the same drain end to end, with real agents, is in
tests/integration/test_agent.py). One session whose relay fails on a frame, beside another on
the same connection; a refusal that comes after the open was given up; a dial that times out
after its TLS handshake; a connection whose sessions all left while it was dialled.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from pathlib import Path
from typing import Any, cast

import pytest
from agent import Pki, read_frames
from sinks import RecordingSink

from kilnproxy.agent.connection import ProxyConnection
from kilnproxy.agent.server import _Handshake, server_context
from kilnproxy.backends.agent import (
    OUTPUT_OVERSHOOT,
    AgentBackend,
    AgentConnection,
    AgentLink,
    AgentPool,
    AgentStream,
    agent_pool,
    client_context,
)
from kilnproxy.backends.base import BackendRequest
from kilnproxy.backends.frames import (
    CONTROL,
    MAX_PAYLOAD,
    FrameReader,
    Kind,
    OpenRequest,
    count_frame,
    frame,
)
from kilnproxy.backends.pool import Draining, Link, LinkState, Pool
from kilnproxy.backends.wire import FlowSwitch
from kilnproxy.directory.model import Identity, Route
from kilnproxy.errors import BackendError
from kilnproxy.policy.access import Access, Role
from kilnproxy.policy.commands import Verb

WINDOW = 65536


class ScriptedAgent(asyncio.Protocol):
    """An agent's end of one connection: PONG to PING; an OPEN is started (CREDIT), or, once
    `draining`, refused as a draining agent refuses it: DRAINING on the connection, then on
    the channel. `closes`: the agent began draining as the OPEN was on its way, and closed the
    connection, which ran nothing, before it read the OPEN. `silent`: an OPEN gets no answer."""

    def __init__(
        self, draining: bool, exits: bool = False, closes: bool = False, silent: bool = False
    ) -> None:
        self.draining = draining
        self.exits = exits  # an OPEN is answered with EXIT 1 and no CREDIT
        self.closes = closes
        self.silent = silent
        self.opened: list[OpenRequest] = []
        self.closed: list[int] = []  # channels the proxy sent CLOSE for
        self.transport: asyncio.Transport | None = None
        self._reader = FrameReader()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        for each in read_frames(self._reader, data):
            if each.kind is Kind.PING:
                self.transport.write(frame(Kind.PONG, CONTROL))
            elif each.kind is Kind.OPEN:
                self.opened.append(OpenRequest.decode(each.payload))
                if self.silent:
                    continue
                if self.draining and self.closes:
                    self.transport.write(frame(Kind.DRAINING, CONTROL))
                    self.transport.close()
                    return
                if self.draining:
                    answer = frame(Kind.DRAINING, CONTROL) + frame(Kind.DRAINING, each.channel)
                elif self.exits:
                    answer = count_frame(Kind.EXIT, each.channel, 1)
                else:
                    answer = count_frame(Kind.CREDIT, each.channel, WINDOW)
                self.transport.write(answer)
            elif each.kind is Kind.CLOSE:
                self.closed.append(each.channel)

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)


class Storage:
    """Dials scripted agents: the first `draining` of them drain (and close, with `closes`),
    the first `silent` answer no OPEN; the next ones serve."""

    def __init__(
        self, draining: int, exits: bool = False, closes: bool = False, silent: int = 0
    ) -> None:
        self.draining = draining
        self.exits = exits
        self.closes = closes
        self.silent = silent
        self.agents: list[ScriptedAgent] = []

    async def connect(self, link: AgentLink) -> AgentConnection:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        dialled = len(self.agents)
        agent = ScriptedAgent(draining=dialled < self.draining, exits=self.exits,
                              closes=self.closes, silent=dialled < self.silent)  # fmt: skip
        self.agents.append(agent)
        await loop.create_connection(lambda: agent, sock=theirs)
        _, conn = await loop.create_connection(lambda: AgentConnection(link, 30.0), sock=ours)
        await conn.answered
        return conn

    def pool(self, dial_timeout: float = 2.0) -> AgentPool:
        return Pool("agent1", ("127.0.0.1", 9422), self.connect, 16, 60.0, dial_timeout,
                    heard=lambda conn: conn.received)  # fmt: skip


def request() -> BackendRequest:
    route = Route("aviato/website", Verb.UPLOAD_PACK.vcs, "agent1", "agent://127.0.0.1:9422/srv",
                  "/srv/aviato/website.git", Access.READ)  # fmt: skip
    identity = Identity("aviato", "bob", Role.READ, "laptop", "SHA256:x")
    return BackendRequest("3f9c2a1b", Verb.UPLOAD_PACK, route, identity, None)


def test_a_session_refused_for_the_drain_is_opened_once_more_on_a_new_connection() -> None:
    async def body() -> None:
        storage = Storage(draining=1)
        backend = AgentBackend("agent1", storage.pool(), WINDOW)
        stream = await backend.open(request(), RecordingSink())
        first, second = storage.agents
        assert (
            [r.session for r in first.opened] == [r.session for r in second.opened] == ["3f9c2a1b"]
        )
        assert backend.pool.dials == 2
        # The refused connection ran nothing more: the pool closed it, and keeps the new one.
        assert [link.state for link in backend.pool.links] == [LinkState.OPEN]
        await asyncio.sleep(0.01)
        assert first.transport is not None and first.transport.is_closing()
        stream.abort()
        await backend.close()

    asyncio.run(body())


def test_a_second_refusal_for_the_drain_is_final() -> None:
    async def body() -> None:
        storage = Storage(draining=2)
        backend = AgentBackend("agent1", storage.pool(), WINDOW)
        with pytest.raises(BackendError) as refused:
            await backend.open(request(), RecordingSink())
        assert refused.value.detail == "agent refused: it drains"
        assert backend.pool.dials == 2  # retried once, not more
        await backend.close()

    asyncio.run(body())


def test_a_session_whose_connection_the_draining_agent_closed_is_opened_on_a_new_one() -> None:
    """The agent began its drain as the OPEN was on its way: it said DRAINING and closed the
    connection, which ran nothing, without an answer for the OPEN. The session never started
    there, and goes to the agent that replaces it."""

    async def body() -> None:
        storage = Storage(draining=1, closes=True)
        backend = AgentBackend("agent1", storage.pool(), WINDOW)
        link = await backend.pool.acquire("aviato/website")
        backend.pool.release(link)  # an idle pooled connection, as after an earlier session
        stream = await backend.open(request(), RecordingSink())
        first, second = storage.agents
        assert len(first.opened) == len(second.opened) == 1
        assert backend.pool.dials == 2
        assert [each.state for each in backend.pool.links] == [LinkState.OPEN]
        stream.abort()
        await backend.close()

    asyncio.run(body())


def test_a_connection_on_which_no_channel_opens_in_time_is_handed_out_no_more() -> None:
    """A peer that stopped answering on a pooled connection (a frozen host, a firewall that
    forgot the flow): the session waits out the dial timeout there, but the next one dials
    anew rather than wait there too until the keepalive gives the connection up."""

    async def body() -> None:
        storage = Storage(draining=0, silent=1)
        backend = AgentBackend("agent1", storage.pool(dial_timeout=0.2), WINDOW)
        with pytest.raises(BackendError) as late:
            await backend.open(request(), RecordingSink())
        assert late.value.detail == "backend agent1: no channel within 0.2s"
        stream = await backend.open(request(), RecordingSink())
        assert backend.pool.dials == 2 and len(storage.agents[1].opened) == 1
        await asyncio.sleep(0.01)
        silent = storage.agents[0].transport
        assert silent is not None and silent.is_closing()  # it ran nothing more: closed
        # A connection that is only slow to start one command, while the rest of what it
        # carries flows (here a PONG): the session gives up, the connection stays.
        storage.agents[1].silent = True
        opening = asyncio.create_task(backend.open(request(), RecordingSink()))
        await asyncio.sleep(0.1)
        storage.agents[1].send(frame(Kind.PONG, CONTROL))
        with pytest.raises(BackendError, match=r"no channel within 0\.2s"):
            await opening
        assert backend.pool.dials == 2
        assert [link.state for link in backend.pool.links] == [LinkState.OPEN]
        stream.abort()
        await backend.close()

    asyncio.run(body())


def test_a_draining_connection_is_handed_out_no_more_and_closes_after_its_last_channel() -> None:
    async def body() -> None:
        storage = Storage(draining=0)
        pool = storage.pool()
        running = await pool.acquire("aviato/website")
        assert await pool.acquire("aviato/website") is running  # room for 16
        pool.release(running)
        agent = storage.agents[0]
        assert agent.transport is not None
        agent.transport.write(frame(Kind.DRAINING, CONTROL))
        await asyncio.sleep(0.01)
        assert (running.state, running in pool.links) == (LinkState.DRAINING, True)
        fresh = await pool.acquire("aviato/website")
        assert fresh is not running and pool.dials == 2
        pool.release(running)  # its last channel ended
        assert (running.state, running in pool.links) == (LinkState.CLOSED, False)
        await asyncio.sleep(0.01)
        assert agent.transport.is_closing()
        pool.release(fresh)
        await pool.close()

    asyncio.run(body())


def test_a_flow_switch_tells_each_change_once() -> None:
    told: list[str] = []
    switch = FlowSwitch()
    for full in (False, True, True, False, False, True):
        switch.turn(full, lambda: told.append("pause"), lambda: told.append("resume"))
    assert told == ["pause", "resume", "pause"]
    assert switch.paused


def test_one_sessions_failure_ends_that_session_only(caplog: pytest.LogCaptureFixture) -> None:
    """A relay that raises on a frame (as one did writing stderr to a channel its client had
    closed) must not take the shared connection, and every other session on it, down."""

    async def body() -> None:
        storage = Storage(draining=0)
        backend = AgentBackend("agent1", storage.pool(), WINDOW)
        broken, whole = RecordingSink(broken=True), RecordingSink()
        first = cast(AgentStream, await backend.open(request(), broken))
        second = cast(AgentStream, await backend.open(request(), whole))
        (agent,) = storage.agents
        agent.send(frame(Kind.STDERR, first.channel, b"fatal: protocol error\n"))
        agent.send(frame(Kind.STDOUT, second.channel, b"pack"))
        await asyncio.sleep(0.01)
        assert agent.closed == [first.channel]  # its command is stopped
        assert broken.ended == ["internal error"]
        assert (whole.stdout, whole.ended) == (b"pack", [])
        assert agent.transport is not None and not agent.transport.is_closing()
        agent.send(count_frame(Kind.EXIT, second.channel, 0))
        await asyncio.sleep(0.01)
        assert whole.ended == ["exit 0"]
        assert [link.active for link in backend.pool.links] == [0]
        await backend.close()

    asyncio.run(body())
    (failure,) = [r for r in caplog.records if r.message.startswith("backend agent1: failed")]
    assert failure.message == "backend agent1: failed on channel 1"
    assert (failure.session, failure.exc_info is not None) == ("3f9c2a1b", True)  # type: ignore[attr-defined]


def test_a_refusal_after_the_open_was_given_up_ends_the_channel_quietly() -> None:
    """The client left (the open's wait cancelled) just before the agent's REFUSED or
    DRAINING came: the channel ends, and the connection is not taken for broken."""

    async def body() -> None:
        storage = Storage(draining=0)
        pool = storage.pool()
        for kind in (Kind.REFUSED, Kind.DRAINING):
            link = await pool.acquire("aviato/website")
            stream = AgentStream(RecordingSink(), link, "3f9c2a1b", "aviato/website", WINDOW)
            stream.started.cancel()
            (agent,) = storage.agents
            agent.send(frame(kind, stream.channel, b"no such repository"))
            await asyncio.sleep(0.01)
            assert stream.channel not in stream.conn.channels
            assert link.active == 0
            stream.abort()  # what open_channel does next: the agent has nothing to close
            await asyncio.sleep(0.01)
            assert agent.closed == []
            # A refusal leaves the connection to the other sessions; a drain closes it.
            assert agent.transport is not None
            assert agent.transport.is_closing() is (kind is Kind.DRAINING)
        await pool.close()

    asyncio.run(body())


def test_a_dial_that_times_out_after_its_handshake_closes_its_connection(tmp_path: Path) -> None:
    """An agent that completes TLS but never answers the first PING: the dial fails on its
    timeout, and the connection it made is closed, not left to the keepalive for ever."""

    async def body() -> None:
        pki = Pki(tmp_path)
        cert, key = pki.issue("agent", "127.0.0.1")
        proxy_cert, proxy_key = pki.issue("proxy", "proxy")
        lost = asyncio.Event()

        class Silent(asyncio.Protocol):
            def connection_lost(self, exc: Exception | None) -> None:
                lost.set()

        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            Silent, "127.0.0.1", 0, ssl=server_context(pki.ca, cert, key)
        )
        port = server.sockets[0].getsockname()[1]
        pool = agent_pool("agent1", ("127.0.0.1", port),
                          lambda: client_context(pki.ca, proxy_cert, proxy_key),
                          (16, 60.0, 30.0), 0.5)  # fmt: skip
        with pytest.raises(BackendError, match="TimeoutError"):
            await pool.acquire("aviato/website")
        async with asyncio.timeout(5):
            await lost.wait()
        assert pool.links == []
        server.close()

    asyncio.run(body())


def dialled_when_set(idle: float) -> tuple[Pool[Closed], asyncio.Event, Closed]:
    """A pool whose dial of its one connection ends when the event is set."""
    dialled = asyncio.Event()
    conn = Closed()

    async def connect(link: Link[Closed]) -> Closed:
        await dialled.wait()
        return conn

    return Pool("agent1", ("127.0.0.1", 9422), connect, 16, idle, 2.0), dialled, conn


def test_a_connection_whose_sessions_left_while_it_was_dialled_closes_when_idle() -> None:
    async def body() -> None:
        pool, dialled, conn = dialled_when_set(idle=0.05)
        waiter = asyncio.create_task(pool.acquire("aviato/website"))
        await asyncio.sleep(0.01)
        waiter.cancel()  # the only session waiting for it: its client left
        dialled.set()
        await asyncio.sleep(0.01)
        (link,) = pool.links
        assert (link.state, link.active, conn.closed) == (LinkState.OPEN, 0, False)
        await asyncio.sleep(0.1)
        assert (conn.closed, pool.links) == (True, [])

    asyncio.run(body())


def test_a_connection_retired_while_it_was_dialled_says_its_sessions_may_go_elsewhere() -> None:
    """The agent said DRAINING as its handshake ended: the sessions that waited for the dial
    are told `Draining` (AgentBackend opens them once more), not that the backend failed."""

    async def body() -> None:
        pool, dialled, conn = dialled_when_set(idle=60.0)
        waiter = asyncio.create_task(pool.acquire("aviato/website"))
        await asyncio.sleep(0.01)
        (link,) = pool.links
        pool.retire(link)
        dialled.set()
        with pytest.raises(Draining, match="the peer drains the connection dialled"):
            await waiter
        assert (conn.closed, pool.links) == (True, [])

    asyncio.run(body())


class Closed:
    """A connection that only says whether the pool closed it."""

    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


def test_a_silent_agent_is_given_up_after_three_unanswered_pings() -> None:
    """The first PING proves the certificate (answered); then the agent falls silent: three
    PINGs go unanswered, one each `keepalive`, and the next tick gives the connection up."""

    class Mute(asyncio.Protocol):
        def __init__(self) -> None:
            self.reader = FrameReader()
            self.pings = 0
            self.lost = asyncio.Event()
            self.transport: asyncio.Transport | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = cast(asyncio.Transport, transport)

        def data_received(self, data: bytes) -> None:
            assert self.transport is not None
            for each in read_frames(self.reader, data):
                self.pings += each.kind is Kind.PING
                if self.pings == 1:
                    self.transport.write(frame(Kind.PONG, CONTROL))

        def connection_lost(self, exc: Exception | None) -> None:
            self.lost.set()

    async def body() -> None:
        loop = asyncio.get_running_loop()
        mute = Mute()

        async def connect(link: AgentLink) -> AgentConnection:
            ours, theirs = socket.socketpair()
            await loop.create_connection(lambda: mute, sock=theirs)
            _, conn = await loop.create_connection(lambda: AgentConnection(link, 0.05), sock=ours)
            await conn.answered
            return conn

        pool: AgentPool = Pool("agent1", ("127.0.0.1", 9422), connect, 16, 60.0, 2.0)
        await pool.acquire("aviato/website")
        async with asyncio.timeout(5):
            await mute.lost.wait()
        assert (mute.pings, pool.links) == (1 + 3, [])

    asyncio.run(body())


def test_an_exit_before_any_credit_fails_the_open_at_once() -> None:
    """Not a wait for the dial timeout: the channel has ended at the agent."""

    async def body() -> None:
        backend = AgentBackend("agent1", Storage(draining=0, exits=True).pool(), WINDOW)
        started = asyncio.get_running_loop().time()
        with pytest.raises(BackendError, match=r"ended the channel before it started \(exit"):
            await backend.open(request(), RecordingSink())
        assert asyncio.get_running_loop().time() - started < 1.0  # the dial timeout is 2 s
        await backend.close()
        await asyncio.sleep(0)  # the connection's loss is reported on the next turn

    asyncio.run(body())


def test_a_pool_closed_with_the_worker_warns_of_no_lost_connection(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Its connections go because it closes them: no "connection lost" warning for each at
    every worker's exit."""

    async def body() -> None:
        storage = Storage(draining=0)
        pool = storage.pool()
        link = await pool.acquire("aviato/website")
        pool.release(link)
        await pool.close()
        (agent,) = storage.agents
        await asyncio.sleep(0.05)  # the connection's loss comes a pass later
        assert agent.transport is not None and agent.transport.is_closing()

    asyncio.run(body())
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


class Transport:
    """What a connection asks of its transport: it writes into a buffer nobody drains."""

    def __init__(self) -> None:
        self.reading = True
        self.buffered = 0

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_closing(self) -> bool:
        return False

    def write(self, data: bytes) -> None:
        self.buffered += len(data)

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def get_extra_info(self, name: str) -> object:
        return None  # no peer certificate: the log names it "?"


def test_an_agent_reads_no_more_from_a_proxy_that_reads_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each PING is answered, whether the proxy reads the answers or not: past REPLIES_HELD
    bytes waiting for it, the agent reads no more of what it sends, so that its memory is
    bounded by that, not by the proxy. A buffer past its high mark with the channels' output
    holds nothing up: a proxy that reads has its frames read."""

    class Host:
        base = Path("/srv")
        hook_rc = Path("/nonexistent")
        window = WINDOW
        draining = False

    held = 64 << 10  # REPLIES_HELD, smaller: the same, with fewer frames to read
    monkeypatch.setattr("kilnproxy.agent.connection.REPLIES_HELD", held)
    conn = ProxyConnection(cast(Any, Host()), "192.0.2.7:40000")
    transport = Transport()
    conn.connection_made(cast(asyncio.Transport, transport))

    def receive(data: bytes) -> None:
        while data:
            area = conn.get_buffer(len(data))
            taken = min(len(area), len(data))
            area[:taken] = data[:taken]
            conn.buffer_updated(taken)
            data = data[taken:]

    transport.buffered = held // 2  # the channels' output, past the buffer's high mark
    conn.pause_writing()
    receive(frame(Kind.PING, CONTROL) * 1000)
    assert transport.reading and transport.buffered == held // 2 + 9000  # each answered
    receive(frame(Kind.PING, CONTROL) * (held // 9))
    assert not transport.reading
    transport.buffered = 0
    conn.resume_writing()
    assert transport.reading


def test_the_agent_gives_up_on_a_proxy_host_gone_while_it_sent(tmp_path: Path) -> None:
    """Keepalives are not sent while data waits to be acknowledged: a proxy host gone during a
    clone would be retransmitted to for 15 minutes and more, its command running, without a
    user timeout on the accepted socket."""
    accepted: list[asyncio.Transport] = []
    handed = asyncio.Event()

    class Agent:
        def handshake(self, transport: asyncio.Transport) -> None:
            accepted.append(transport)
            handed.set()

    async def body() -> int:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: _Handshake(cast(Any, Agent())), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        async with asyncio.timeout(5):
            await handed.wait()
        sock = accepted[0].get_extra_info("socket")
        timeout = int(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT))
        writer.close()
        accepted[0].abort()
        server.close()
        return timeout

    assert asyncio.run(body()) == 90_000


def test_an_agent_sending_past_its_credit_is_cut_off(caplog: pytest.LogCaptureFixture) -> None:
    """A relay whose client takes nothing grants an agent no more credit: one that sends all
    the same (a bug) would pile its output up here, and in asyncssh, without bound. Past the
    credit and what an agent may send beyond it, its connection is a protocol error."""

    async def body() -> RecordingSink:
        storage = Storage(draining=0)
        pool = storage.pool()
        link = await pool.acquire("aviato/website")
        sink = RecordingSink()
        stream = AgentStream(sink, link, "3f9c2a1b", "aviato/website", WINDOW)
        (agent,) = storage.agents
        agent.send(count_frame(Kind.CREDIT, stream.channel, WINDOW))  # as if it were opened
        async with asyncio.timeout(5):
            await stream.started
        stream.pause_output()  # the client takes nothing
        for _ in range(8):  # 2 MiB, past its 64 KiB of credit
            agent.send(frame(Kind.STDOUT, stream.channel, bytes(MAX_PAYLOAD)))
        for _ in range(500):
            if sink.ended:
                break
            await asyncio.sleep(0.01)
        await pool.close()
        return sink

    sink = asyncio.run(body())
    assert len(sink.stdout) <= WINDOW + OUTPUT_OVERSHOOT
    assert sink.ended == ["backend agent1: connection lost (closed)"], sink.ended
    assert "STDOUT beyond its credit on channel" in caplog.text
