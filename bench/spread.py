"""How evenly concurrent connections spread over the workers sharing one listening socket.

Starts `kilnproxy serve` with 4 workers, opens N authenticated connections at once (asyncssh
clients, in this process), and reads each worker's session count from the status socket.
Run: `.venv/bin/python bench/spread.py [N] [WORKERS]`.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path

import asyncssh

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from harness import Kiln

from kilnproxy.access import Role


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


async def hold(kiln: Kiln, key: Path, count: int) -> list[int]:
    connections = await asyncio.gather(*(connect(kiln, key) for _ in range(count)))
    await asyncio.sleep(2.5)  # two heartbeats
    shares = [int(w["sessions"]) for w in kiln.workers()]
    for conn in connections:
        conn.close()
    return shares


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 400
    workers = int(sys.argv[2]) if len(sys.argv) > 2 else 4
    with tempfile.TemporaryDirectory() as root:
        kiln = Kiln(Path(root), {"workers": {"count": workers}, "ssh": {"backlog": 4096}})
        key = kiln.add_user("bench", "dev", Role.READ)
        kiln.start()
        try:
            started = time.monotonic()
            shares = asyncio.run(hold(kiln, key, count))
            elapsed = time.monotonic() - started
        finally:
            kiln.stop()
    busiest = max(shares) / max(1, sum(shares))
    print(f"{sum(shares)} connections over {workers} workers: {shares}")
    print(f"busiest worker's share: {busiest:.1%} (even: {1 / workers:.1%}); {elapsed:.1f}s")


if __name__ == "__main__":
    main()
