"""kilnproxy/ssh/kex_offer.py: the pure rules, the version guard, and an asyncssh server on
loopback with the offer fitted, spoken to in raw SSH packets (so that what is sent when, and a
guessed key exchange packet, are in the test's hands) and by an asyncssh client."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncssh
import pytest
import uvloop
from asyncssh.connection import SSHConnection
from asyncssh.packet import Boolean, Byte, NameList, String, UInt32

from kilnproxy.config import from_mapping
from kilnproxy.errors import OperatorError
from kilnproxy.ssh import kex_offer
from kilnproxy.ssh.kex_offer import (
    Kexinit,
    OfferState,
    apply,
    guess_is_right,
    offer_for,
    offer_state,
    parse_kexinit,
)
from kilnproxy.ssh.server import server_options

GCM = [b"aes128-gcm@openssh.com", b"aes256-gcm@openssh.com"]
FALLBACK = ["chacha20-poly1305@openssh.com", "aes128-ctr", "aes256-ctr"]
WHOLE = [*GCM, *(alg.encode() for alg in FALLBACK)]
MSG_DISCONNECT, MSG_KEXINIT, MSG_NEWKEYS, MSG_KEX_ECDH_INIT = 1, 20, 21, 30


@pytest.fixture(autouse=True)
def stock_afterwards() -> Iterator[None]:
    yield
    kex_offer.remove()


def kexinit_payload(
    enc: list[bytes], kex: list[bytes] | None = None, follows: bool = False
) -> bytes:
    kex = kex or [b"curve25519-sha256"]
    mac, none = [b"hmac-sha2-256-etm@openssh.com"], [b"none"]
    lists = [kex, [b"ssh-ed25519"], enc, enc, mac, mac, none, none, [], []]
    return b"".join(
        [Byte(MSG_KEXINIT), os.urandom(16), *(NameList(x) for x in lists), Boolean(follows),
         UInt32(0)]
    )  # fmt: skip


# -- the pure rules ------------------------------------------------------------------------------


def test_a_kexinit_is_read_as_sent() -> None:
    parsed = parse_kexinit(kexinit_payload([b"aes128-ctr"], [b"a", b"b"], follows=True))
    assert parsed == Kexinit((b"a", b"b"), (b"ssh-ed25519",), (b"aes128-ctr",),
                             (b"aes128-ctr",), True)  # fmt: skip


@pytest.mark.parametrize(
    ("enc_cs", "enc_sc", "offer"),
    [
        ([b"chacha20-poly1305@openssh.com", b"aes256-gcm@openssh.com"], None, GCM),
        ([b"chacha20-poly1305@openssh.com", b"aes128-ctr"], None, WHOLE),
        ([b"aes128-ctr"], [b"aes128-gcm@openssh.com"], WHOLE),  # one direction lacks it
    ],
)
def test_the_fallback_is_offered_only_to_a_client_without_a_preferred_cipher(
    enc_cs: list[bytes], enc_sc: list[bytes] | None, offer: list[bytes]
) -> None:
    client = Kexinit((), (), tuple(enc_cs), tuple(enc_sc or enc_cs), False)
    fallback = [alg.encode() for alg in FALLBACK]
    assert offer_for(GCM, fallback, client) == offer
    assert offer_for(GCM, fallback, None) == WHOLE  # the client's offer is not known
    assert offer_for(GCM, [*fallback, GCM[1]], client) == offer  # never a cipher twice


@pytest.mark.parametrize(
    ("client_kex", "client_host", "right"),
    [
        ((b"mlkem", b"curve"), (b"ed25519",), True),
        ((b"curve", b"mlkem"), (b"ed25519",), False),  # what asyncssh would have kept
        ((b"mlkem",), (b"rsa", b"ed25519"), False),  # the host key algorithm was guessed wrong
        ((), (), False),
    ],
)
def test_a_guess_is_right_only_when_both_sides_prefer_the_same(
    client_kex: tuple[bytes, ...], client_host: tuple[bytes, ...], right: bool
) -> None:
    server = Kexinit((b"mlkem", b"curve"), (b"ed25519",), (), (), False)
    client = Kexinit(client_kex, client_host, (), (), True)
    assert guess_is_right(client, server) is right
    assert guess_is_right(server, client) is right


# -- the version guard ---------------------------------------------------------------------------


def patched() -> tuple[bool, bool, bool]:
    """Whether asyncssh's KEXINIT sending, its KEXINIT handling and its NEWKEYS handling are
    replaced."""
    handlers = SSHConnection._packet_handlers
    return (
        SSHConnection._send_kexinit is not kex_offer._stock_send_kexinit,
        handlers[MSG_KEXINIT] is not kex_offer._stock_process_kexinit,
        handlers[MSG_NEWKEYS] is not kex_offer._stock_process_newkeys,
    )


def test_the_pinned_version_fits_the_offer_and_remove_puts_asyncssh_back() -> None:
    assert apply(FALLBACK) is OfferState.ON
    assert offer_state() is OfferState.ON
    assert patched() == (True, True, True)
    kex_offer.remove()
    assert patched() == (False, False, False)
    assert offer_state() is OfferState.NOT_APPLIED


def test_without_fallback_ciphers_only_the_rfc_rule_for_guesses_applies() -> None:
    assert apply([]) is OfferState.OFF
    assert patched() == (False, True, True)


def test_another_version_leaves_asyncssh_untouched(caplog: pytest.LogCaptureFixture) -> None:
    apply(FALLBACK)
    with caplog.at_level(logging.WARNING, logger="kilnproxy.kex_offer"):
        assert apply(FALLBACK, installed="2.25.0") is OfferState.UNSUPPORTED
    assert patched() == (False, False, False)
    assert [r.getMessage() for r in caplog.records] == [
        "asyncssh 2.25.0 is installed, not 2.24.1: [ssh] fallback_encryption_algs is not "
        "offered (clients with none of encryption_algs cannot connect), and a client's "
        "guessed key exchange packet is kept by asyncssh's rule; install the version "
        "constraints.txt pins"
    ]


def test_an_unknown_fallback_cipher_is_refused(tmp_path: Path) -> None:
    """Where the configuration is read; and by the worker, for an asyncssh other than the
    pinned one, whose names may differ from those the configuration knows."""
    unknown = r"^\[ssh\] fallback_encryption_algs: unknown cipher 'rot13'$"
    with pytest.raises(OperatorError, match=unknown):
        from_mapping({"ssh": {"fallback_encryption_algs": ["aes128-ctr", "rot13"]}}, tmp_path)
    config = from_mapping({}, tmp_path)
    ssh = dataclasses.replace(config.ssh, fallback_encryption_algs=("aes128-ctr", "rot13"))
    keys = [asyncssh.load_keypairs([asyncssh.generate_private_key("ssh-ed25519")])[0]]
    with pytest.raises(OperatorError, match=unknown):
        server_options(dataclasses.replace(config, ssh=ssh), keys)


# -- an asyncssh server, spoken to in raw packets ------------------------------------------------


class _Open(asyncssh.SSHServer):
    def begin_auth(self, username: str) -> bool:
        return False  # no authentication: what is tested is the transport


@asynccontextmanager
async def server(
    kex_algs: list[str] | None = None, factory: type[asyncssh.SSHServer] = _Open
) -> AsyncIterator[int]:
    """An asyncssh server on loopback offering AES-GCM (as kilnproxy does); yields its port."""
    acceptor = await asyncssh.listen(
        "127.0.0.1", 0, server_host_keys=[asyncssh.generate_private_key("ssh-ed25519")],
        server_factory=factory, encryption_algs=[alg.decode() for alg in GCM],
        kex_algs=kex_algs or ["mlkem768x25519-sha256", "curve25519-sha256"],
        mac_algs=["hmac-sha2-256-etm@openssh.com"],
    )  # fmt: skip
    try:
        yield acceptor.sockets[0].getsockname()[1]
    finally:
        acceptor.close()
        await acceptor.wait_closed()


class RawClient:
    """The client's side of the unencrypted start of an SSH connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, port: int) -> RawClient:
        client = cls(*await asyncio.open_connection("127.0.0.1", port))
        assert (await client.reader.readline()).startswith(b"SSH-2.0-")
        client.writer.write(b"SSH-2.0-raw_test\r\n")
        return client

    def send(self, payload: bytes) -> None:
        padding = 8 - (5 + len(payload)) % 8
        padding += 8 if padding < 4 else 0
        body = bytes([padding]) + payload + bytes(padding)
        self.writer.write(len(body).to_bytes(4, "big") + body)

    async def receive(self, within: float) -> bytes | None:
        """The next packet's payload, or None if the server sent none `within` seconds or
        closed."""
        try:
            header = await asyncio.wait_for(self.reader.readexactly(4), within)
            body = await self.reader.readexactly(int.from_bytes(header, "big"))
        except (TimeoutError, asyncio.IncompleteReadError):
            return None
        return body[1 : len(body) - body[0]]

    def close(self) -> None:
        self.writer.close()


async def offer_after(client_enc: list[bytes]) -> tuple[Kexinit, bool]:
    """The server's KEXINIT to a client offering `client_enc`; and whether the server had
    sent anything before the client's KEXINIT."""
    async with server() as port:
        client = await RawClient.connect(port)
        early = await client.receive(0.3)
        client.send(kexinit_payload(client_enc))
        payload = early or await client.receive(5)
        client.close()
    assert payload is not None
    return parse_kexinit(payload), early is not None


@pytest.mark.parametrize(
    ("client_enc", "offer"),
    [([b"aes128-ctr", b"chacha20-poly1305@openssh.com"], WHOLE), ([*GCM, b"aes128-ctr"], GCM)],
)
def test_the_server_sends_its_offer_after_reading_the_clients(
    client_enc: list[bytes], offer: list[bytes]
) -> None:
    apply(FALLBACK)
    kexinit, early = uvloop.run(offer_after(client_enc))
    assert not early
    assert list(kexinit.enc_cs) == list(kexinit.enc_sc) == offer


def test_without_the_offer_fitted_the_server_sends_its_kexinit_at_once() -> None:
    apply([])
    kexinit, early = uvloop.run(offer_after([b"aes128-ctr"]))
    assert early  # the KEXINIT, sent as soon as the client's version line came
    assert list(kexinit.enc_cs) == GCM


def test_a_client_that_waits_for_the_server_gets_the_whole_offer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(kex_offer, "KEXINIT_WAIT", 0.5)
    apply(FALLBACK)

    async def wait_for_server() -> tuple[bytes | None, float]:
        async with server() as port:
            client = await RawClient.connect(port)
            started = time.monotonic()
            payload = await client.receive(5)
            client.close()
            return payload, time.monotonic() - started

    payload, waited = uvloop.run(wait_for_server())
    assert payload is not None
    assert list(parse_kexinit(payload).enc_cs) == WHOLE
    assert 0.4 < waited < 3


def test_a_connection_closed_before_its_kexinit_takes_its_timer_along() -> None:
    """The held-back KEXINIT's timer would keep a closed connection for KEXINIT_WAIT."""
    apply(FALLBACK)
    conns: list[asyncssh.SSHServerConnection] = []
    lost = asyncio.Event()

    class Watched(_Open):
        def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
            conns.append(conn)

        def connection_lost(self, exc: Exception | None) -> None:
            lost.set()

    async def close_early() -> tuple[bool, object]:
        async with server(factory=Watched) as port:
            client = await RawClient.connect(port)
            await asyncio.sleep(0.1)  # the server's KEXINIT is held back: a timer waits
            waiting: asyncio.TimerHandle = getattr(conns[0], kex_offer._WAITING)
            client.close()
            await asyncio.wait_for(lost.wait(), 5)
            return waiting.cancelled(), getattr(conns[0], kex_offer._WAITING)

    # Not left to fire KEXINIT_WAIT later, holding the connection until then.
    assert uvloop.run(close_early()) == (True, None)


async def after_a_guess(client_kex: list[bytes]) -> bytes | None:
    """A KEXINIT announcing a guessed packet, then that packet, with a public key no key
    exchange accepts: the server's next packet, if any (a disconnect if it took the guess)."""
    async with server(["mlkem768x25519-sha256", "curve25519-sha256"]) as port:
        client = await RawClient.connect(port)
        client.send(kexinit_payload(GCM, client_kex, follows=True))
        client.send(Byte(MSG_KEX_ECDH_INIT) + String(b"\x01" * 7))
        kexinit = await client.receive(5)
        assert kexinit is not None and kexinit[0] == MSG_KEXINIT
        reply = await client.receive(0.5)
        client.close()
        return reply


@pytest.mark.parametrize("fallback", [FALLBACK, []])
def test_a_wrong_guess_is_ignored_as_rfc_4253_says(fallback: list[str]) -> None:
    """The client prefers curve25519-sha256, the server mlkem768x25519-sha256: the guess is
    wrong by the RFC though asyncssh, which negotiates curve25519-sha256 (the client's
    first), would take it and fail on the bad key. Ignored, it leaves the server waiting."""
    apply(fallback)
    assert uvloop.run(after_a_guess([b"curve25519-sha256", b"mlkem768x25519-sha256"])) is None


def test_stock_asyncssh_takes_the_wrong_guess() -> None:
    """The control: asyncssh's own rule keeps that guess, and fails on its bad key."""
    reply = uvloop.run(after_a_guess([b"curve25519-sha256", b"mlkem768x25519-sha256"]))
    assert reply is not None and reply[0] == MSG_DISCONNECT


def test_a_right_guess_is_taken_as_the_first_key_exchange_packet() -> None:
    apply(FALLBACK)
    reply = uvloop.run(after_a_guess([b"mlkem768x25519-sha256"]))
    assert reply is not None and reply[0] == MSG_DISCONNECT  # it took the bad key


# -- and an asyncssh client, whole handshakes ----------------------------------------------------


async def negotiated(client_algs: list[str] | None) -> str:
    """The cipher an asyncssh client and the server agreed on, as the server saw it."""
    ciphers: list[str] = []

    class Recording(_Open):
        def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
            self.conn = conn

        def begin_auth(self, username: str) -> bool:  # called once keys are in use
            ciphers.append(self.conn.get_extra_info("recv_cipher"))
            return False  # no authentication: what is tested is the transport

    async with server(factory=Recording) as port:
        options: dict[str, Any] = {"encryption_algs": client_algs} if client_algs else {}
        conn = await asyncssh.connect(
            "127.0.0.1", port, username="test", known_hosts=None, config=None,
            client_keys=None, agent_path=None, **options,
        )  # fmt: skip
        conn.close()
        await conn.wait_closed()
    assert len(ciphers) == 1
    return ciphers[0]


@pytest.mark.parametrize(
    ("client_algs", "cipher"),
    [(None, "aes256-gcm@openssh.com"), (["aes256-ctr", "aes128-cbc"], "aes256-ctr")],
)
def test_asyncssh_clients_complete_the_key_exchange(
    client_algs: list[str] | None, cipher: str
) -> None:
    """asyncssh's own default prefers ChaCha20, then AES-256-GCM: fitted, it gets the latter."""
    apply(FALLBACK)
    assert uvloop.run(negotiated(client_algs)) == cipher


# -- the KEXINIT payloads, dropped after each key exchange ---------------------------------------


async def echo_rekeying(data: bytes, rekey_bytes: int) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """`data` echoed by an asyncssh server, both ends rekeying every `rekey_bytes`; and the
    KEXINIT payloads the server connection held when each command began and ended."""
    held: list[tuple[bytes, bytes]] = []

    async def echo(process: asyncssh.SSHServerProcess[bytes]) -> None:
        conn: Any = process.channel.get_connection()
        held.append((conn._client_kexinit, conn._server_kexinit))
        while chunk := await process.stdin.read(1 << 16):
            process.stdout.write(chunk)
            await process.stdout.drain()
        held.append((conn._client_kexinit, conn._server_kexinit))
        process.exit(0)

    acceptor = await asyncssh.listen(
        "127.0.0.1", 0, server_host_keys=[asyncssh.generate_private_key("ssh-ed25519")],
        server_factory=_Open, process_factory=echo, encoding=None, rekey_bytes=rekey_bytes,
        encryption_algs=[alg.decode() for alg in GCM],
    )  # fmt: skip
    try:
        async with (
            asyncssh.connect(
                "127.0.0.1", acceptor.sockets[0].getsockname()[1], username="test",
                known_hosts=None, config=None, client_keys=None, agent_path=None,
                rekey_bytes=rekey_bytes,
            ) as conn,
            conn.create_process(encoding=None) as process,
        ):  # fmt: skip

            async def feed() -> None:
                for start in range(0, len(data), 1 << 14):
                    process.stdin.write(data[start : start + (1 << 14)])
                    await process.stdin.drain()
                process.stdin.write_eof()

            feeder = asyncio.create_task(feed())
            echoed = bytes(await process.stdout.read())
            await feeder
            return echoed, held
    finally:
        acceptor.close()
        await acceptor.wait_closed()


def test_the_kexinit_payloads_are_dropped_after_each_key_exchange(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """asyncssh keeps both payloads for the exchange hash only: dropped once NEWKEYS is in,
    and the key exchanges after it (every 128 KiB, either end) still agree on their keys."""
    apply([])
    data = os.urandom(2 << 20)
    with caplog.at_level(logging.DEBUG, logger="asyncssh"):
        echoed, held = uvloop.run(echo_rekeying(data, 128 << 10))
    assert echoed == data
    assert held == [(b"", b""), (b"", b"")]
    kex = [r for r in caplog.records if r.getMessage().endswith("Requesting key exchange")]
    assert len(kex) >= 2 * 8


def test_stock_asyncssh_keeps_the_kexinit_payloads() -> None:
    """What the test above would see without the replacement: both payloads, all along."""
    kex_offer.remove()
    _, held = uvloop.run(echo_rekeying(b"x", 1 << 20))
    assert all(client.startswith(bytes([MSG_KEXINIT])) for client, _ in held)
    assert all(server.startswith(bytes([MSG_KEXINIT])) for _, server in held)
