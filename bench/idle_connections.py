"""Memory per idle authenticated connection: worker RSS growth over N connections, divided by N.

Starts a real `kilnproxy serve` (one worker), opens N authenticated SSH connections with
asyncssh clients from this process, holds them, and reads the worker's RSS from the status
socket before and after. Run: `.venv/bin/python bench/idle_connections.py [N]`.
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


def settle(kiln: Kiln, seconds: float = 2.0) -> int:
    time.sleep(seconds)
    rss: int = kiln.worker()["rss"]
    return rss


async def measure(kiln: Kiln, key: Path, count: int) -> tuple[int, int, int]:
    # Warm-up: allocations made once, on the first connections, are not per connection.
    warm = await hold(kiln, key, 20)
    for conn in warm:
        conn.close()
    before = await asyncio.to_thread(settle, kiln)
    connections = await hold(kiln, key, count)
    after = await asyncio.to_thread(settle, kiln)
    open_sessions = kiln.worker()["sessions"]  # after settling: heartbeats lag by a second
    for conn in connections:
        conn.close()
    await asyncio.gather(*(conn.wait_closed() for conn in connections))
    return before, after, open_sessions


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 500
    with tempfile.TemporaryDirectory() as root:
        kiln = Kiln(Path(root))
        key = kiln.add_user("bench", "idle", Role.READ)
        kiln.start()
        try:
            before, after, sessions = asyncio.run(measure(kiln, key, count))
        finally:
            kiln.stop()
    per = (after - before) / count
    print(f"connections held: {count} (worker saw {sessions} open)")
    print(f"worker RSS: {before / 1048576:.1f} MiB -> {after / 1048576:.1f} MiB")
    print(f"memory per idle authenticated connection: {per / 1024:.1f} KiB")


if __name__ == "__main__":
    main()
