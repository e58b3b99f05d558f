"""The proxy's side of an agent's drain, driven in one process: a scripted agent speaks the
frames over a socketpair, so the race a real agent cannot be made to lose on cue is played out
every time (the proxy's OPEN reaches the agent after it began draining, before the proxy heard
so). The same drain end to end, with real agents, is in tests/integration/test_agent.py.
"""

from __future__ import annotations

import asyncio
import socket
from typing import cast

import pytest
from agent import read_frames

from kilnproxy.backends.agent import AgentBackend, AgentConnection, AgentLink, AgentPool
from kilnproxy.backends.base import BackendRequest
from kilnproxy.backends.frames import CONTROL, FrameReader, Kind, OpenRequest, count_frame, frame
from kilnproxy.backends.pool import LinkState, Pool
from kilnproxy.backends.wire import FlowSwitch
from kilnproxy.directory.model import Identity, Route
from kilnproxy.errors import BackendError
from kilnproxy.policy.access import Access, Role
from kilnproxy.policy.commands import Verb

WINDOW = 65536


class ScriptedAgent(asyncio.Protocol):
    """An agent's end of one connection: PONG to PING; an OPEN is started (CREDIT), or, once
    `draining`, refused as a draining agent refuses it: DRAINING on the connection, then on
    the channel."""

    def __init__(self, draining: bool) -> None:
        self.draining = draining
        self.opened: list[OpenRequest] = []
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
                if self.draining:
                    answer = frame(Kind.DRAINING, CONTROL) + frame(Kind.DRAINING, each.channel)
                else:
                    answer = count_frame(Kind.CREDIT, each.channel, WINDOW)
                self.transport.write(answer)


class Storage:
    """Dials scripted agents: the first `draining` of them drain, the next ones serve."""

    def __init__(self, draining: int) -> None:
        self.draining = draining
        self.agents: list[ScriptedAgent] = []

    async def connect(self, link: AgentLink) -> AgentConnection:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        agent = ScriptedAgent(draining=len(self.agents) < self.draining)
        self.agents.append(agent)
        await loop.create_connection(lambda: agent, sock=theirs)
        _, conn = await loop.create_connection(lambda: AgentConnection(link, 30.0), sock=ours)
        await conn.answered
        return conn

    def pool(self) -> AgentPool:
        return Pool("agent1", ("127.0.0.1", 9422), self.connect, 16, 60.0, 2.0)


class Sink:
    def backend_stdout(self, data: bytes) -> None: ...
    def backend_stderr(self, data: bytes) -> None: ...
    def backend_pause_input(self) -> None: ...
    def backend_resume_input(self) -> None: ...
    def backend_finished(self, exit_status: int) -> None: ...
    def backend_lost(self, error: BackendError) -> None: ...


def request() -> BackendRequest:
    route = Route("aviato/website", Verb.UPLOAD_PACK.vcs, "agent1", "agent://127.0.0.1:9422/srv",
                  "/srv/aviato/website.git", Access.READ)  # fmt: skip
    identity = Identity("aviato", "bob", Role.READ, "laptop", "SHA256:x")
    return BackendRequest("3f9c2a1b", Verb.UPLOAD_PACK, route, identity, None)


def test_a_session_refused_for_the_drain_is_opened_once_more_on_a_new_connection() -> None:
    async def body() -> None:
        storage = Storage(draining=1)
        backend = AgentBackend("agent1", storage.pool(), WINDOW)
        stream = await backend.open(request(), Sink())
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
            await backend.open(request(), Sink())
        assert refused.value.detail == "agent refused: it drains"
        assert backend.pool.dials == 2  # retried once, not more
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
