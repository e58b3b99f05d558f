"""An agent connection's memory goes when the connection goes, not at the cyclic collector's
next full pass: the agent is a process that allocates little, so that pass can be hundreds of
connections away, and each connection held about 800 KiB (its frame reader's area and the TLS
buffers), each refused handshake about 300 KiB. And handshakes under way, which hold their TLS
buffers until they end, are bounded (`[agent] max_handshakes`).

A real `Agent` and a real agent pool, in one process, over TLS on 127.0.0.1, with the cyclic
collector off: a connection still alive once both ends have let it go was held by a cycle. On
asyncio (the agent's loop) and on uvloop (the workers').
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
import weakref
from asyncio import sslproto
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import uvloop
from agent import Agent, Pki
from harness import free_port

from kilnproxy.agent.connection import ProxyConnection
from kilnproxy.agent.server import Agent as AgentServer
from kilnproxy.backends.agent import (
    AgentConnection,
    AgentLink,
    AgentPool,
    agent_pool,
    client_context,
)
from kilnproxy.backends.pool import LinkState
from kilnproxy.config import from_mapping


@pytest.fixture
def no_collector() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def make_agent(tmp_path: Path, pki: Pki, port: int, max_handshakes: int = 256) -> AgentServer:
    cert, key = pki.issue("agent", "127.0.0.1")
    (tmp_path / "srv").mkdir()
    raw = {
        "agent": {"listen": [f"127.0.0.1:{port}"], "base": str(tmp_path / "srv"),
                  "ca": str(pki.ca), "cert": str(cert), "key": str(key),
                  "max_handshakes": max_handshakes},
        "timeouts": {"dial": "2s", "drain": "2s"},
    }  # fmt: skip
    return AgentServer(from_mapping(raw, tmp_path / "home"))


async def settle(until: Callable[[], bool]) -> None:
    for _ in range(500):
        if until():
            await asyncio.sleep(0.05)  # the callbacks that follow a close
            return
        await asyncio.sleep(0.01)
    raise AssertionError("timed out")


async def serving(agent: AgentServer, port: int) -> asyncio.Task[None]:
    served = asyncio.create_task(agent.serve())
    async with asyncio.timeout(5):
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except ConnectionRefusedError:
                await asyncio.sleep(0.01)
                continue
            writer.close()
            return served


async def stop(agent: AgentServer, served: asyncio.Task[None]) -> None:
    agent._begin_drain()  # what SIGTERM does
    async with asyncio.timeout(5):
        await served


@dataclass
class Dialled:
    """A worker's pool holding one idle connection to an agent: the connection weakly, and
    its link, whose state says when the worker has heard that the connection closed."""

    pool: AgentPool
    link: AgentLink
    conn: weakref.ref[AgentConnection]

    async def close(self) -> None:
        await self.pool.close()
        await settle(lambda: self.link.state is LinkState.CLOSED)


async def dial(pki: Pki, port: int) -> Dialled:
    cert, key = pki.issue("proxy", "proxy")
    pool = agent_pool("agent1", ("127.0.0.1", port), lambda: client_context(pki.ca, cert, key),
                      (16, 60.0, 30.0), 2.0)  # fmt: skip
    link = await pool.acquire("aviato/website")
    assert isinstance(link.conn, AgentConnection)
    pool.release(link)
    return Dialled(pool, link, weakref.ref(link.conn))


def test_a_closed_connection_is_freed_at_both_ends(tmp_path: Path, no_collector: None) -> None:
    """On asyncio, the agent's loop, with the agent in this process."""
    pki = Pki(tmp_path / "pki")
    port = free_port()

    async def body() -> None:
        agent = make_agent(tmp_path, pki, port)
        served = await serving(agent, port)
        ours = await dial(pki, port)
        await settle(lambda: len(agent.connections) == 1)
        theirs: weakref.ref[ProxyConnection] = weakref.ref(next(iter(agent.connections)))
        await ours.close()
        await settle(lambda: not agent.connections)
        assert (ours.conn(), theirs()) == (None, None)
        await stop(agent, served)

    asyncio.run(body())


def test_a_closed_connection_is_freed_in_a_worker(tmp_path: Path, no_collector: None) -> None:
    """On uvloop, a worker's loop; the agent is a `kilnproxy agent` process (on uvloop, the
    agent's listener cannot start TLS: see agent/server.py)."""
    pki = Pki(tmp_path / "pki")
    agent = Agent(tmp_path / "agent", pki)
    agent.start()

    async def body() -> weakref.ref[AgentConnection]:
        ours = await dial(pki, agent.port)
        await ours.close()
        return ours.conn

    try:
        conn = uvloop.run(body())
        agent.wait_for_log(r"proxy 127\.0\.0\.1:\d+ disconnected")
        assert conn() is None
    finally:
        agent.stop()


def test_a_refused_handshake_leaves_nothing_for_the_collector(
    tmp_path: Path, no_collector: None, caplog: pytest.LogCaptureFixture
) -> None:
    """A health check or a port scan: connect, then close, or send what is not TLS. The agent
    runs on asyncio, whose SSL protocol keeps a failed handshake's error in a local of the frame
    that raised it (CPython 3.11)."""
    pki = Pki(tmp_path / "pki")
    port = free_port()

    def refused() -> int:
        return sum("TLS handshake failed" in r.getMessage() for r in caplog.records)

    async def body() -> None:
        agent = make_agent(tmp_path, pki, port)
        served = await serving(agent, port)
        await settle(lambda: refused() == 1)  # serving's probe
        for payload in (b"", b"GET / HTTP/1.0\r\n\r\n") * 5:
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.sendall(payload)
        await settle(lambda: refused() == 11)
        alive = [o for o in gc.get_objects() if isinstance(o, sslproto.SSLProtocol)]
        assert alive == []
        await stop(agent, served)

    asyncio.run(body())


def test_handshakes_beyond_max_handshakes_are_refused_at_once(
    tmp_path: Path, no_collector: None, caplog: pytest.LogCaptureFixture
) -> None:
    """Connections that never speak hold a handshake each until `[timeouts] dial`: past the
    bound, the next is closed at once, with a log line; once they end, a proxy dials again."""
    pki = Pki(tmp_path / "pki")
    port = free_port()

    async def body() -> None:
        agent = make_agent(tmp_path, pki, port, max_handshakes=4)
        served = await serving(agent, port)
        await settle(lambda: agent.handshaking == 0)  # serving's probe
        silent = [await asyncio.open_connection("127.0.0.1", port) for _ in range(4)]
        await settle(lambda: agent.handshaking == 4)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        async with asyncio.timeout(5):
            with contextlib.suppress(ConnectionResetError):
                assert await reader.read() == b""  # closed at once, not at the dial timeout
        writer.close()
        refusals = [r.getMessage() for r in caplog.records if "max_handshakes" in r.getMessage()]
        assert len(refusals) == 1
        assert refusals[0].endswith(": 4 TLS handshakes under way ([agent] max_handshakes)")
        for _, each in silent:
            each.close()
        await settle(lambda: agent.handshaking == 0)
        await (await dial(pki, port)).close()
        await settle(lambda: not agent.connections)
        assert [o for o in gc.get_objects() if isinstance(o, sslproto.SSLProtocol)] == []
        await stop(agent, served)

    asyncio.run(body())
