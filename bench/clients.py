"""Authenticated SSH client connections to a test server, for the benchmarks that hold many."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncssh
from harness import Kiln

BATCH = 50


async def connect(kiln: Kiln, key: Path) -> asyncssh.SSHClientConnection:
    return await asyncssh.connect(
        "127.0.0.1",
        kiln.port,
        username="git",
        client_keys=[str(key)],
        known_hosts=str(kiln.known_hosts),
        agent_path=None,
        config=None,
    )


async def hold(
    kiln: Kiln, key: Path, count: int, batch: int = BATCH
) -> list[asyncssh.SSHClientConnection]:
    """Open `count` connections, `batch` at a time; the caller closes them."""
    connections: list[asyncssh.SSHClientConnection] = []
    for start in range(0, count, batch):
        size = min(batch, count - start)
        connections += await asyncio.gather(*(connect(kiln, key) for _ in range(size)))
    return connections
