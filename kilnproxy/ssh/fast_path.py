"""kilnproxy's per-packet path for the pinned asyncssh (issue 13): four replacements, one owner.

asyncssh spends most of a relay's CPU on a few methods that run once per SSH packet. This module
replaces them, in this process only, with versions that put the same bytes on the wire:

1. `SSHConnection.send_packet` no longer sends an empty MSG_IGNORE before every packet once keys
   are in use, unless the cipher is CBC (kilnproxy never offers one, but asyncssh can do it);
2. `GCMEncryption.new` gives a cipher that builds one AESGCM per key and direction, not one per
   packet;
3. `SSHConnection.data_received` keeps the input buffer as a bytearray consumed from the front,
   instead of bytes re-sliced (a copy of the whole rest of a read) once per header and packet;
4. `ChachaEncryption.new` gives a cipher that takes the Poly1305 key and the payload from one
   ChaCha20 stream per packet, instead of a stream for each.

bench/asyncssh-hotpath.patch is the same change as a patch to asyncssh, offered upstream: once a
release carries it, pin that release and delete this module.

Rules: it applies only to the asyncssh version it was tested against (`PINNED_ASYNCSSH`, which
constraints.txt pins; a unit test holds them equal), and any other version runs stock asyncssh
after one warning. It never changes a byte on the wire but the absent MSG_IGNORE, nor what
asyncssh does on an error (a packet that fails its MAC still ends the connection with
"MAC verification failed"). `apply` runs once at worker start, before any connection exists.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import asyncssh
from asyncssh.connection import SSHConnection
from asyncssh.constants import MSG_IGNORE, MSG_KEX_LAST
from asyncssh.crypto.chacha import _CTR_0, _POLY1305_KEYBYTES, ChachaCipher, chacha20
from asyncssh.crypto.cipher import GCMCipher
from asyncssh.encryption import BasicEncryption, ChachaEncryption, Encryption, GCMEncryption
from asyncssh.packet import SSHPacketLogger
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

    def encrypt_and_sign(self, header: bytes, data: bytes) -> tuple[bytes, bytes]:
        sealed = self._aead.encrypt(self._next_nonce(), data, header)
        return header + sealed[:-_GCM_TAG], sealed[-_GCM_TAG:]

    def verify_and_decrypt(self, header: bytes, data: bytes, mac: bytes) -> bytes | None:
        nonce = self._next_nonce()  # advanced on failure too, as asyncssh does
        try:
            return self._aead.decrypt(nonce, data + mac, header)
        except InvalidTag:
            return None  # asyncssh answers MAC verification failed, and disconnects


def _gcm_new(
    cls: type[GCMEncryption],
    cipher_name: str,
    key: bytes,
    iv: bytes,
    mac_alg: bytes = b"",
    mac_key: bytes = b"",
    etm: bool = False,
) -> GCMEncryption:
    return cls(_GCMCipher(cipher_name, key, iv))


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


def _data_received(self: SSHConnection, data: bytes, datatype: int | None = None) -> None:
    """data_received, appending to an `_InputBuffer`: asyncssh resets `_inpbuf` to bytes when
    a connection is made or cleaned up, so the buffer is wrapped on first use."""
    buffer: Any = self._inpbuf
    if type(buffer) is not _InputBuffer:
        buffer = _InputBuffer(buffer)
        self._inpbuf = buffer
    buffer += data
    self._recv_data()


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


# -- applying ------------------------------------------------------------------------------------

# (owner, attribute, replacement): what `apply` sets and `remove` puts back.
_REPLACEMENTS: tuple[tuple[type[Any], str, object], ...] = (
    (SSHConnection, "send_packet", _send_packet),
    (SSHConnection, "data_received", _data_received),
    (GCMEncryption, "new", classmethod(_gcm_new)),
    (ChachaEncryption, "new", classmethod(_chacha_new)),
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
    """Put stock asyncssh back (for tests, and for `apply` when the fast path must be off)."""
    for (owner, name), stock in _STOCK.items():
        setattr(owner, name, stock)
    _applied.state = FastPathState.NOT_APPLIED
