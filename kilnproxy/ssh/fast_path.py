"""kilnproxy's per-packet path for the pinned asyncssh (issue 13): seven replacements, one owner.

asyncssh spends most of a relay's CPU on a few methods that run once per SSH packet. This module
replaces them, in this process only, with versions that put the same data on the wire:

1. `SSHConnection.send_packet` no longer sends an empty MSG_IGNORE before every packet once keys
   are in use, unless the cipher is CBC (kilnproxy never offers one, but asyncssh can do it);
2. `GCMEncryption.new` gives a cipher that builds one AESGCM per key and direction, not one per
   packet, and a decrypt_packet that joins a packet's pieces once;
3. `SSHConnection.data_received` keeps the input buffer as a bytearray consumed from the front,
   instead of bytes re-sliced (a copy of the whole rest of a read) once per header and packet;
4. `ChachaEncryption.new` gives a cipher that takes the Poly1305 key and the payload from one
   ChaCha20 stream per packet, instead of a stream for each;
5. `SSHChannel.write` and `SSHChannel._flush_send_buf` keep written bytes as a view, build each
   AES-GCM channel data packet in one step (one copy of the data where asyncssh makes ten), and
   write all the packets of one flush with one writev, where asyncssh writes each; and a window
   too small for HOLD_PACKETS whole packets, with more waiting, waits a moment for more
   (`_holds`), where asyncssh sends what it allows at once, whatever the cipher;
6. `SSHConnection._recv_pkthdr` opens a whole AES-GCM channel data packet in the input buffer and
   hands the channel its data with one copy, where asyncssh makes six; a window adjust goes
   straight to its channel too, and what the adjusts of one read open is sent once, after the
   read's last packet, where asyncssh flushes the channel once per adjust.

5 and 6 take only the common case (keys in use, no key exchange due, no compression, no packet
logging, a data packet asyncssh would accept as it stands); anything else goes through
asyncssh's own code, unchanged.

bench/asyncssh-hotpath.patch is the same change as a patch to asyncssh, offered upstream (5 and 6
there in asyncssh's own structure, with some more copies): once a release carries it, pin that
release and reduce this module to what the release lacks.

Rules: it applies only to the asyncssh version it was tested against (`PINNED_ASYNCSSH`, which
constraints.txt pins; a unit test holds them equal), and any other version runs stock asyncssh
after one warning. It never changes what is on the wire but the absent MSG_IGNORE and how a
slow client's data is cut into packets (fewer, whole ones: `_holds`), nor what asyncssh does on
an error (a packet that fails its MAC still ends the connection with
"MAC verification failed"). `apply` runs once at worker start, before any connection exists.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, cast

import asyncssh
from asyncssh.channel import SSHChannel
from asyncssh.connection import SSHConnection
from asyncssh.constants import (
    MSG_CHANNEL_DATA,
    MSG_CHANNEL_EOF,
    MSG_CHANNEL_EXTENDED_DATA,
    MSG_CHANNEL_WINDOW_ADJUST,
    MSG_IGNORE,
    MSG_KEX_LAST,
)
from asyncssh.crypto.chacha import _CTR_0, _POLY1305_KEYBYTES, ChachaCipher, chacha20
from asyncssh.crypto.cipher import GCMCipher
from asyncssh.encryption import BasicEncryption, ChachaEncryption, Encryption, GCMEncryption
from asyncssh.misc import DisconnectError
from asyncssh.packet import SSHPacketLogger, String, UInt32
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.ciphers.algorithms import ChaCha20
from cryptography.hazmat.primitives.ciphers.modes import CBC
from cryptography.hazmat.primitives.poly1305 import Poly1305

from kilnproxy.control import FastPathState

PINNED_ASYNCSSH = "2.24.1"

log = logging.getLogger("kilnproxy.fast_path")


@dataclass
class _Applied:
    state: FastPathState = FastPathState.NOT_APPLIED


_applied = _Applied()


def fast_path_state() -> FastPathState:
    """This process's state, which its worker reports in every heartbeat (WorkerStats)."""
    return _applied.state


# -- 1. no MSG_IGNORE before each packet ---------------------------------------------------------

_stock_send_packet = SSHConnection.send_packet
_DROP_IGNORE = "_kilnproxy_drop_ignore"


def _chained_iv(encryption: Encryption) -> bool:
    """CBC: a packet's IV is the last cipher block of the packet before it, known in advance."""
    return isinstance(encryption, BasicEncryption) and isinstance(
        encryption._cipher._cipher.mode, CBC
    )


def _send_packet(
    self: SSHConnection, pkttype: int, *args: bytes, handler: SSHPacketLogger | None = None
) -> None:
    """send_packet, without the empty MSG_IGNORE asyncssh sends ahead of every packet of type
    above MSG_KEX_LAST once keys are in use (by calling send_packet from inside send_packet).
    That is the countermeasure for CBC's predictable IV; with a nonce or a counter per packet
    (GCM, ChaCha20-Poly1305, CTR) it protects nothing, and it doubles the packets encrypted and
    written. Rather than copy asyncssh's send_packet, the connection is marked while it runs for
    such a packet, and the one MSG_IGNORE it sends from inside itself is dropped here."""
    if pkttype == MSG_IGNORE and getattr(self, _DROP_IGNORE, False):
        setattr(self, _DROP_IGNORE, False)
        return
    encryption = self._send_encryption
    if pkttype <= MSG_KEX_LAST or encryption is None or _chained_iv(encryption):
        _stock_send_packet(self, pkttype, *args, handler=handler)
        return
    setattr(self, _DROP_IGNORE, True)
    try:
        _stock_send_packet(self, pkttype, *args, handler=handler)
    finally:  # also when the packet was deferred (a rekey) and no MSG_IGNORE came
        setattr(self, _DROP_IGNORE, False)


# -- 2. one AESGCM per key and direction ---------------------------------------------------------

_GCM_TAG = 16
_INVOCATION_MASK = (1 << 64) - 1


class _GCMCipher(GCMCipher):
    """GCMCipher with one AESGCM per key and direction: asyncssh builds one per packet, and
    making one costs about as much as encrypting 6 KiB with it, twice a small packet's whole
    encryption. The nonce is the same (RFC 5647: a 4-byte fixed field, then a 64-bit invocation
    counter that wraps), kept as an integer."""

    def __init__(self, cipher_name: str, key: bytes, iv: bytes) -> None:
        # GCMCipher.__init__ is not called: it would keep a key and an IV this class never reads.
        self._aead = AESGCM(key)
        self._fixed = iv[:4]
        self._invocation = int.from_bytes(iv[4:], "big")

    def _next_nonce(self) -> bytes:
        nonce = self._fixed + self._invocation.to_bytes(8, "big")
        self._invocation = (self._invocation + 1) & _INVOCATION_MASK
        return nonce

    def seal(self, header: bytes, plain: bytes) -> bytes:
        """The packet after its clear length `header`: ciphertext, then the tag."""
        return self._aead.encrypt(self._next_nonce(), plain, header)

    def unseal(self, header: bytes, sealed: bytes | memoryview) -> bytes | None:
        nonce = self._next_nonce()  # advanced on failure too, as asyncssh does
        try:
            return self._aead.decrypt(nonce, sealed, header)
        except InvalidTag:
            return None  # asyncssh answers MAC verification failed, and disconnects

    def rewind(self) -> None:
        """Take back the last nonce: a packet opened ahead is opened again by asyncssh (a
        nonce may be used twice to open the same packet, never to seal two)."""
        self._invocation = (self._invocation - 1) & _INVOCATION_MASK

    def encrypt_and_sign(self, header: bytes, data: bytes) -> tuple[bytes, bytes]:
        sealed = self.seal(header, data)
        return header + sealed[:-_GCM_TAG], sealed[-_GCM_TAG:]

    def verify_and_decrypt(self, header: bytes, data: bytes, mac: bytes) -> bytes | None:
        return self.unseal(header, data + mac)


class _GCMEncryption(GCMEncryption):
    """GCMEncryption whose decrypt_packet joins the packet's three pieces once (asyncssh joins
    the first block's rest and the rest, then that and the tag)."""

    _cipher: _GCMCipher

    def decrypt_packet(
        self, seq: int, first: bytes, rest: bytes, header_len: int, mac: bytes
    ) -> bytes | None:
        return self._cipher.unseal(first[:header_len], b"".join((first[header_len:], rest, mac)))


def _gcm_new(
    cls: type[GCMEncryption],
    cipher_name: str,
    key: bytes,
    iv: bytes,
    mac_alg: bytes = b"",
    mac_key: bytes = b"",
    etm: bool = False,
) -> GCMEncryption:
    return _GCMEncryption(_GCMCipher(cipher_name, key, iv))


# -- 3. the input buffer consumed from the front -------------------------------------------------

_stock_data_received = SSHConnection.data_received


class _InputBuffer(bytearray):
    """SSHConnection._inpbuf as a bytearray consumed from the front.

    asyncssh keeps the buffer as bytes and drops what it parsed with `_inpbuf = _inpbuf[n:]`,
    which copies all the rest of a read (up to 256 KiB) once per packet header and once per
    packet. Its parsers (_recv_version, _recv_pkthdr, _recv_packet) take two kinds of slice:
    bounded ones (`[:n]`, `[a:b]`), whose bytes they keep, and open-ended ones (`[n:]`), which
    they only ever assign back to `_inpbuf`. So a bounded slice is bytes, as before, and an
    open-ended one drops n bytes in place (CPython moves a bytearray's start: no copy) and is
    this same buffer.
    """

    def __getitem__(self, key: Any) -> Any:
        if not isinstance(key, slice):
            return super().__getitem__(key)
        if key.start is not None and key.stop is None and key.step is None:
            del self[: key.start]
            return self
        with memoryview(self) as view:  # one copy, where bytes(self[key]) makes two
            return bytes(view[key])


_ADJUSTED = "_kilnproxy_adjusted"  # channels whose window grew in this read, not yet flushed


@contextlib.contextmanager
def _answered_as_asyncssh(conn: SSHConnection) -> Iterator[None]:
    """What the block raises is answered as SSHConnection._recv_data answers what a packet's
    handler raised: a flush moved out of a packet's handling ends the connection as it would
    have there."""
    try:
        yield
    except DisconnectError as exc:
        conn._send_disconnect(exc.code, exc.reason, exc.lang)
        conn._force_close(exc)
    except Exception:
        conn.internal_error()


def _data_received(self: SSHConnection, data: bytes, datatype: int | None = None) -> None:
    """data_received, appending to an `_InputBuffer`: asyncssh resets `_inpbuf` to bytes when
    a connection is made or cleaned up, so the buffer is wrapped on first use.

    The channels whose window the read's adjusts opened (`_window_adjust`) are flushed once,
    after the read's last packet."""
    buffer: Any = self._inpbuf
    if type(buffer) is not _InputBuffer:
        buffer = _InputBuffer(buffer)
        self._inpbuf = buffer
    buffer += data
    adjusted: list[SSHChannel[Any]] = []
    setattr(self, _ADJUSTED, adjusted)
    try:
        self._recv_data()
    finally:
        setattr(self, _ADJUSTED, None)
    with _answered_as_asyncssh(self):
        for channel in adjusted:
            if channel._conn is self:  # else it closed after its adjust
                channel._flush_send_buf()


# -- 4. ChaCha20-Poly1305 with one stream per packet ---------------------------------------------

_BLOCK_0 = bytes(64)


class _ChachaCipher(ChachaCipher):
    """ChachaCipher with one ChaCha20 stream per packet for the main key: block 0 gives the
    Poly1305 key and the payload is processed from block 1 on (OpenSSH's PROTOCOL.chacha20poly1305),
    where asyncssh starts a stream for each, and joins header and payload once more. The output
    is byte for byte the same."""

    def _main_stream(self, nonce: bytes) -> tuple[CipherContext, bytes]:
        stream = Cipher(ChaCha20(self._key, _CTR_0 + nonce), mode=None).encryptor()
        return stream, stream.update(_BLOCK_0)[:_POLY1305_KEYBYTES]

    def encrypt_and_sign(self, header: bytes, data: bytes, nonce: bytes) -> tuple[bytes, bytes]:
        stream, poly_key = self._main_stream(nonce)
        packet = chacha20(self._adkey, header, nonce, 0) + stream.update(data)
        return packet, Poly1305.generate_tag(poly_key, packet)

    def verify_and_decrypt(
        self, header: bytes, data: bytes, nonce: bytes, tag: bytes
    ) -> bytes | None:
        stream, poly_key = self._main_stream(nonce)
        try:
            Poly1305.verify_tag(poly_key, header + data, tag)
        except InvalidSignature:
            return None  # asyncssh answers MAC verification failed, and disconnects
        return stream.update(data)


def _chacha_new(
    cls: type[ChachaEncryption],
    cipher_name: str,
    key: bytes,
    iv: bytes,
    mac_alg: bytes = b"",
    mac_key: bytes = b"",
    etm: bool = False,
) -> ChachaEncryption:
    return cls(_ChachaCipher(key))


# -- 5. channel data: no copy on write, each packet built once, one writev per flush -------------

_DATA = bytes((MSG_CHANNEL_DATA,))
_stock_flush_send_buf = SSHChannel._flush_send_buf
_stock_channel_write = SSHChannel.write
# What a channel's send buffer holds: asyncssh's own bytearrays, or views of bytes (`_write`).
_Pending = bytearray | memoryview


def _write(self: SSHChannel[Any], data: Any, datatype: int | None = None) -> None:
    """SSHChannel.write for stdout, keeping bytes as a view of themselves where asyncssh copies
    every write into a bytearray (bytes cannot change, so a view is as safe as a copy)."""
    if (
        type(data) is not bytes
        or datatype is not None
        or not data
        or self._send_state != "open"
        or self._encoding
    ):
        _stock_channel_write(self, data, datatype)  # stderr, text, errors: asyncssh's
        return
    self.logger.debug2("Sending %d data byte%s", len(data), "s" if len(data) > 1 else "")
    _send_buffer(self).append((memoryview(data), datatype))
    self._send_buf_len += len(data)
    self._flush_send_buf()


def _sealing_cipher(conn: SSHConnection) -> _GCMCipher | None:
    """The connection's AES-GCM cipher if a channel data packet may be built here: when what
    send_packet would do with it is exactly number, pad, seal and write it (keys in use, no
    key exchange due or running, no compression, no packet logging)."""
    encryption = conn._send_encryption
    if (
        not isinstance(encryption, _GCMEncryption)
        or not (conn._kex_complete and conn._auth_complete)
        or conn._compressor is not None
        or conn._rekey_bytes_sent >= conn._rekey_bytes
        or (conn._rekey_seconds and time.monotonic() >= conn._rekey_time)
        or conn.logger._debug_level >= 3
    ):
        return None
    return encryption._cipher


def _data_packet(
    conn: SSHConnection, cipher: _GCMCipher, channel: bytes, data: memoryview
) -> tuple[bytes, bytes]:
    """One MSG_CHANNEL_DATA packet as send_packet would send it, as its clear length and its
    sealed rest: one copy of the data where asyncssh makes ten."""
    size = len(data)
    payload = 9 + size  # type, recipient channel, data length, data
    padlen = -(conn._send_enchdrlen + payload) % conn._send_blocksize
    if padlen < 4:
        padlen += conn._send_blocksize
    pktlen = 1 + payload + padlen
    header = pktlen.to_bytes(4, "big")
    plain = b"".join(
        (bytes((padlen,)), _DATA, channel, size.to_bytes(4, "big"), data, os.urandom(padlen))
    )
    conn._send_seq = (conn._send_seq + 1) & 0xFFFFFFFF
    conn._rekey_bytes_sent += pktlen
    return header, cipher.seal(header, plain)


def _write_packets(conn: SSHConnection | None, packets: list[bytes]) -> None:
    """Write what `_data_packet` built, in one writev; as SSHConnection._send, nothing once
    the transport is gone."""
    transport = conn._transport if conn is not None else None
    if packets and transport:
        with contextlib.suppress(ConnectionError):
            transport.writelines(packets)


# A window too small for HOLD_PACKETS whole packets, while more is waiting than it takes, is held
# for more adjusts (`_holds`), for at most HOLD seconds; a channel is not held again once GIVE_UP
# of its last RECENT holds have run out.
HOLD = 0.002
HOLD_PACKETS = 4
GIVE_UP = 8
RECENT = 2 * GIVE_UP
_HOLD_STATE = "_kilnproxy_hold"  # a channel's _HoldState


@dataclass(slots=True)
class _HoldState:
    peak: int = 0  # the largest send window the channel has had
    timer: asyncio.TimerHandle | None = None  # ends the hold under way
    recent: int = 0  # how the last RECENT holds ended, the newest in bit 0: 1 if it ran out

    def ended(self, ran_out: bool) -> None:
        self.recent = ((self.recent << 1) | ran_out) & ((1 << RECENT) - 1)

    def given_up(self) -> bool:
        """Some clients adjust only once they have data to read: libssh2 and paramiko read
        their socket only when it is readable, and a hold ends by its timer for them, nearly
        every time. Once GIVE_UP of a channel's last RECENT holds have run out, its adjusts are
        answered at once, as asyncssh answers them, for the rest of the channel.

        Half of the last RECENT, not a quarter of all so far (the rule before): an OpenSSH
        client lets a few in a hundred run out (Go's client two or three), but they bunch, most
        at the start of a transfer while its git starts, and under that rule one of five large
        clones through an agent stopped being held after 8 of its first 23 had run out, for the
        rest of the clone (the README's figures). A bunch of 8 in 16 later on now ends holding,
        where a quarter of all might not have: a client that has stopped adjusting as it reads
        is not held on for what it once did."""
        return self.recent.bit_count() >= GIVE_UP


def _holds(channel: SSHChannel[Any]) -> bool:
    """Whether to wait for more window before sending: the sender's half of TCP's silly window
    avoidance (RFC 1122 4.2.3.4), for SSH channels.

    A client whose git reads slower than the transfer adjusts the window for every 8 KiB it
    passes on. Answering each at once is one 8 KiB packet and one write per adjust, a ping-pong
    that costs the proxy and the client a wakeup and a packet per 8 KiB; OpenSSH's sshd, which
    is busy elsewhere meanwhile, answers several at once. So while the window is less than
    HOLD_PACKETS whole packets (or a quarter of the largest window the client has given, when
    that is smaller) and more is waiting than the window takes, nothing is sent: the client,
    which holds the rest of its window unread or unacknowledged, adjusts again as it reads. A
    client that does not gets what the window allows HOLD seconds later, and is soon not held at
    all (`_HoldState.given_up`).

    Four packets, not one: an OpenSSH client (2 MiB window) then gets writes of 128 KiB or more,
    not 32 KiB, and fewer of them, for 1 to 3 holds in 100 that run out (the README's figures).
    With eight, enough ran out to give up (under the rule before `_HoldState.recent`)."""
    state: _HoldState | None = getattr(channel, _HOLD_STATE, None)
    if state is None:
        state = _HoldState()
        setattr(channel, _HOLD_STATE, state)
    window = channel._send_window
    state.peak = max(state.peak, window)
    if (
        channel._send_state == _OPEN
        and 0 < window < min(HOLD_PACKETS * channel._send_pktsize, state.peak // 4)
        and channel._send_buf_len > window
        and not state.given_up()
    ):
        if state.timer is None:
            loop = asyncio.get_running_loop()
            state.timer = loop.call_later(HOLD, _end_hold, channel, state)
        return True
    if state.timer is not None:  # an adjust came, or the channel ends: no need to wait on
        state.timer.cancel()
        state.timer = None
        state.ended(ran_out=False)
    return False


def _end_hold(channel: SSHChannel[Any], state: _HoldState) -> None:
    """No adjust came for HOLD seconds: send what the window allows."""
    state.timer = None
    state.ended(ran_out=True)
    conn = channel._conn
    # Anything but an abort that ends "open" flushes first, which ends the hold.
    if conn is not None and channel._send_state == _OPEN:
        with _answered_as_asyncssh(conn):
            _flush_send_buf(channel, hold=False)


def _flush_send_buf(self: SSHChannel[Any], hold: bool = True) -> None:
    """SSHChannel._flush_send_buf, sending stdout with `_data_packet` and all of one flush's
    packets in one write, where asyncssh builds each through three send_packet layers and
    writes each on its own (34 writes per MB relayed, against 6); a window too small for a
    packet waits for more (`_holds`)."""
    if hold and _holds(self):
        self._pause_resume_writing()
        return
    conn = self._conn
    send_buf = _send_buffer(self)
    packets: list[bytes] = []
    while send_buf and self._send_window:
        pending, datatype = send_buf[0]
        size = min(self._send_window, self._send_pktsize, len(pending))
        cipher = None
        if conn is not None and datatype is None and self._send_chan is not None:
            cipher = _sealing_cipher(conn)
        if cipher is None:
            _write_packets(conn, packets)  # they go before what send_packet writes
            packets = []
            data = bytes(pending[:size])
            if datatype is None:
                self.send_packet(MSG_CHANNEL_DATA, String(data))
            else:
                self.send_packet(MSG_CHANNEL_EXTENDED_DATA, UInt32(datatype), String(data))
        else:
            assert conn is not None and self._send_chan is not None
            channel = self._send_chan.to_bytes(4, "big")
            with memoryview(pending) as view, view[:size] as piece:
                packets += _data_packet(conn, cipher, channel, piece)
        _consume(send_buf, size)
        self._send_buf_len -= size
        self._send_window -= size
    _write_packets(conn, packets)
    self._pause_resume_writing()
    if not self._send_buf:
        if self._send_state == "eof_pending":
            self.send_packet(MSG_CHANNEL_EOF)
            self._send_state = "eof"
        elif self._send_state == "close_pending":
            self._close_send()


def _send_buffer(channel: SSHChannel[Any]) -> list[tuple[_Pending, int | None]]:
    """A channel's send buffer, as this module fills it."""
    return cast(list[tuple[_Pending, int | None]], channel._send_buf)


def _consume(send_buf: list[tuple[_Pending, int | None]], size: int) -> None:
    """Drop `size` sent bytes from the front of a channel's send buffer."""
    pending, datatype = send_buf[0]
    if size == len(pending):
        del send_buf[0]
    elif isinstance(pending, memoryview):
        send_buf[0] = (pending[size:], datatype)
    else:
        del pending[:size]  # CPython moves a bytearray's start: no copy


# -- 6. channel data and window adjusts received: opened in the input buffer ---------------------

_stock_recv_pkthdr = SSHConnection._recv_pkthdr
_OPEN = "open"
_ADJUSTABLE = frozenset(("open", "eof_pending", "eof"))  # recv states that take an adjust


def _recv_pkthdr(self: SSHConnection) -> bool:
    """SSHConnection._recv_pkthdr, taking a whole AES-GCM channel data or window adjust packet
    at once.

    asyncssh takes a packet in two steps (its first block, then the rest) and copies its data
    six times on the way to the channel: out of the buffer, joined, decrypted, the payload
    sliced out, the string read out, and the buffer's rest. Here, once the whole packet is in
    the buffer, it is opened straight from the buffer and its data copied once, for the
    channel; a window adjust (a client sends one every 96 KiB it reads, or every 8 KiB while its
    git is slower than the transfer) goes straight to its channel. Any other packet, and any
    packet asyncssh would refuse (wrong tag, unknown channel, window exceeded, bad length), is
    opened again by asyncssh's own path, which answers it as it always does. A packet not all
    there yet waits in the buffer, as it would under asyncssh before its first block is taken.
    """
    encryption = self._recv_encryption
    buffer: Any = self._inpbuf
    if (
        not isinstance(encryption, _GCMEncryption)
        or type(buffer) is not _InputBuffer
        or self._decompressor is not None
        or not self._auth_complete
        or self._transport is None
        or self.logger._debug_level >= 3
        or len(buffer) < 4
    ):
        return _stock_recv_pkthdr(self)
    header = buffer[:4]  # bytes: the clear length, authenticated with the rest
    pktlen = int.from_bytes(header, "big")
    end = 4 + pktlen + _GCM_TAG
    if pktlen > self._max_recv_pktlen:
        return _stock_recv_pkthdr(self)  # which refuses it
    if len(buffer) < end:
        return False  # called again when more has come
    cipher = encryption._cipher
    seq = self._recv_seq
    with memoryview(buffer) as view, view[4:end] as sealed:
        plain = cipher.unseal(header, sealed)
    deliver = _channel_packet(self, seq, plain) if plain is not None else None
    if deliver is None:
        cipher.rewind()
        return _stock_recv_pkthdr(self)
    del buffer[:end]  # before the channel runs, as asyncssh does
    deliver()
    # What _finish_recv_packet does after a channel packet.
    self._auth_final = True
    self._recv_seq = (seq + 1) & 0xFFFFFFFF
    return True


def _channel_packet(conn: SSHConnection, seq: int, plain: bytes) -> Callable[[], object] | None:
    """What to do with an opened packet if it is a channel's data or window adjust that
    asyncssh would take as it stands; None for anything else."""
    with memoryview(plain) as packet:
        if len(packet) < 10 or packet[0] == 0:  # asyncssh takes no padding as no payload
            return None
        end = len(packet) - packet[0]  # the padding length comes first
        kind = packet[1]
        channel = conn._channels.get(int.from_bytes(packet[2:6], "big"))
        if channel is None:
            return None
        if kind == MSG_CHANNEL_WINDOW_ADJUST and end == 10:
            if channel._recv_state not in _ADJUSTABLE:
                return None  # asyncssh's handler refuses it
            adjust = int.from_bytes(packet[6:10], "big")
            return functools.partial(_window_adjust, conn, channel, adjust)
        size = int.from_bytes(packet[6:10], "big")
        if (
            kind != MSG_CHANNEL_DATA
            or 10 + size != end
            or channel._recv_state != _OPEN
            or size > channel._recv_window
        ):
            return None
        return functools.partial(_accept_data, channel, bytes(packet[10:end]))


def _window_adjust(conn: SSHConnection, channel: SSHChannel[Any], adjust: int) -> None:
    """What SSHChannel._process_window_adjust does, but the flush waits for the end of the read
    when there is one (`_data_received`): a client whose git reads slower than the transfer
    sends an adjust for every 8 KiB it passes on, and dozens of them come in one read. Each
    flushed on its own is one 8 KiB packet and one write, where the read's sum is one write of
    full 32 KiB packets, as OpenSSH's sshd sends."""
    channel._send_window += adjust
    channel.logger.debug2(
        "Received window adjust of %d bytes, new window %d", adjust, channel._send_window
    )
    adjusted: list[SSHChannel[Any]] | None = getattr(conn, _ADJUSTED, None)
    if adjusted is None:  # a packet taken outside data_received (after an async handler)
        channel._flush_send_buf()
    elif channel not in adjusted:
        adjusted.append(channel)


def _accept_data(channel: SSHChannel[Any], data: bytes) -> None:
    """What SSHChannel._process_data does with data it accepts."""
    channel.logger.debug2("Received %d data byte%s", len(data), "s" if len(data) > 1 else "")
    channel._accept_data(data)


# -- applying ------------------------------------------------------------------------------------

# (owner, attribute, replacement): what `apply` sets and `remove` puts back.
_REPLACEMENTS: tuple[tuple[type[Any], str, object], ...] = (
    (SSHConnection, "send_packet", _send_packet),
    (SSHConnection, "data_received", _data_received),
    (GCMEncryption, "new", classmethod(_gcm_new)),
    (ChachaEncryption, "new", classmethod(_chacha_new)),
    (SSHChannel, "write", _write),
    (SSHChannel, "_flush_send_buf", _flush_send_buf),
    (SSHConnection, "_recv_pkthdr", _recv_pkthdr),
)
# Read from the class dictionaries, so that a classmethod is put back as the classmethod it was.
_STOCK = {(owner, name): vars(owner)[name] for owner, name, _ in _REPLACEMENTS}


def apply(enabled: bool, installed: str | None = None) -> FastPathState:
    """Install the replacements if `enabled` and asyncssh is the pinned version; else make sure
    stock asyncssh runs. Returns (and `fast_path_state` then reports) the resulting state."""
    installed = installed or asyncssh.__version__
    if not enabled:
        remove()
        _applied.state = FastPathState.DISABLED
    elif installed != PINNED_ASYNCSSH:
        remove()
        _applied.state = FastPathState.UNSUPPORTED
        log.warning(
            "asyncssh %s is installed, not %s: kilnproxy's fast path is off (stock asyncssh, "
            "more CPU per packet); install the version constraints.txt pins",
            installed,
            PINNED_ASYNCSSH,
        )
    else:
        for owner, name, replacement in _REPLACEMENTS:
            setattr(owner, name, replacement)
        _applied.state = FastPathState.ON
        log.debug("fast path on for asyncssh %s", installed)
    return _applied.state


def remove() -> None:
    """Put stock asyncssh back (for tests, and for `apply` when the fast path must be off).
    Only before any connection exists: a live channel's send buffer may hold views, which
    stock asyncssh cannot consume."""
    for (owner, name), stock in _STOCK.items():
        setattr(owner, name, stock)
    _applied.state = FastPathState.NOT_APPLIED
