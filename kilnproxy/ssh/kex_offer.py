"""The cipher offer fitted to each client's KEXINIT, and the RFC's rule for a guessed packet.

SSH negotiates the first cipher on the client's list that the server also offers (RFC 4253
7.1): the server cannot prefer. An OpenSSH client offered ChaCha20-Poly1305 takes it, and in
kilnproxy that costs 1.6-1.7x the worker CPU of AES-GCM per byte relayed (README,
"Configuration"); yet Dropbear as Debian 12 ships it and paramiko before 3.5 have no AES-GCM.
RFC 4253 7 has key exchange begin "by each side sending" its KEXINIT and orders the two in no
way, so on a connection's first key exchange this server reads the client's KEXINIT before it
sends its own, and adds `[ssh] fallback_encryption_algs` to `encryption_algs` only for a client
that has none of the latter. A client that waits for the server's KEXINIT first (Apache MINA
sshd can be set to) is sent the whole offer after `KEXINIT_WAIT`.

And the guessed first key exchange packet (RFC 4253 7, first_kex_packet_follows): asyncssh
keeps it whenever the negotiated method is the client's first; the RFC calls a guess right only
when both sides' first key exchange and host key algorithms are the same, and has a wrong one
ignored "even if the error in the guess would not affect the contents". Dropbear follows the
RFC and sends its packet again, which asyncssh would take as a second one. `guess_is_right` is
the RFC's rule, applied after asyncssh's.

And the two KEXINIT payloads: asyncssh keeps both for the life of a connection, though only the
exchange hash of the key exchange that carried them reads them, and every key exchange sets both
anew before it hashes. About 2 KiB per connection, held by every idle one (issue 13): they are
dropped when the key exchange ends (NEWKEYS received), unless another has begun by then.

Rules, as for fast_path: it applies only to `PINNED_ASYNCSSH`; with any other version asyncssh
runs stock (`encryption_algs` alone, asyncssh's rule for guesses) after one warning. The RFC's
rule and the dropped payloads apply on the pinned version whatever the offer; the fitted offer
only if fallback ciphers are configured. It changes when a server sends its first KEXINIT and
which ciphers that lists, which guessed packet is ignored, and how long the KEXINIT payloads are
kept; never a client connection's offer (the backend pool) nor a rekey's, nor anything else
after the key exchange. `apply` runs once at worker start, before any connection exists.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import asyncssh
from asyncssh.connection import SSHConnection
from asyncssh.constants import MSG_KEXINIT, MSG_NEWKEYS
from asyncssh.packet import SSHPacket

from kilnproxy.ssh.fast_path import PINNED_ASYNCSSH

log = logging.getLogger("kilnproxy.kex_offer")

# How long the server waits for a client's KEXINIT before sending its own with the whole offer.
# A client that sends first does so once it has read the server's version line, which went out
# on accept: its KEXINIT comes about one round trip after its version line. Waiting too little
# is no failure, only the whole offer (an OpenSSH client would then pick ChaCha20).
KEXINIT_WAIT = 2.0


class OfferState(enum.Enum):
    NOT_APPLIED = "not applied"  # `apply` has not run: stock asyncssh
    ON = "on"
    OFF = "off"  # no fallback ciphers configured: `encryption_algs` alone, sent at once
    UNSUPPORTED = "unsupported"  # asyncssh is not PINNED_ASYNCSSH: stock asyncssh


@dataclass
class _Applied:
    state: OfferState = OfferState.NOT_APPLIED
    fallback: tuple[bytes, ...] = ()


_applied = _Applied()


def offer_state() -> OfferState:
    return _applied.state


# -- the pure rules ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Kexinit:
    """The fields of an SSH_MSG_KEXINIT payload that these rules read."""

    kex: tuple[bytes, ...]
    host_key: tuple[bytes, ...]
    enc_cs: tuple[bytes, ...]
    enc_sc: tuple[bytes, ...]
    first_kex_follows: bool


def parse_kexinit(payload: bytes) -> Kexinit:
    """A KEXINIT payload, from its message type byte on (asyncssh checked it already)."""
    packet = SSHPacket(payload)
    packet.get_byte()
    packet.get_bytes(16)  # cookie
    kex, host_key, enc_cs, enc_sc = (tuple(packet.get_namelist()) for _ in range(4))
    for _ in range(6):  # MACs, compression and languages, each way
        packet.get_namelist()
    return Kexinit(kex, host_key, enc_cs, enc_sc, packet.get_boolean())


def offer_for(
    preferred: Sequence[bytes], fallback: Sequence[bytes], client: Kexinit | None
) -> list[bytes]:
    """The ciphers to offer a client: the preferred ones, and the fallback ones only when the
    client has no preferred cipher in one direction or its KEXINIT is unknown (None)."""
    if client and set(preferred) & set(client.enc_cs) and set(preferred) & set(client.enc_sc):
        return list(preferred)
    return [*preferred, *(alg for alg in fallback if alg not in preferred)]


def guess_is_right(client: Kexinit, server: Kexinit) -> bool:
    """RFC 4253 7: a guessed packet was guessed right only if both sides prefer the same key
    exchange and host key algorithms (then it is the first key exchange packet)."""
    return (
        client.kex[:1] == server.kex[:1] != () and client.host_key[:1] == server.host_key[:1] != ()
    )


# -- in asyncssh ---------------------------------------------------------------------------------

_stock_send_kexinit = SSHConnection._send_kexinit
_stock_force_close = SSHConnection._force_close
# asyncssh dispatches packets through this class dictionary, not through the method names.
_handlers = cast(dict[int, Callable[..., Any]], SSHConnection._packet_handlers)
_stock_process_kexinit = _handlers[MSG_KEXINIT]
_stock_process_newkeys = _handlers[MSG_NEWKEYS]
# The first KEXINIT of a server connection while it waits for the client's: the timer that
# sends the whole offer, then None once the server's KEXINIT is on its way.
_WAITING = "_kilnproxy_kexinit_waiting"


def _send_kexinit(self: SSHConnection) -> None:
    """_send_kexinit, holding back a server's first KEXINIT until the client's is read."""
    if self.is_server() and not self._session_id and not hasattr(self, _WAITING):
        timer = self._loop.call_later(KEXINIT_WAIT, _send_whole_offer, self)
        setattr(self, _WAITING, timer)
        return  # asyncssh marks it sent all the same: _process_kexinit unmarks it
    _stock_send_kexinit(self)


def _stop_waiting(self: SSHConnection) -> bool:
    """Cancel a held-back KEXINIT's timer; whether one was waiting."""
    waiting: asyncio.TimerHandle | None = getattr(self, _WAITING, None)
    if waiting is None:
        return False
    waiting.cancel()
    setattr(self, _WAITING, None)
    return True


def _send_whole_offer(self: SSHConnection) -> None:
    """No KEXINIT from the client yet: it may be waiting for ours, so offer it everything."""
    if getattr(self, _WAITING, None) is None or self._transport is None:
        return
    setattr(self, _WAITING, None)
    self._enc_algs = offer_for(self._enc_algs, _applied.fallback, None)
    _stock_send_kexinit(self)


def _force_close(self: SSHConnection, exc: Exception | None) -> None:
    """_force_close (every way a connection ends), and a held-back KEXINIT's timer with it:
    else each connection closed before its KEXINIT (a scanner, a health check, a flood of
    connect-and-close) would be held in memory by its timer for KEXINIT_WAIT."""
    _stop_waiting(self)
    _stock_force_close(self, exc)


async def _process_kexinit(
    self: SSHConnection, pkttype: int, pktid: int, packet: SSHPacket
) -> None:
    """_process_kexinit, sending a held-back KEXINIT with the offer fitted to the client's,
    then deciding by the RFC's rule whether the peer's guessed packet is ignored."""
    if _stop_waiting(self):
        client = parse_kexinit(packet.get_full_payload())
        self._enc_algs = offer_for(self._enc_algs, _applied.fallback, client)
        self._kexinit_sent = False  # so that asyncssh sends it now, after reading the client's
    await _stock_process_kexinit(self, pkttype, pktid, packet)
    # asyncssh has set _ignore_first_kex by its own rule, and read no packet since. When it
    # ignores the guess the RFC does too: its rule keeps every guess the RFC's keeps.
    if self._ignore_first_kex:
        return
    client, server = parse_kexinit(self._client_kexinit), parse_kexinit(self._server_kexinit)
    peer = client if self.is_server() else server
    self._ignore_first_kex = peer.first_kex_follows and not guess_is_right(client, server)


def _process_newkeys(self: SSHConnection, pkttype: int, pktid: int, packet: SSHPacket) -> None:
    """_process_newkeys, then the KEXINIT payloads dropped if no key exchange is under way:
    the exchange hash was computed before NEWKEYS was sent (`_kex` is None from then on), and
    the next key exchange stores both payloads again before it hashes them."""
    _stock_process_newkeys(self, pkttype, pktid, packet)
    if self._kex is None and not self._kexinit_sent:
        self._client_kexinit = self._server_kexinit = b""


# -- applying ------------------------------------------------------------------------------------


def apply(fallback: Sequence[str], installed: str | None = None) -> OfferState:
    """On the pinned asyncssh: the RFC's rule for guessed packets always, and the offer fitted
    to each client if `fallback` names ciphers. On any other version, stock asyncssh. Returns
    (and `offer_state` then reports) the resulting state."""
    installed = installed or asyncssh.__version__
    remove()
    if installed != PINNED_ASYNCSSH:
        _applied.state = OfferState.UNSUPPORTED
        log.warning(
            "asyncssh %s is installed, not %s: [ssh] fallback_encryption_algs is not offered "
            "(clients with none of encryption_algs cannot connect), and a client's guessed "
            "key exchange packet is kept by asyncssh's rule; install the version "
            "constraints.txt pins",
            installed,
            PINNED_ASYNCSSH,
        )
        return _applied.state
    _handlers[MSG_KEXINIT] = _process_kexinit
    _handlers[MSG_NEWKEYS] = _process_newkeys
    if fallback:
        SSHConnection._send_kexinit = _send_kexinit  # type: ignore[method-assign]
        SSHConnection._force_close = _force_close  # type: ignore[method-assign]
        _applied.fallback = tuple(alg.encode("ascii") for alg in fallback)
        _applied.state = OfferState.ON
    else:
        _applied.state = OfferState.OFF
    return _applied.state


def remove() -> None:
    """Put stock asyncssh back (for tests, and for `apply` on another asyncssh version)."""
    SSHConnection._send_kexinit = _stock_send_kexinit  # type: ignore[method-assign]
    SSHConnection._force_close = _stock_force_close  # type: ignore[method-assign]
    _handlers[MSG_KEXINIT] = _stock_process_kexinit
    _handlers[MSG_NEWKEYS] = _stock_process_newkeys
    _applied.fallback = ()
    _applied.state = OfferState.NOT_APPLIED
