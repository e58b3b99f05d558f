"""kilnproxy/ssh/fast_path.py's channel data path, against asyncssh's own, in one process.

asyncssh's channel and connection methods are run on small stand-ins that hold only what those
methods read and write: the stock channel flush (through send_packet) and the fast one must put
the same bytes on the wire for the same writes, windows and padding; the fast receive must
deliver what a data packet holds and hand anything else, untouched, to asyncssh's own path.
"""

from __future__ import annotations

import asyncio
import os
import random
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from asyncssh.channel import SSHChannel
from asyncssh.connection import SSHConnection
from asyncssh.constants import (
    EXTENDED_DATA_STDERR,
    MSG_CHANNEL_DATA,
    MSG_CHANNEL_EOF,
    MSG_CHANNEL_WINDOW_ADJUST,
)
from asyncssh.encryption import get_encryption, get_encryption_params
from asyncssh.logging import logger
from asyncssh.misc import ProtocolError
from asyncssh.packet import String, UInt32

from kilnproxy.control import FastPathState
from kilnproxy.ssh import fast_path
from kilnproxy.ssh.fast_path import _InputBuffer, apply

GCM = ["aes128-gcm@openssh.com", "aes256-gcm@openssh.com"]
PKTSIZE = 32768  # what OpenSSH's client asks for a session channel
TAG = 16


@pytest.fixture(autouse=True)
def fast() -> Iterator[None]:
    assert apply(True) is FastPathState.ON
    yield
    fast_path.remove()


@pytest.fixture(autouse=True)
def fixed_padding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Padding that depends on its length only, not the kernel: the same for both paths, which
    take it from os.urandom when they call it."""
    monkeypatch.setattr(os, "urandom", lambda size: bytes(range(256))[-size:])


def keys(alg: str) -> tuple[bytes, bytes, bytes]:
    key_size, iv_size, *_ = get_encryption_params(alg.encode(), b"")
    return alg.encode(), bytes(range(key_size)), bytes(range(100, 100 + iv_size))


class Transport:
    """What SSHConnection writes to: every write and writelines, in order."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def writelines(self, pieces: list[bytes]) -> None:
        self.writes.append(b"".join(pieces))

    @property
    def wire(self) -> bytes:
        return b"".join(self.writes)


@dataclass
class Connection:
    """An SSHConnection after key exchange and authentication, as send_packet sees it."""

    alg: str
    _transport: Transport = field(default_factory=Transport)
    _auth_complete: bool = True
    _kex_complete: bool = True
    _rekey_bytes_sent: int = 0
    _rekey_bytes: int = 1 << 30
    _rekey_seconds: float = 0.0
    _rekey_time: float = 0.0
    _compressor: object = None
    _decompressor: object = None
    _send_enchdrlen: int = 1  # AES-GCM's, as send_newkeys sets them
    _send_blocksize: int = 16
    _send_seq: int = 2**32 - 5  # wraps during the test
    _strict_kex: bool = True
    _deferred_packets: list[Any] = field(default_factory=list)
    _channels: dict[int, Any] = field(default_factory=dict)
    logger: Any = logger
    _send_encryption: Any = None

    def __post_init__(self) -> None:
        alg, key, iv = keys(self.alg)
        self._send_encryption = get_encryption(alg, key, iv, b"", b"", True)

    # asyncssh's own, as the fast path leaves or makes them
    send_packet = fast_path._send_packet
    _send = SSHConnection._send

    def log_sent_packet(self, *args: object) -> None:
        pass


@dataclass
class Channel:
    """An open SSHChannel with a peer window, as its write and flush see it."""

    _conn: Connection
    _send_window: int
    _send_pktsize: int = PKTSIZE
    _send_chan: int = 0x01020304
    _send_state: str = "open"
    _send_buf: list[Any] = field(default_factory=list)
    _send_buf_len: int = 0
    _encoding: str | None = None
    _write_datatypes: frozenset[int] = frozenset({EXTENDED_DATA_STDERR})
    logger: Any = logger

    send_packet = SSHChannel.send_packet

    def _pause_resume_writing(self) -> None:
        pass

    def log_sent_packet(self, *args: object) -> None:
        pass


WRITES = [
    (b"x" * 10, None),
    (random.randbytes(1 << 18), None),  # an agent frame: eight full packets
    (b"to stderr", EXTENDED_DATA_STDERR),
    (bytes(range(256)) * 200, None),  # 51200: a full packet and a short one
    (b"", None),
    (b"y" * (PKTSIZE - 9), None),
]


def run_writes(flush: Any, write: Any, alg: str, window: int) -> Connection:
    """The WRITES on one channel through `write` and `flush`, the peer granting `window`
    at a time until all is sent, then EOF."""
    conn = Connection(alg)
    channel = Channel(conn, window)
    channel._flush_send_buf = types.MethodType(flush, channel)  # type: ignore[attr-defined]
    for data, datatype in WRITES:
        write(channel, data, datatype)
    channel._send_state = "eof_pending"  # EOF goes out in the flush that empties the buffer
    while channel._send_buf or channel._send_state == "eof_pending":
        channel._send_window += window
        flush(channel)
    assert channel._send_state == "eof" and channel._send_buf_len == 0
    return conn


@pytest.mark.parametrize("window", [PKTSIZE, 100_000, 2 << 20])
@pytest.mark.parametrize("alg", GCM)
def test_a_flush_sends_what_asyncssh_would_send(alg: str, window: int) -> None:
    """Byte for byte: the stock write and flush (every packet through send_packet) against the
    fast ones, with windows that split writes at packet and odd boundaries."""
    stock = run_writes(fast_path._stock_flush_send_buf, fast_path._stock_channel_write, alg, window)
    fast = run_writes(fast_path._flush_send_buf, fast_path._write, alg, window)
    assert fast._transport.wire == stock._transport.wire
    assert (fast._send_seq, fast._rekey_bytes_sent) == (stock._send_seq, stock._rekey_bytes_sent)
    assert len(fast._transport.writes) < len(stock._transport.writes)  # one per flush, not packet
    if window > len(WRITES[1][0]):  # the frame's eight packets in one write
        assert any(len(write) > 8 * PKTSIZE for write in fast._transport.writes)


class Rekeying(Connection):
    """A connection whose own rekey limit is reached mid-flush: KEXINIT marks the wire, and
    what follows waits for the new keys (asyncssh defers it)."""

    def _send_kexinit(self) -> None:
        self._transport.write(b"<KEXINIT>")
        self._kex_complete = False


@pytest.mark.parametrize("window", [100_000, 2 << 20])
def test_a_rekey_reached_mid_flush_comes_after_the_packets_before_it(window: int) -> None:
    """What was gathered goes out before the KEXINIT, and the rest is deferred as asyncssh
    defers it: the same wire and the same deferred packets on both paths."""
    results = []
    paths: list[tuple[Any, Any]] = [
        (fast_path._stock_flush_send_buf, fast_path._stock_channel_write),
        (fast_path._flush_send_buf, fast_path._write),
    ]
    for flush, write in paths:
        conn = Rekeying(GCM[0], _rekey_bytes=100_000)
        channel = Channel(conn, window)
        channel._flush_send_buf = types.MethodType(flush, channel)  # type: ignore[attr-defined]
        for data, datatype in WRITES[:2]:
            write(channel, data, datatype)
        while channel._send_buf:
            channel._send_window += window
            flush(channel)
        wire = conn._transport.wire
        assert wire.count(b"<KEXINIT>") == 1 and wire.index(b"<KEXINIT>") > 100_000
        deferred = [(kind, b"".join(args)) for kind, args in conn._deferred_packets]
        results.append((wire, deferred, conn._send_seq, channel._send_buf_len))
    assert results[1] == results[0]
    assert results[0][1]  # some packets wait for the new keys


def test_a_rekey_due_sends_through_asyncssh(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a key exchange due, the data goes through send_packet, which starts it."""
    conn = Connection(GCM[0], _rekey_bytes=0)
    calls: list[int] = []
    monkeypatch.setattr(Connection, "send_packet", lambda self, kind, *a, **k: calls.append(kind))
    fast_path._flush_send_buf(_buffered(Channel(conn, 1 << 20), b"data"))  # type: ignore[arg-type]
    assert calls == [MSG_CHANNEL_DATA] and not conn._transport.writes


def _buffered(channel: Channel, data: bytes) -> Channel:
    channel._send_buf.append((memoryview(data), None))
    channel._send_buf_len += len(data)
    return channel


def _fast_channel(window: int) -> Channel:
    channel = Channel(Connection(GCM[0]), window)
    channel._flush_send_buf = types.MethodType(fast_path._flush_send_buf, channel)  # type: ignore[attr-defined]
    return channel


def test_a_view_of_bytes_is_kept_and_other_data_copied() -> None:
    channel = _fast_channel(0)  # no window: everything stays buffered
    kept, changing = b"bytes", bytearray(b"bytearray")
    fast_path._write(channel, kept)  # type: ignore[arg-type]
    fast_path._write(channel, changing)  # type: ignore[arg-type]
    changing[:] = b"changed!!"
    (view, _), (copy, _) = channel._send_buf
    assert view.obj is kept and bytes(copy) == b"bytearray"
    assert channel._send_buf_len == 14


def _granted(channel: Channel, size: int) -> list[int]:
    """The peer adjusts the window by `size`: the sizes of the writes that follow."""
    writes = channel._conn._transport.writes
    before = len(writes)
    channel._send_window += size
    fast_path._flush_send_buf(channel)  # type: ignore[arg-type]
    return [len(write) for write in writes[before:]]


HELD = fast_path.HOLD_PACKETS * PKTSIZE  # a window less than this, with more waiting, is held
OPENSSH_WINDOW = 1 << 21  # what OpenSSH's client gives a session channel


async def _run_out(channel: Channel) -> None:
    """A hold that runs out: an adjust too small to send on, then none for HOLD seconds."""
    assert _granted(channel, 8192) == []  # held
    await asyncio.sleep(fast_path.HOLD * 3)


def _adjusted(channel: Channel) -> None:
    """A hold that an adjust ends."""
    assert _granted(channel, 8192) == []  # held
    assert _granted(channel, HELD - 8192) != []  # the next adjust opens enough


def test_a_window_too_small_for_hold_packets_waits_for_more() -> None:
    asyncio.run(_a_window_too_small_for_hold_packets_waits_for_more())


async def _a_window_too_small_for_hold_packets_waits_for_more() -> None:
    """Adjusts of 8 KiB each, with more waiting than they open, go out as HOLD_PACKETS whole
    packets in one write; an adjust that is not followed by more goes out HOLD seconds later;
    what fits the window goes at once, and so does the end of the stream."""
    channel = _fast_channel(OPENSSH_WINDOW)
    fast_path._write(channel, random.randbytes(2 * OPENSSH_WINDOW))  # type: ignore[arg-type]
    assert channel._send_window == 0  # the first 2 MiB went, and set the peak
    one_packet = 4 + 16 + PKTSIZE + TAG  # length; padding length, type, channel, size, padding
    adjusts = HELD // 8192
    granted = [_granted(channel, 8192) for _ in range(adjusts)]
    assert granted == [[]] * (adjusts - 1) + [[fast_path.HOLD_PACKETS * one_packet]]
    assert _granted(channel, 8192) == []
    await asyncio.sleep(fast_path.HOLD * 3)
    assert channel._conn._transport.writes[-1].startswith((8192 + 16).to_bytes(4, "big"))
    assert channel._send_window == 0
    channel._send_state = "eof_pending"  # the end of the stream is never held
    assert _granted(channel, 8192) != [] and channel._send_window == 0
    channel._send_state = "open"
    rest = channel._send_buf_len
    assert len(_granted(channel, rest + 100)) == 1  # all that waits fits: sent
    assert channel._send_buf_len == 0 and channel._send_window == 100
    fast_path._write(channel, b"z" * 50)  # type: ignore[arg-type]
    assert channel._send_buf_len == 0  # fits the window: never held


def test_a_client_whose_holds_run_out_is_no_longer_held() -> None:
    asyncio.run(_a_client_whose_holds_run_out_is_no_longer_held())


async def _a_client_whose_holds_run_out_is_no_longer_held() -> None:
    """A client that adjusts only once data comes (libssh2, paramiko) lets every hold run out:
    after GIVE_UP of them, its adjusts are answered at once. One whose holds mostly end by an
    adjust (OpenSSH) is held on, though some run out."""
    lets_run_out = _fast_channel(OPENSSH_WINDOW)
    fast_path._write(lets_run_out, random.randbytes(2 * OPENSSH_WINDOW))  # type: ignore[arg-type]
    for _ in range(fast_path.GIVE_UP):
        await _run_out(lets_run_out)
    assert _granted(lets_run_out, 8192) != []
    adjusts = _fast_channel(OPENSSH_WINDOW)
    fast_path._write(adjusts, random.randbytes(8 * OPENSSH_WINDOW))  # type: ignore[arg-type]
    for _ in range(3 * fast_path.GIVE_UP):  # three holds ended by adjusts for each run out
        for _ in range(3):
            _adjusted(adjusts)
        await _run_out(adjusts)
    assert _granted(adjusts, 8192) == []


def test_holds_that_run_out_in_a_burst_do_not_end_holding() -> None:
    asyncio.run(_holds_that_run_out_in_a_burst_do_not_end_holding())


async def _holds_that_run_out_in_a_burst_do_not_end_holding() -> None:
    """An OpenSSH client's holds that run out bunch (most while its git starts): 4 at the start,
    then 12 ended by adjusts, then 4 more is 8 of 20 run out, but only 4 of the last 16, and
    the channel is held on. One more ended by an adjust, then four run out, and 8 of the last 16
    have: it is held no more."""
    channel = _fast_channel(OPENSSH_WINDOW)
    fast_path._write(channel, random.randbytes(8 * OPENSSH_WINDOW))  # type: ignore[arg-type]
    burst = fast_path.GIVE_UP // 2
    for _ in range(burst):
        await _run_out(channel)
    for _ in range(fast_path.RECENT - burst):
        _adjusted(channel)
    for _ in range(burst):
        await _run_out(channel)
    assert _granted(channel, 8192) == []  # still held
    assert _granted(channel, HELD) != []  # that hold ends by an adjust
    for _ in range(fast_path.GIVE_UP - burst):
        await _run_out(channel)
    assert _granted(channel, 8192) != []


def test_an_aborted_channel_sends_nothing_when_its_hold_runs_out() -> None:
    asyncio.run(_an_aborted_channel_sends_nothing_when_its_hold_runs_out())


async def _an_aborted_channel_sends_nothing_when_its_hold_runs_out() -> None:
    channel = _fast_channel(1 << 18)
    fast_path._write(channel, random.randbytes(1 << 19))  # type: ignore[arg-type]
    assert _granted(channel, 8192) == []
    channel._send_state = "closed"  # SSHChannel.abort: a close sent, no flush
    writes = len(channel._conn._transport.writes)
    await asyncio.sleep(fast_path.HOLD * 3)
    assert len(channel._conn._transport.writes) == writes


def test_a_small_window_is_never_held() -> None:
    """A client whose whole window is small (Dropbear's 24 KiB, adjusted 8 KiB at a time) gets
    every adjust answered at once: a quarter of its window is less than its adjusts."""
    channel = _fast_channel(24 * 1024)
    fast_path._write(channel, random.randbytes(1 << 17))  # type: ignore[arg-type]
    assert channel._send_window == 0
    assert all(_granted(channel, 8192) for _ in range(5))


# -- receiving -----------------------------------------------------------------------------------


@dataclass
class Receiver:
    """A channel as the fast receive delivers to it: its data, and the send window each of its
    flushes found (a window adjust flushes)."""

    _conn: Any = None
    _recv_state: str = "open"
    _recv_window: int = 1 << 20
    _send_window: int = 0
    received: list[bytes] = field(default_factory=list)
    flushes: list[int] = field(default_factory=list)
    logger: Any = logger

    def _accept_data(self, data: bytes) -> None:
        assert type(data) is bytes
        self.received.append(data)
        self._recv_window -= len(data)

    def _flush_send_buf(self) -> None:
        self.flushes.append(self._send_window)


@dataclass
class Incoming(Connection):
    """An SSHConnection receiving with AES-GCM; asyncssh's own _recv_pkthdr recorded."""

    _inpbuf: Any = None
    _recv_seq: int = 2**32 - 2
    _max_recv_pktlen: int = 35000 + 64
    _auth_final: bool = False
    _recv_encryption: Any = None
    stock_calls: list[bytes] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__post_init__()
        alg, key, iv = keys(self.alg)
        self._recv_encryption = get_encryption(alg, key, iv, b"", b"", True)
        self._inpbuf = _InputBuffer()

    def _recv_data(self) -> None:
        """SSHConnection._recv_data's loop, which data_received runs."""
        while self._inpbuf and fast_path._recv_pkthdr(self):  # type: ignore[arg-type]
            pass

    def internal_error(self) -> None:
        self.errors.append("internal error")

    def _send_disconnect(self, code: int, reason: str, lang: str) -> None:
        self.errors.append(f"disconnect {code}: {reason}")

    def _force_close(self, exc: Exception) -> None:
        self.errors.append("closed")

    def _stock_recv_pkthdr(self) -> bool:
        """Stands for asyncssh's path: records the packet, which must open with the nonce the
        fast path found it with (it took its nonce back)."""
        buffer = self._inpbuf
        size = 4 + int.from_bytes(buffer[:4], "big") + TAG
        plain = self._recv_encryption._cipher.unseal(buffer[:4], buffer[4:size])
        self.stock_calls.append(plain)
        del buffer[:size]
        self._recv_seq = (self._recv_seq + 1) & 0xFFFFFFFF
        return True


@pytest.fixture
def incoming(monkeypatch: pytest.MonkeyPatch) -> Incoming:
    monkeypatch.setattr(fast_path, "_stock_recv_pkthdr", Incoming._stock_recv_pkthdr)
    conn = Incoming(GCM[0])
    conn._channels[7] = Receiver(conn)
    return conn


def sealed(conn: Connection, kind: int, body: bytes) -> bytes:
    """A packet as the peer sends it: clear length, then sealed padding length, type, body,
    padding."""
    payload = bytes((kind,)) + body
    padlen = -(1 + len(payload)) % 16
    padlen += 16 if padlen < 4 else 0
    plain = bytes((padlen,)) + payload + bytes(padlen)
    header = len(plain).to_bytes(4, "big")
    return header + bytes(conn._send_encryption._cipher.seal(header, plain))


def data_packet(conn: Connection, channel: int, data: bytes) -> bytes:
    return sealed(conn, MSG_CHANNEL_DATA, UInt32(channel) + String(data))


def receive(conn: Incoming, wire: bytes, step: int) -> None:
    """`wire` arriving `step` bytes at a time, as SSHConnection._recv_data runs its handler."""
    for start in range(0, len(wire), step):
        conn._inpbuf += wire[start : start + step]
        while conn._inpbuf and fast_path._recv_pkthdr(conn):  # type: ignore[arg-type]
            pass


@pytest.mark.parametrize("step", [1000, 32 * 1024 + 7, 1 << 20])
def test_data_packets_are_delivered_and_others_left_to_asyncssh(
    incoming: Incoming, step: int
) -> None:
    """Data for an open channel and a window adjust are delivered, whole packets only, across
    any read boundary; another packet, an unknown channel or a bad length goes to asyncssh's
    path with its nonce given back, in order; the sequence number counts every packet."""
    peer = Connection(GCM[0])  # the same keys: what it seals, `incoming` opens
    chunks = [random.randbytes(n) for n in (1, 5000, 32768, 77)]
    adjust = UInt32(7) + UInt32(1 << 20)
    wire = b"".join([
        data_packet(peer, 7, chunks[0]),
        sealed(peer, MSG_CHANNEL_WINDOW_ADJUST, adjust),
        data_packet(peer, 7, chunks[1]),
        data_packet(peer, 8, b"no such channel"),
        data_packet(peer, 7, chunks[2]),
        sealed(peer, MSG_CHANNEL_DATA, UInt32(7) + UInt32(10) + b"short"),  # length lies
        data_packet(peer, 7, chunks[3]),
        sealed(peer, MSG_CHANNEL_EOF, UInt32(7)),
        sealed(peer, MSG_CHANNEL_WINDOW_ADJUST, adjust + b"!"),  # one byte too many
    ])  # fmt: skip
    receive(incoming, wire, step)
    channel = incoming._channels[7]
    assert channel.received == chunks
    assert channel.flushes == [1 << 20]
    assert [plain[1] for plain in incoming.stock_calls] == [
        MSG_CHANNEL_DATA, MSG_CHANNEL_DATA, MSG_CHANNEL_EOF, MSG_CHANNEL_WINDOW_ADJUST,
    ]  # fmt: skip
    assert incoming._recv_seq == (2**32 - 2 + 9) & 0xFFFFFFFF
    assert not incoming._inpbuf and incoming._auth_final


def adjust_packet(conn: Connection, channel: int, size: int) -> bytes:
    return sealed(conn, MSG_CHANNEL_WINDOW_ADJUST, UInt32(channel) + UInt32(size))


def test_a_window_overrun_and_a_closed_channel_go_to_asyncssh(incoming: Incoming) -> None:
    peer = Connection(GCM[0])
    channel = incoming._channels[7]
    channel._recv_window = 10
    receive(incoming, data_packet(peer, 7, b"eleven byte"), 1 << 16)
    channel._recv_window, channel._recv_state = 1 << 20, "close_pending"
    receive(incoming, data_packet(peer, 7, b"late"), 1 << 16)
    receive(incoming, adjust_packet(peer, 7, 100), 1 << 16)  # asyncssh's handler refuses it
    assert channel.received == [] and channel.flushes == []
    assert len(incoming.stock_calls) == 3


def test_the_adjusts_of_one_read_are_flushed_once(incoming: Incoming) -> None:
    """A client behind its git adjusts every 8 KiB, and one read brings dozens: the channel is
    flushed once, after the read, with their sum. An adjust taken outside a read (after one of
    asyncssh's async handlers) is flushed at once; a channel gone by the read's end is not."""
    peer = Connection(GCM[0])
    channel = incoming._channels[7]
    adjusts = b"".join(adjust_packet(peer, 7, 8192) for _ in range(5))
    fast_path._data_received(incoming, adjusts)  # type: ignore[arg-type]
    assert channel.flushes == [5 * 8192]
    receive(incoming, adjust_packet(peer, 7, 100), 1 << 16)
    assert channel.flushes == [5 * 8192, 5 * 8192 + 100]
    gone = Receiver()  # its _conn is no longer the connection: closed after its adjust
    incoming._channels[8] = gone
    fast_path._data_received(incoming, adjust_packet(peer, 8, 4096))  # type: ignore[arg-type]
    assert gone._send_window == 4096 and gone.flushes == []
    assert not incoming._inpbuf and not incoming.stock_calls and not incoming.errors


@pytest.mark.parametrize(
    ("raised", "answer"),
    [(ProtocolError("bad"), ["disconnect 2: bad", "closed"]), (ValueError(), ["internal error"])],
)
def test_a_deferred_flush_that_raises_ends_the_connection_as_asyncssh_would(
    incoming: Incoming, raised: Exception, answer: list[str]
) -> None:
    def flush() -> None:
        raise raised

    incoming._channels[7]._flush_send_buf = flush
    fast_path._data_received(incoming, adjust_packet(Connection(GCM[0]), 7, 100))  # type: ignore[arg-type]
    assert incoming.errors == answer


def test_no_padding_goes_to_asyncssh(incoming: Incoming) -> None:
    """A padding length of 0 leaves asyncssh no payload (it hangs up): not taken here."""
    peer = Connection(GCM[0])
    payload = bytes((MSG_CHANNEL_DATA,)) + UInt32(7) + String(b"x" * 6)  # 15 + 1: no padding
    plain = bytes((0,)) + payload
    header = len(plain).to_bytes(4, "big")
    receive(incoming, header + peer._send_encryption._cipher.seal(header, plain), 1 << 16)
    assert incoming._channels[7].received == [] and len(incoming.stock_calls) == 1


def test_a_tampered_packet_goes_to_asyncssh_with_its_nonce(incoming: Incoming) -> None:
    """asyncssh's own path then fails it ("MAC verification failed") at the same nonce."""
    tampered = bytearray(data_packet(Connection(GCM[0]), 7, b"payload"))
    tampered[10] ^= 1
    receive(incoming, bytes(tampered), 1 << 16)
    assert incoming.stock_calls == [None] and incoming._channels[7].received == []
