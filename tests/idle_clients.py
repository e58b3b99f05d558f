"""Hold idle pre-auth TCP connections to a port, from many loopback sources: one share of the
hostile suite's 20,000 (a process may hold only as many as its descriptor limit allows).

    python tests/idle_clients.py PORT COUNT FIRST_SOURCE_INDEX [--banner]

Connects COUNT times, sources 127.10.x.y spread from FIRST_SOURCE_INDEX, a bounded number at
once; a connection is admitted when the server's banner arrives, refused when the server closes
it first. Prints `held H refused R` once all are settled, holds them without a byte (with
`--banner`: after sending a client's banner, so the server waits for its KEXINIT) until its
standard input closes, then closes them all at once, as a load balancer's restart or an
attacker would, and exits.
"""

from __future__ import annotations

import asyncio
import resource
import sys

BANNER = b"SSH-2.0-kilnproxy"
AT_ONCE = 200  # connections in flight: the server's listen queue must not overflow
SOURCES = 250  # sources per process: 127.10.B.1-250
CLIENT_BANNER = b"SSH-2.0-idle\r\n"


def source(index: int) -> str:
    return f"127.10.{index // 250}.{index % 250 + 1}"


async def hold(port: int, count: int, first: int, banner: bool) -> None:
    gate = asyncio.Semaphore(AT_ONCE)
    held: list[asyncio.StreamWriter] = []
    refused = 0

    async def one(i: int) -> None:
        nonlocal refused
        async with gate:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, local_addr=(source(first + i % SOURCES), 0)
            )
            try:
                got = await asyncio.wait_for(reader.readexactly(len(BANNER)), 30)
            except (asyncio.IncompleteReadError, ConnectionResetError):
                got = b""
            if got == BANNER:
                if banner:
                    writer.write(CLIENT_BANNER)
                held.append(writer)
            else:
                writer.close()
                refused += 1

    await asyncio.gather(*(one(i) for i in range(count)))
    print(f"held {len(held)} refused {refused}", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for writer in held:  # all at once: the server sees them end within a few milliseconds
        writer.close()


def main() -> None:
    port, count, first = (int(arg) for arg in sys.argv[1:4])
    banner = sys.argv[4:] == ["--banner"]
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    asyncio.run(asyncio.wait_for(hold(port, count, first, banner), 300))


if __name__ == "__main__":
    main()
