"""Hostile input (issue 12, item 2) against a real `kilnproxy serve` with two workers and the
shipped penalties: each attack comes from its own part of 127.0.0.0/8 (the client socket is
bound there) while a legitimate git clone from 127.0.0.1 (exempt from penalties) must complete.

After each attack every worker slot is back where it was before it (measured after a warm-up
clone): RSS within 10%, the same descriptors and asyncio tasks, and no traceback in the log. A
flood can leave a worker's RSS far above what it holds (arenas pinned by a few live objects);
the master then recycles it (`[workers] recycle_rss_factor`), and the slot's new worker is what
must be back within 10%.
The clone's time under each attack is printed (`pytest -s`), and so is the memory each held
unauthenticated connection costs.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import struct
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncssh
import pytest
from conftest import World, make_world
from harness import (
    SHIPPED_LIMITS,
    Kiln,
    finish_upload_pack,
    hold_upload_pack,
    only_worker,
    wait_until,
)

pytestmark = pytest.mark.timeout(180)

BANNER = b"SSH-2.0-kilnproxy"
GRACE = 90.0  # login grace: longer than any attack here holds its connections
SETTINGS: dict[str, dict[str, Any]] = {
    "workers": {"count": 2, "recycle_rss_factor": 1.5},
    "log": {"format": "json"},
    "timeouts": {"login_grace": f"{GRACE:.0f}s"},
    "limits": {
        **SHIPPED_LIMITS,
        "max_startups": "30000",
        "max_startups_per_source": 0,
        "penalty_exempt": ["127.0.0.1/32"],  # the legitimate user
    },
}
CLOSED_WITHIN = 15.0  # a connection the server must drop: well before the login grace
IDLE_PROCESSES = 4  # 20,000 held connections: more than one process may hold (ulimit -n)
IDLE_EACH = 5000
# Once the idle connections all close at once, the workers are watched past the master's
# watchdog (10 s silent, then 2 s to SIGKILL): a new connection must get the banner within
# LOOP_HELD_AT_MOST every time, and no worker may be replaced.
WATCHED = 13.0
LOOP_HELD_AT_MOST = 5.0


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = make_world(tmp_path_factory.mktemp("hostile"), SETTINGS)
    yield w
    w.kiln.stop()


def report(case: str, figure: str) -> None:
    print(f"\nhostile input, {case}: {figure}")


# -- the legitimate user and the workers' health ---------------------------------------------------


def by_slot(kiln: Kiln) -> dict[int, dict[str, Any]]:
    """The serving worker of each slot (the newer, while a slot's worker is being replaced)."""
    return {w["index"]: w for w in kiln.workers() if w["state"] in ("starting", "ready")}


def clone(w: World, target: Path) -> float:
    started = time.monotonic()
    w.kiln.git(w.alice, "clone", "-q", w.kiln.url("aviato/website"), str(target))
    assert (target / "README.md").read_bytes() == b"# website\n"
    return time.monotonic() - started


def back_to(kiln: Kiln, before: dict[int, dict[str, Any]]) -> list[str]:
    """What is not yet back to `before`, slot by slot (empty when all is): RSS within 10%, and
    the same fds and tasks; a slot whose worker was recycled has a new worker, READY, with no
    more than its predecessor had (a fresh one may not have opened what a warm one had)."""
    now = by_slot(kiln)
    assert now.keys() == before.keys(), f"slots {sorted(before)} became {sorted(now)}"
    off = []
    for index, then in before.items():
        stats = now[index]
        fds, tasks = (then["fds"], stats["fds"]), (then["tasks"], stats["tasks"])
        if stats["pid"] == then["pid"] and (fds[0] != fds[1] or tasks[0] != tasks[1]):
            off.append(f"{index}: fds {fds[0]}->{fds[1]}, tasks {tasks[0]}->{tasks[1]}")
        elif stats["pid"] != then["pid"] and (stats["state"] != "ready" or fds[1] > fds[0]
                                                or tasks[1] > tasks[0]):  # fmt: skip
            off.append(f"{index}: recycled, new worker {stats['state']}, "
                       f"fds {fds[0]}->{fds[1]}, tasks {tasks[0]}->{tasks[1]}")  # fmt: skip
        if stats["rss"] > then["rss"] * 1.1:
            off.append(f"{index}: rss {then['rss'] >> 20}->{stats['rss'] >> 20} MiB")
    return off


@contextlib.asynccontextmanager
async def attack(
    w: World, tmp_path: Path, case: str, settle: float = 30
) -> AsyncIterator[Callable[[], Any]]:
    """Around one attack: a baseline after a warm-up clone, a timed clone for the attack to
    run beside, and the checks once it is over (`back_to`, within `settle` seconds)."""
    kiln = w.kiln
    clone(w, tmp_path / "warm-up")
    kiln.wait_idle()
    await asyncio.sleep(1.2)  # a heartbeat after the clone ended
    before = by_slot(kiln)

    async def timed_clone() -> float:
        seconds = await asyncio.to_thread(clone, w, tmp_path / "under-attack")
        report(case, f"a git clone took {seconds:.2f} s under attack")
        return seconds

    yield timed_clone
    deadline = time.monotonic() + settle
    while off := back_to(kiln, before):
        assert time.monotonic() < deadline, f"{case}: workers not back to baseline: {off}"
        await asyncio.sleep(0.5)
    assert kiln.status()["unauthenticated"] == 0
    assert "Traceback" not in kiln.log()


async def closed_by_server(reader: asyncio.StreamReader) -> float | None:
    """Read until the server closes; how long that took, or None if not within CLOSED_WITHIN."""
    started = time.monotonic()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(CLOSED_WITHIN):
            with contextlib.suppress(ConnectionResetError):
                while await reader.read(65536):
                    pass
            return time.monotonic() - started
    return None


async def connect(port: int, source: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    assert await reader.readexactly(len(BANNER)) == BANNER, "admitted, our banner first"
    await reader.readuntil(b"\r\n")
    return reader, writer


async def send_then_wait_for_close(port: int, source: str, payload: bytes) -> float | None:
    reader, writer = await connect(port, source)
    try:
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            writer.write(payload)
            await writer.drain()
        return await closed_by_server(reader)
    finally:
        writer.close()


def assert_closed(kinds: dict[str, list[float | None]]) -> None:
    """Every connection of every kind was closed by the server within CLOSED_WITHIN."""
    held = {kind: sum(t is None for t in times) for kind, times in kinds.items()}
    slowest = {kind: max((t for t in times if t is not None), default=None)
               for kind, times in kinds.items()}  # fmt: skip
    assert not any(held.values()), f"held open: {held}; slowest closes: {slowest}"


# -- SSH packets by hand ------------------------------------------------------------------------


def packet(payload: bytes) -> bytes:
    """An unencrypted binary packet (RFC 4253 6), padded to a multiple of 8."""
    padding = 8 - (len(payload) + 5) % 8
    padding += 8 if padding < 4 else 0
    body = bytes([padding]) + payload + os.urandom(padding)
    return struct.pack(">I", len(body)) + body


async def read_packet(reader: asyncio.StreamReader) -> bytes:
    """The payload of the server's next unencrypted packet."""
    (length,) = struct.unpack(">I", await reader.readexactly(4))
    body = await reader.readexactly(length)
    return body[1 : length - body[0]]


def name_list(*names: str) -> bytes:
    text = ",".join(names).encode()
    return struct.pack(">I", len(text)) + text


def client_kexinit() -> bytes:
    """A KEXINIT the server accepts, sent first as OpenSSH sends it (kilnproxy reads the
    client's before it sends its own, to fit its cipher offer)."""
    lists = [
        name_list("curve25519-sha256"),
        name_list("ssh-ed25519"),
        *[name_list("aes128-gcm@openssh.com")] * 2,
        *[name_list("hmac-sha2-256-etm@openssh.com")] * 2,
        *[name_list("none")] * 2,
        *[name_list()] * 2,
    ]
    return packet(b"\x14" + os.urandom(16) + b"".join(lists) + b"\x00" + bytes(4))


CLIENT_BANNER = b"SSH-2.0-hostile\r\n"


# -- the attacks ---------------------------------------------------------------------------------


GARBAGE = {
    "binary": os.urandom(256) + b"\r\n",
    "http": b"GET / HTTP/1.1\r\nHost: kiln\r\n\r\n",
    "ssh-1": b"SSH-1.5-ancient\r\n",
    "endless banner": b"SSH-2.0-" + b"A" * 200_000,
    "long banner": b"SSH-2.0-" + b"B" * 300 + b"\r\n",
    "lines before the banner": b"hello\r\n" * 5000,
    "megabyte": random.randbytes(1 << 20),
}


async def garbage_and_oversized_banners(hostile: World, tmp_path: Path) -> None:
    port = hostile.kiln.port
    async with attack(hostile, tmp_path, "garbage and oversized banners") as timed_clone:
        floods = [send_then_wait_for_close(port, f"127.2.{i}.{j + 1}", payload)
                  for i, payload in enumerate(GARBAGE.values()) for j in range(20)]  # fmt: skip
        *closed, _ = await asyncio.gather(*floods, timed_clone())
    assert_closed({kind: closed[i * 20 : i * 20 + 20] for i, kind in enumerate(GARBAGE)})


async def stall(kind: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Begin the key exchange, and stop at one of four points."""
    if kind == 0:  # our banner, then nothing
        writer.write(CLIENT_BANNER)
    elif kind == 1:  # KEXINIT, never the key exchange's next message
        writer.write(CLIENT_BANNER + client_kexinit())
        await writer.drain()
        assert (await read_packet(reader))[:1] == b"\x14"  # its KEXINIT: the exchange has begun
    elif kind == 2:  # half a packet: a header that promises 1000 bytes, and 3 of them
        writer.write(CLIENT_BANNER + struct.pack(">IBBB", 1000, 8, 20, 0))
    else:  # a NUL in the banner, which asyncssh lets by: then nothing
        writer.write(b"SSH-2.0-a\x00b\r\n")
    await writer.drain()


async def a_client_that_stops_mid_key_exchange(hostile: World, tmp_path: Path) -> None:
    kiln = hostile.kiln
    async with attack(hostile, tmp_path, "clients stopped mid key exchange") as timed_clone:
        held = []
        try:
            async with asyncio.timeout(60):
                for i in range(300):
                    reader, writer = await connect(kiln.port, f"127.3.{i % 4}.{i // 4 + 1}")
                    held.append(writer)
                    await stall(i % 4, reader, writer)
            await asyncio.sleep(0.5)  # the server has read all it was sent
            assert kiln.status()["unauthenticated"] == 300
            await timed_clone()
        finally:
            for writer in held:
                writer.close()


async def oversized_packets(hostile: World, tmp_path: Path) -> None:
    port = hostile.kiln.port
    huge = [
        struct.pack(">I", 0x7FFFFFF0) + os.urandom(1 << 16),  # a length nobody allows
        struct.pack(">I", 1 << 20) + b"\x04" + os.urandom(1 << 20),  # one megabyte, sent
        packet(b"\x14" + os.urandom(300_000)),  # a well-formed KEXINIT far over any limit
        struct.pack(">IB", 12, 200) + bytes(12),  # padding longer than the packet
    ]
    async with attack(hostile, tmp_path, "oversized packets") as timed_clone:
        floods = [send_then_wait_for_close(port, f"127.4.{i}.{j + 1}", CLIENT_BANNER + payload)
                  for i, payload in enumerate(huge) for j in range(20)]  # fmt: skip
        *closed, _ = await asyncio.gather(*floods, timed_clone())
    assert_closed({str(i): closed[i * 20 : i * 20 + 20] for i in range(len(huge))})


async def try_stranger(w: World, source: str) -> str:
    """One login with a key nobody registered: how it ended."""
    try:
        async with asyncio.timeout(20):
            conn = await asyncssh.connect(
                "127.0.0.1", w.kiln.port, username="git", local_addr=(source, 0),
                client_keys=[str(w.stranger)], known_hosts=None, agent_path=None,
                config=None, preferred_auth="publickey",
            )  # fmt: skip
    except asyncssh.PermissionDenied:
        return "denied"
    except (asyncssh.ConnectionLost, ConnectionResetError):
        return "refused at accept"
    conn.close()
    return "let in"


async def failed_authentications(hostile: World, tmp_path: Path) -> None:
    """With the shipped penalties (authfail 5 s, min 15 s) the source is soon refused at
    accept, host-wide; 127.0.0.1 is exempt and clones meanwhile."""
    async with attack(hostile, tmp_path, "200 failed authentications") as timed_clone:
        gate = asyncio.Semaphore(10)

        async def attempt() -> str:
            async with gate:
                return await try_stranger(hostile, "127.0.0.5")

        *ends, _ = await asyncio.gather(*(attempt() for _ in range(200)), timed_clone())
    outcomes = Counter(ends)
    report("200 failed authentications", f"{dict(outcomes)}")
    assert outcomes.keys() <= {"denied", "refused at accept"}
    assert outcomes["denied"] >= 3  # three failures make the penalty's minimum
    assert outcomes["refused at accept"] >= 150
    assert hostile.kiln.status()["penalised_sources"] >= 1


CHANNELS = {
    "shell": None,  # no shell here: a line and exit 1
    "missing": "git-upload-pack 'aviato/nothing'",  # not found: exit 1
    "upload-pack": "git-upload-pack 'aviato/website'",  # a real backend, told it wants nothing
    "forward": "",  # a direct-tcpip channel: never served
}


async def one_channel(conn: asyncssh.SSHClientConnection, kind: str) -> str:
    """Open one channel of `kind`; how it ended: its exit status, or refused at open."""
    try:
        if kind == "forward":
            _, _ = await conn.create_connection(asyncssh.SSHTCPSession, "127.0.0.1", 22)
            return f"{kind}: opened"
        done = await conn.run(CHANNELS[kind], input="0000" if kind == "upload-pack" else "",
                              timeout=60)  # fmt: skip
    except asyncssh.ChannelOpenError:
        return f"{kind}: refused"
    return f"{kind}: {done.exit_status}"


async def a_flood_of_channel_opens_on_one_connection(hostile: World, tmp_path: Path) -> None:
    kiln = hostile.kiln
    async with attack(hostile, tmp_path, "channel-open flood") as timed_clone:
        conn = await asyncssh.connect(
            "127.0.0.1", kiln.port, username="git", local_addr=("127.0.0.6", 0),
            client_keys=[str(hostile.alice)], known_hosts=None, agent_path=None, config=None,
        )  # fmt: skip
        async with conn:
            flood = [one_channel(conn, kind) for _ in range(300) for kind in CHANNELS]
            async with asyncio.timeout(120):
                *outcomes, _ = await asyncio.gather(*flood, timed_clone())
            # The connection still serves: one more command, after the flood.
            after = await conn.run(CHANNELS["upload-pack"], input="0000", timeout=30)
            assert after.exit_status == 0, after.stderr
    counted = Counter(outcomes)
    report("channel-open flood", f"{len(flood)} channels: {dict(counted)}")
    # At most max_channels (10) at once: the rest are refused at open, none is lost.
    served = {"shell: 1", "missing: 1", "upload-pack: 0"}
    assert counted.keys() <= served | {f"{kind}: refused" for kind in CHANNELS}
    assert counted["forward: refused"] == 300  # never any port forwarding
    assert counted["shell: 1"] and counted["missing: 1"] and counted["upload-pack: 0"]
    assert counted["shell: refused"] + counted["missing: refused"] > 0


async def longest_wait_for_banner(port: int, seconds: float) -> float:
    """The longest a new connection from the legitimate user waited for the banner, tried
    every 0.1 s for `seconds`: a worker whose loop is held accepts nothing meanwhile."""
    longest, deadline = 0.0, time.monotonic() + seconds
    while time.monotonic() < deadline:
        started = time.monotonic()
        _, writer = await connect(port, "127.0.0.1")
        longest = max(longest, time.monotonic() - started)
        writer.close()
        await asyncio.sleep(0.1)
    return longest


def let_go(holders: list[subprocess.Popen[str]]) -> None:
    """All at once, as an attacker or a load balancer's restart would: each holder closes
    all its connections once its standard input closes."""
    for holder in holders:
        assert holder.stdin is not None
        holder.stdin.close()


def idle_clients(port: int, index: int) -> subprocess.Popen[str]:
    script = Path(__file__).parent.parent / "idle_clients.py"
    argv = [sys.executable, str(script), str(port), str(IDLE_EACH), str(index * 250)]
    return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def hold_a_clone_on_each_worker(w: World) -> list[subprocess.Popen[bytes]]:
    """An upload-pack begun and held on each worker (the clone goes on when the test finishes
    it): whichever worker is recycled, a clone runs on it meanwhile."""
    held: list[subprocess.Popen[bytes]] = []
    try:
        workers = sorted(by_slot(w.kiln))
        for index in workers:
            with only_worker(w.kiln, index):
                held.append(hold_upload_pack(w.kiln, w.alice))

        def on_each() -> bool:
            rows = [r for r in w.kiln.connections() if r["repo"] == "aviato/website"]
            return sorted(r["worker"] for r in rows) == workers

        wait_until(on_each, 10, "a held clone on each worker")  # a heartbeat brings the rows
    except BaseException:
        for client in held:
            with client:  # its pipes closed, and waited for
                client.kill()
        raise
    return held


def recycles(kiln: Kiln) -> float:
    url = f"http://127.0.0.1:{kiln.http_port}/metrics"
    with urllib.request.urlopen(url, timeout=30) as response:
        for line in response.read().decode().splitlines():
            if line.startswith("kilnproxy_worker_recycles_total "):
                return float(line.split()[1])
    raise AssertionError("no kilnproxy_worker_recycles_total in /metrics")


async def idle_connections(hostile: World, tmp_path: Path) -> None:
    """20,000 held and let go. What their objects held comes back (their cycles are collected
    once their closes stop), but RSS does not by itself: CPython keeps an arena while one
    object in it lives, so 60-90 MiB per worker stays mapped. The master recycles such a
    worker (at 1.5x its RSS after start, here) as one step of a rolling restart: a clone
    running on it meanwhile completes."""
    kiln = hostile.kiln
    total = IDLE_PROCESSES * IDLE_EACH
    recycled_before = recycles(kiln)
    async with attack(hostile, tmp_path, f"{total} idle connections", settle=90) as timed_clone:
        before = by_slot(kiln)
        clones = hold_a_clone_on_each_worker(hostile)
        holders = [idle_clients(kiln.port, i) for i in range(IDLE_PROCESSES)]
        try:
            for holder in holders:
                assert holder.stdout is not None
                line = await asyncio.wait_for(asyncio.to_thread(holder.stdout.readline), 120)
                assert line == f"held {IDLE_EACH} refused 0\n", line
            assert kiln.status()["unauthenticated"] == total
            await timed_clone()
            await asyncio.sleep(1.2)  # a heartbeat with them all held
            held = sum(w["rss"] for w in kiln.workers()) - sum(w["rss"] for w in before.values())
            report("idle connections", f"{held / total / 1024:.1f} KiB of worker RSS each "
                   f"({total} held, spread {[w['sessions'] for w in kiln.workers()]})")  # fmt: skip
            log_seen = len(kiln.log())
            let_go(holders)
            longest, seconds = await asyncio.gather(
                longest_wait_for_banner(kiln.port, WATCHED),
                asyncio.to_thread(clone, hostile, tmp_path / "as-they-close"),
            )
            report("idle connections", f"all closed at once: a git clone took {seconds:.2f} s, "
                   f"a new connection waited {longest:.2f} s at most for the banner")  # fmt: skip
            # Replaced by a recycle is fine (below); killed as hung, or dead, is not.
            lost = re.findall(
                r"worker \d+ \(pid \d+\) (?:silent for|died with)", kiln.log()[log_seen:]
            )
            assert not lost, f"a worker was lost while they closed: {lost}"
            assert longest < LOOP_HELD_AT_MOST, f"the workers accepted nothing for {longest:.2f} s"
        finally:
            let_go([holder for holder in holders if holder.stdin and not holder.stdin.closed])
            for holder in holders:
                assert holder.stdout is not None
                holder.stdout.close()
                holder.wait(timeout=60)
        assert [holder.returncode for holder in holders] == [0] * IDLE_PROCESSES
        report("idle connections", "worker RSS once let go: "
               f"{[w['rss'] >> 20 for w in by_slot(kiln).values()]} MiB")  # fmt: skip
        # The first recycle: its old worker drains while a held clone runs on it.
        found = await asyncio.to_thread(
            kiln.wait_for_log, r"recycling worker (\d+) \(pid (\d+)\)", 60
        )
        index, old = int(found.group(1)), int(found.group(2))

        def replaced() -> bool:
            states = {w["pid"]: w["state"] for w in kiln.workers()}
            return states.get(old) == "draining" and by_slot(kiln)[index]["state"] == "ready"

        await asyncio.to_thread(wait_until, replaced, 60, "the recycled worker's replacement")
        assert index in {r["worker"] for r in kiln.connections() if r["repo"]}, "a clone on it"
        for client in clones:
            with client:  # its pipes closed after
                assert finish_upload_pack(client) == 0  # the one on the draining worker too
    after = by_slot(kiln)
    slots = sorted(i for i in before if after[i]["pid"] != before[i]["pid"])
    for index in slots:
        assert f"recycling worker {index} " in kiln.log()
        report("idle connections", f"slot {index}: its worker was recycled, RSS "
               f"{before[index]['rss'] >> 20} MiB before the flood, "
               f"{after[index]['rss'] >> 20} MiB now")  # fmt: skip
    assert recycles(kiln) - recycled_before == len(slots) >= 1
    log = kiln.log()
    if len(slots) > 1:  # one at a time: the next began once the first's old worker was gone
        second = log.index("recycling worker", log.index(f"(pid {old}): RSS"))
        assert log.index(f"(pid {old}) exited 0 after draining") < second
    assert " died " not in log


# -- the tests: each attack in its own event loop --------------------------------------------------


def test_garbage_and_oversized_banners(hostile: World, tmp_path: Path) -> None:
    asyncio.run(garbage_and_oversized_banners(hostile, tmp_path))


def test_a_client_that_stops_mid_key_exchange(hostile: World, tmp_path: Path) -> None:
    asyncio.run(a_client_that_stops_mid_key_exchange(hostile, tmp_path))


def test_oversized_packets(hostile: World, tmp_path: Path) -> None:
    asyncio.run(oversized_packets(hostile, tmp_path))


def test_200_failed_authentications_from_one_source(hostile: World, tmp_path: Path) -> None:
    asyncio.run(failed_authentications(hostile, tmp_path))


def test_a_flood_of_channel_opens_on_one_connection(hostile: World, tmp_path: Path) -> None:
    asyncio.run(a_flood_of_channel_opens_on_one_connection(hostile, tmp_path))


@pytest.mark.timeout(360)  # 20,000 connections, then up to two recycles one after the other
def test_20000_idle_connections_before_authentication(hostile: World, tmp_path: Path) -> None:
    asyncio.run(idle_connections(hostile, tmp_path))
