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

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from clients import hold
from harness import Kiln

from kilnproxy.policy.access import Role


async def spread(kiln: Kiln, key: Path, count: int) -> list[int]:
    connections = await hold(kiln, key, count, batch=count)  # all at once
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
            shares = asyncio.run(spread(kiln, key, count))
            elapsed = time.monotonic() - started
        finally:
            kiln.stop()
    busiest = max(shares) / max(1, sum(shares))
    print(f"{sum(shares)} connections over {workers} workers: {shares}")
    print(f"busiest worker's share: {busiest:.1%} (even: {1 / workers:.1%}); {elapsed:.1f}s")


if __name__ == "__main__":
    main()
