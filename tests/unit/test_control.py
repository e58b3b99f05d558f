"""The master-worker protocol: every message survives the wire, and every malformed line is a
ProtocolError for the reader (never another exception, never a message with a wrong field)."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import re
import socket
import subprocess
import sys
import time
from typing import Any

import pytest

from kilnproxy.control import (
    BUCKETS,
    LATENCIES,
    MAX_LINE,
    VERSION,
    CountsChanged,
    Drain,
    Draining,
    FastPathState,
    HeapProfileRequest,
    Heartbeat,
    Histogram,
    KillSession,
    Message,
    MetricsSnapshot,
    Offence,
    Offences,
    OthersChanged,
    Penalties,
    PoolStats,
    ProtocolError,
    Ready,
    Reply,
    SessionClosed,
    SessionStats,
    StartupTable,
    Stop,
    TaskDumpRequest,
    ToMaster,
    ToWorker,
    WorkerStats,
    decode,
    encode,
    from_master,
    from_worker,
)
from kilnproxy.policy.penalty import Lifted, Penalised, PenaltyEvent, TableFull

STATS = WorkerStats(
    index=1, pid=4242, started_at=1700000000.5, sessions=2, sessions_total=9, tasks=30, fds=40,
    rss=50_000_000, heap=3_000_000, accepting=True, backend_connections=1,
    fast_path=FastPathState.UNSUPPORTED,
)  # fmt: skip
ROW = SessionStats(
    session="0badf00d", remote_addr="127.0.0.1:50000", login="git", account="aviato",
    user="alice", key_name="alice's laptop", key_fingerprint="SHA256:abc", repo="aviato/website",
    vcs="git", verb="git-upload-pack", backend=None, started_at=1700000001.25, duration=3.5,
    bytes_in=120, bytes_out=45_000, state="authenticated",
)  # fmt: skip


def histogram(*observations: int) -> Histogram:
    counts = [0] * (len(BUCKETS) + 1)
    for bucket in observations:
        counts[bucket] += 1
    return Histogram(tuple(counts), 0.01 * len(observations))


METRICS = MetricsSnapshot(
    outcomes={"ok": 3, "denied": 1}, bytes_in=10, bytes_out=20,
    refusals={"max_startups_per_source": 50, "penalty": 2},
    auth_lookup=histogram(0, 0, 3), route_lookup=histogram(1), backend_dial=histogram(14),
)  # fmt: skip
BEAT = Heartbeat(STATS, METRICS, {"storage": PoolStats(2, 3, 4)}, (ROW,))
NET4, NET6 = ipaddress.ip_network("192.0.2.0/24"), ipaddress.ip_network("2001:db8:1::/64")
PENALISED = Penalised(NET4, 1234.5, PenaltyEvent.AUTHFAIL)
PENALTIES = Penalties((PENALISED,), (Lifted(NET6),), (TableFull(6, 99.0),))

EVERY_MESSAGE: list[Message] = [
    Ready(pid=4242),
    BEAT,
    Heartbeat(STATS, MetricsSnapshot(), {}, ()),
    Draining(),
    SessionClosed(("0badf00d", "1badf00d")),
    Reply(7, data={"tasks": [{"name": "x", "stack": ["a:1"]}], "sessions": []}),
    Reply(8, error="worker 0 failed: boom"),
    Drain(stopping=True),
    Drain(stopping=False),
    Stop(),
    KillSession("0badf00d"),
    TaskDumpRequest(9),
    HeapProfileRequest(10, top=25, seconds=60.0, stop=False, peek=True),
    CountsChanged({"aviato": 1}),
    CountsChanged({"aviato": -1, "hooli": 2}),  # what ended: negative counts
    Offences((Offence(ipaddress.ip_address("192.0.2.7"), PenaltyEvent.NOAUTH),
              Offence(ipaddress.ip_address("2001:db8::1"), PenaltyEvent.GRACE_EXCEEDED))),
    OthersChanged({}),
    OthersChanged({"aviato": 2}),
    PENALTIES,
    Penalties(),
]  # fmt: skip


@pytest.mark.parametrize("message", EVERY_MESSAGE, ids=lambda m: type(m).__name__)
def test_every_message_survives_the_wire(message: Message) -> None:
    line = encode(message)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert json.loads(line)["v"] == VERSION
    assert decode(line) == message


def body(message: Message) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(encode(message))
    return data


def line_of(data: dict[str, Any]) -> bytes:
    return json.dumps(data).encode() + b"\n"


def with_stats(**changes: Any) -> bytes:
    data = body(BEAT)
    data["stats"].update(changes)
    return line_of(data)


def penalised(netblock: object) -> bytes:
    data = body(PENALTIES)
    data["penalised"][0]["netblock"] = netblock
    return line_of(data)


def offence(address: object, event: str) -> bytes:
    data = {"v": VERSION, "kind": "offences", "offences": [{"address": address, "event": event}]}
    return line_of(data)


def without(key: str) -> bytes:
    data = body(BEAT)
    del data["stats"][key]
    return line_of(data)


@pytest.mark.parametrize(
    ("line", "says"),
    [
        (b'{"v": 1, "kind": "ready", "pid": 1}\n', "not a version 6"),
        (b'{"v": 2, "kind": "ready", "pid": 1}\n', "not a version 6"),
        (b'{"v": 3, "kind": "ready", "pid": 1}\n', "not a version 6"),
        (b'{"v": 4, "kind": "ready", "pid": 1}\n', "not a version 6"),
        (b'{"v": 5, "kind": "ready", "pid": 1}\n', "not a version 6"),
        (b'{"kind": "ready", "pid": 1}\n', "not a version 6"),
        (b'{"v": 6, "kind": "nope"}\n', "no such kind"),
        (b"[]\n", "not a version 6"),
        (b"garbage\n", "not JSON"),
        (b'{"v": 6, "kind": "ready", "pid": \xff}\n', "not JSON"),
        (b"[" * 100_000 + b"\n", "not JSON"),
        (b'{"v": 6, "kind": "ready"}\n', "ready: missing ['pid']"),
        (b'{"v": 6, "kind": "ready", "pid": 1, "extra": 0}\n', "unexpected ['extra']"),
        (b'{"v": 6, "kind": "ready", "pid": "1"}\n', "ready.pid: str is not int"),
        (b'{"v": 6, "kind": "ready", "pid": true}\n', "ready.pid: bool is not int"),
        (b'{"v": 6, "kind": "ready", "pid": 1.5}\n', "ready.pid: float is not int"),
        (with_stats(rss=None), "heartbeat.stats.rss: NoneType is not int"),
        (with_stats(accepting=1), "heartbeat.stats.accepting: int is not bool"),
        (without("heap"), "heartbeat.stats: missing ['heap']"),
        (with_stats(fast_path="fast"), "heartbeat.stats.fast_path: 'fast' is not a FastPathState"),
        (with_stats(fast_path=None), "heartbeat.stats.fast_path: None is not a FastPathState"),
        (b'{"v": 6, "kind": "reply", "id": 1, "data": null, "error": null}\n', "either data"),
        (b'{"v": 6, "kind": "reply", "id": 1, "data": [], "error": null}\n', "is not an object"),
        (penalised("192.0.2.1/24"), "penalties.penalised[0].netblock: 192.0.2.1/24 has host bits"),
        (penalised(3232235520), "penalties.penalised[0].netblock: int is not str"),
        (penalised("example.com"), "does not appear to be an IPv4 or IPv6 network"),
        (
            line_of({"v": VERSION, "kind": "counts_changed", "sessions": {"acme": "1"}}),
            "counts_changed.sessions.acme: str is not int",
        ),
        (offence("192.0.2.300", "authfail"), "offences.offences[0].address: '192.0.2.300'"),
        (
            offence("192.0.2.3", "timeout"),
            "offences.offences[0].event: 'timeout' is not a PenaltyEvent",
        ),
        (offence(3232235523, "authfail"), "offences.offences[0].address: int is not str"),
        (
            b'{"v": 6, "kind": "penalties", "penalised": [], "lifted": [], "table_full": '
            b'[{"version": 5, "until": 1.0}]}\n',
            "penalties.table_full[0]: IP version 5 is",
        ),
    ],
)
def test_malformed_lines_are_protocol_errors(line: bytes, says: str) -> None:
    with pytest.raises(ProtocolError, match=re.escape(says)):
        decode(line)


def test_nested_fields_are_checked_too() -> None:
    data = body(BEAT)
    data["metrics"]["auth_lookup"]["counts"] = [1, 2, 3]
    with pytest.raises(ProtocolError, match=r"heartbeat\.metrics\.auth_lookup: a histogram has 15"):
        decode(line_of(data))
    data = body(BEAT)
    data["sessions"][0]["account"] = 7
    with pytest.raises(ProtocolError, match=r"heartbeat\.sessions\[0\]\.account: int is not str"):
        decode(line_of(data))
    data = body(BEAT)
    data["pools"]["storage"] = {"connections": 1}
    with pytest.raises(ProtocolError, match=r"heartbeat\.pools\.storage: missing"):
        decode(line_of(data))


def test_an_int_is_a_fine_float() -> None:
    data = body(HeapProfileRequest(1, top=5, seconds=60.0, stop=False, peek=False))
    data["seconds"] = 60
    message = decode(line_of(data))
    assert isinstance(message, HeapProfileRequest)
    assert isinstance(message.seconds, float) and message.seconds == 60.0


def test_each_end_hears_only_the_other_side() -> None:
    assert from_worker(encode(BEAT)) == BEAT
    assert from_master(encode(Drain(stopping=True))) == Drain(stopping=True)
    with pytest.raises(ProtocolError, match="a worker does not send drain"):
        from_worker(encode(Drain(stopping=False)))
    with pytest.raises(ProtocolError, match="the master does not send heartbeat"):
        from_master(encode(BEAT))


def test_admission_goes_both_ways_each_its_own() -> None:
    counts, others = CountsChanged({"acme": 1}), OthersChanged({"acme": 1})
    assert from_worker(encode(counts)) == counts
    assert from_master(encode(others)) == others
    with pytest.raises(ProtocolError, match="a worker does not send others_changed"):
        from_worker(encode(others))
    with pytest.raises(ProtocolError, match="the master does not send counts_changed"):
        from_master(encode(counts))
    with pytest.raises(ProtocolError, match="the master does not send offences"):
        from_master(encode(Offences(())))


def test_penalties_keep_the_order_of_the_boxs_notices() -> None:
    """One message while the notices come in field order; a new one where they go back."""
    first, again = Lifted(NET4), Penalised(NET4, 2000.0, PenaltyEvent.NOAUTH)
    full = TableFull(4, 10.0)
    assert Penalties.of(()) == []
    assert Penalties.of((PENALISED, first, full)) == [Penalties((PENALISED,), (first,), (full,))]
    split = Penalties.of((PENALISED, first, again, full, first))
    assert split == [
        Penalties((PENALISED,), (first,)),
        Penalties((again,), (), (full,)),
        Penalties((), (first,)),
    ]
    notices = [n for message in split for n in message.notices()]
    assert notices == [PENALISED, first, again, full, first]


def test_a_host_under_attack_has_its_penalties_told_in_messages_a_worker_can_read() -> None:
    """60,000 penalised IPv6 sources, as a new worker is told them all when it joins: in
    messages under MAX_LINE (one line over it would break the channel), in the box's order."""
    penalised = tuple(
        Penalised(ipaddress.ip_network(f"2001:db8:{n >> 16:x}:{n & 0xFFFF:x}::/64"), 2e9,
                  PenaltyEvent.AUTHFAIL)
        for n in range(60_000)
    )  # fmt: skip
    messages = Penalties.of((*penalised, Lifted(NET4)))
    assert len(messages) == 7 and messages[-1] == Penalties((), (Lifted(NET4),))
    assert all(len(encode(message)) < MAX_LINE // 2 for message in messages)
    assert [n for m in messages for n in m.notices()] == [*penalised, Lifted(NET4)]
    assert from_master(encode(messages[-1])) == messages[-1]


def test_a_message_over_the_line_limit_is_not_sent(caplog: pytest.LogCaptureFixture) -> None:
    """The channel stays whole: the reader never meets a line it must give up on."""

    async def body() -> bytes:
        ours, theirs = socket.socketpair()
        with theirs:
            channel = await ToMaster.open(ours)
            channel.send(SessionClosed(tuple(f"{n:08x}" for n in range(MAX_LINE // 10))))
            channel.send(SessionClosed(("3f9c2a1b",)))
            await asyncio.sleep(0.05)
            channel.close()
            return theirs.recv(1 << 16)

    with caplog.at_level(logging.ERROR, logger="kilnproxy.control"):
        received = asyncio.run(body())
    assert from_worker(received) == SessionClosed(("3f9c2a1b",))
    assert re.fullmatch(r"control message session_close of \d+ bytes not sent: over the "
                        r"channel's 4194304", caplog.records[0].getMessage())  # fmt: skip


def test_histograms_and_snapshots_merge() -> None:
    merged = histogram(0, 3).merge(histogram(3, 14))
    assert merged.counts[0] == 1 and merged.counts[3] == 2 and merged.counts[14] == 1
    assert merged.total == pytest.approx(0.04)
    total = METRICS.merge(METRICS).merge(MetricsSnapshot())
    assert total.outcomes == {"ok": 6, "denied": 2}
    assert total.refusals == {"max_startups_per_source": 100, "penalty": 4}
    assert (total.bytes_in, total.bytes_out) == (20, 40)
    assert total.auth_lookup.counts[0] == 4 and total.backend_dial.counts[14] == 2
    assert METRICS.outcomes == {"ok": 3, "denied": 1}  # merging makes a new snapshot
    assert list(total.latencies()) == list(LATENCIES) == [
        "auth_lookup", "route_lookup", "backend_dial",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="15 buckets"):
        Histogram((1, 2))


def test_a_broken_peer_reads_as_gone() -> None:
    async def exchange() -> list[object]:
        ours, theirs = socket.socketpair()
        channel = await ToWorker.open(ours)
        theirs.sendall(encode(Ready(pid=1)) + b"garbage\n")
        received: list[object] = [await channel.receive(), await channel.receive()]
        channel.close()
        theirs.close()
        return received

    assert asyncio.run(exchange()) == [Ready(pid=1), None]


def test_a_peer_that_died_reads_as_gone_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    """A worker SIGKILLed while the master writes to it (the soak's HUP and kill at one moment):
    the channel reads as gone, logged as lost (a warning), not as a broken protocol (an error)."""

    async def exchange() -> object:
        ours, theirs = socket.socketpair()
        channel = await ToWorker.open(ours)
        theirs.close()
        for _ in range(50):  # the first writes may be buffered; one meets the closed end
            channel.send(KillSession("0badf00d"))
            await asyncio.sleep(0)
        received = await channel.receive()
        channel.close()
        return received

    assert asyncio.run(exchange()) is None
    levels = {r.levelname for r in caplog.records if r.name == "kilnproxy.control"}
    assert levels == {"WARNING"}, caplog.text
    assert "control channel lost" in caplog.text


def test_a_message_sent_the_wrong_way_breaks_the_channel() -> None:
    async def exchange() -> list[object]:
        ours, theirs = socket.socketpair()
        worker_end, master_end = await ToMaster.open(ours), await ToWorker.open(theirs)
        master_end.send(KillSession("0badf00d"))
        master_end.send(BEAT)  # a heartbeat is never the master's to send
        received: list[object] = [await worker_end.receive(), await worker_end.receive()]
        worker_end.close()
        master_end.close()
        return received

    assert asyncio.run(exchange()) == [KillSession("0badf00d"), None]


def test_the_startup_table_is_one_memory_for_whoever_maps_it() -> None:
    """The master's table and a worker's view of it (mapped again from the fd, as a worker
    does) are the same cells: a worker's count is seen at once, and cleared by the master."""
    master = StartupTable.create(slots=4, buckets=16)
    worker = StartupTable.attach(os.dup(master.fileno()))
    assert (worker.slots, worker.buckets) == (4, 16)
    net = ipaddress.ip_network("192.0.2.0/24")
    assert worker.buckets_of(net) == master.buckets_of(net)  # one key for the host
    buckets = worker.buckets_of(net)
    other = next(b for b in range(16) if b not in buckets)
    with worker.exclusive():
        worker.add(3, buckets, 2)
    worker.add(1, (other,), 1)
    assert (master.total(), master.from_source(buckets)) == (3, 2)
    master.clear(3)  # its worker is gone
    assert (worker.total(), worker.from_source(buckets)) == (1, 0)
    assert worker.in_bucket(other) == 1


def test_a_source_is_counted_exactly_beside_one_that_shares_a_bucket() -> None:
    """Sources that share one bucket of the sketch are still counted apart: each is the least
    of its two buckets. Only a source whose every bucket is full of others is over-counted,
    and never under-counted, whatever the others hold (a limit may refuse early, never late)."""
    table = StartupTable.create(slots=2, buckets=64)
    sources = [ipaddress.ip_network(f"10.1.{i // 256}.{i % 256}/32") for i in range(400)]
    by = {net: table.buckets_of(net) for net in sources}
    first = next(net for net in sources if len(by[net]) == 2)  # (one in 64 has one bucket)
    sharing = next(n for n in sources[1:] if set(by[n]) & set(by[first])
                   and not set(by[n]) <= set(by[first]))  # fmt: skip
    table.add(0, by[first], 10)
    table.add(1, by[sharing], 3)
    assert (table.from_source(by[first]), table.from_source(by[sharing])) == (10, 3)
    held = {net: (i * 7) % 5 for i, net in enumerate(sources)}  # many sources, all counted
    for i, (net, count) in enumerate(held.items()):
        table.add(i % 2, by[net], count)
    held[first] += 10
    held[sharing] += 3
    assert all(table.from_source(by[net]) >= count for net, count in held.items())
    assert table.total() == sum(held.values())


def test_a_file_that_is_not_a_startup_table_is_refused() -> None:
    fd = os.memfd_create("not-a-table")
    os.ftruncate(fd, 4096)
    with pytest.raises(ValueError, match="not a kilnproxy startup table"):
        StartupTable.attach(fd)
    os.close(fd)


def test_a_lock_held_too_long_is_gone_without(caplog: pytest.LogCaptureFixture) -> None:
    """Another process (a worker SIGSTOPped inside its decision) holds the table's lock: the
    accept path waits a bounded time, then decides without it, and says so once."""
    table = StartupTable.create(slots=2, buckets=4)
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import fcntl, time; fcntl.lockf({table.fileno()}, "
         "fcntl.LOCK_EX); print('held', flush=True); time.sleep(30)"],
        pass_fds=[table.fileno()], stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        started = time.monotonic()
        with table.exclusive() as locked:
            assert not locked
        assert time.monotonic() - started < 0.5
        with table.exclusive() as locked:
            assert not locked
        assert caplog.text.count("startup table locked over 50 ms") == 1
    finally:
        holder.kill()
        holder.communicate()
    with table.exclusive() as locked:  # its lock died with it
        assert locked
