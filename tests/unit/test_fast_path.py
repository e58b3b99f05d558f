"""kilnproxy/ssh/fast_path.py in one process: the replacement ciphers against asyncssh's own on
the same keys, the input buffer, the version guard, the switch, and asyncssh talking to itself
with both ends on the fast path through many key exchanges of its own."""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import logging
import os
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh
import asyncssh.channel
import asyncssh.connection
import asyncssh.crypto.chacha
import asyncssh.crypto.cipher
import asyncssh.encryption
import pytest
import uvloop
from asyncssh.encryption import Encryption, get_encryption, get_encryption_params

from kilnproxy.control import FastPathState
from kilnproxy.ssh import fast_path
from kilnproxy.ssh.fast_path import (
    PINNED_ASYNCSSH,
    _InputBuffer,
    apply,
    fast_path_state,
)

ROOT = Path(__file__).resolve().parents[2]
AEAD = ["aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "chacha20-poly1305@openssh.com"]
ETM = [("aes128-ctr", "hmac-sha2-256-etm@openssh.com"), ("aes256-ctr", "umac-64-etm@openssh.com")]
CBC = ("aes128-cbc", "hmac-sha2-512-etm@openssh.com")
# Whole packets as send_packet builds them (padding length, payload, padding): the sizes of a
# KEXINIT-like packet, a window adjust, a full 32 KiB channel data packet, and odd ones.
PACKET_SIZES = [16, 32, 48, 1008, 32784, 64, 4096 + 16]
MODULES = [
    asyncssh.channel,
    asyncssh.connection,
    asyncssh.encryption,
    asyncssh.crypto.cipher,
    asyncssh.crypto.chacha,
]


@pytest.fixture(autouse=True)
def stock_afterwards() -> Iterator[None]:
    yield
    fast_path.remove()


def test_the_pinned_version_is_what_constraints_and_the_tests_run() -> None:
    pins = re.findall(r"^asyncssh==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert pins == [PINNED_ASYNCSSH]
    assert f"asyncssh=={PINNED_ASYNCSSH}" in project
    assert asyncssh.__version__ == PINNED_ASYNCSSH


@pytest.mark.skipif(shutil.which("patch") is None, reason="`make bench-deps` installs patch")
def test_the_upstream_patch_applies_cleanly_to_the_pinned_asyncssh(tmp_path: Path) -> None:
    """bench/asyncssh-hotpath.patch, the same change offered to asyncssh: no fuzz, no offset."""
    installed = Path(asyncssh.__file__).parent
    shutil.copytree(installed, tmp_path / "asyncssh", ignore=shutil.ignore_patterns("__pycache__"))
    done = subprocess.run(
        ["patch", "-p1", "--dry-run", "-i", str(ROOT / "bench" / "asyncssh-hotpath.patch")],
        cwd=tmp_path, capture_output=True, text=True, check=False, timeout=30,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines() == [
        f"checking file asyncssh/{name}"
        for name in (
            "channel.py",
            "connection.py",
            "crypto/chacha.py",
            "crypto/cipher.py",
            "encryption.py",
        )
    ]


# -- the ciphers, byte for byte --------------------------------------------------------------------


@dataclass(frozen=True)
class Keys:
    """One direction's keys, as send_newkeys derives them, for `get_encryption`."""

    alg: bytes
    key: bytes
    iv: bytes
    mac: bytes
    mac_key: bytes
    etm: bool

    @classmethod
    def fresh(cls, alg: str, mac: str = "") -> Keys:
        enc_alg, mac_alg = alg.encode(), mac.encode()
        key_size, iv_size, _, mac_key_size, _, etm = get_encryption_params(enc_alg, mac_alg)
        iv = os.urandom(iv_size)
        if iv_size == 12:  # GCM: an invocation counter about to wrap, as RFC 5647 has it do
            iv = iv[:4] + (2**64 - 3).to_bytes(8, "big")
        return cls(enc_alg, os.urandom(key_size), iv, mac_alg, os.urandom(mac_key_size), etm)

    def encryption(self) -> Encryption:
        """Made by asyncssh's factory as it is now: stock, or replaced by the fast path."""
        return get_encryption(self.alg, self.key, self.iv, self.mac, self.mac_key, self.etm)

    def sizes(self) -> tuple[int, int]:
        """The first block _recv_pkthdr reads, and the MAC's size."""
        _, _, block, _, mac_size, _ = get_encryption_params(self.alg, self.mac)
        return max(8, block), mac_size


def packets() -> list[tuple[int, bytes, bytes]]:
    """(sequence number, header, packet) as send_packet encrypts them; the header is the length,
    the packet starts with the padding length. The sequence number wraps, as it may."""
    out = []
    for seq, size in enumerate(PACKET_SIZES, start=2**32 - 3):
        out.append((seq & 0xFFFFFFFF, size.to_bytes(4, "big"), bytes([4]) + os.urandom(size - 1)))
    return out


def send_all(sender: Encryption, plain: list[tuple[int, bytes, bytes]]) -> list[bytes]:
    return [b"".join(sender.encrypt_packet(seq, hdr, pkt)) for seq, hdr, pkt in plain]


def receive(receiver: Encryption, keys: Keys, seq: int, wire: bytes) -> bytes | None:
    """What _recv_pkthdr and _recv_packet do with one packet's bytes."""
    block, mac_size = keys.sizes()
    first, _ = receiver.decrypt_header(seq, wire[:block], 4)
    end = len(wire) - mac_size
    return receiver.decrypt_packet(seq, first, wire[block:end], 4, wire[end:])


def cipher_class(encryption: Encryption) -> type[Any]:
    return type(vars(encryption)["_cipher"])


@pytest.mark.parametrize(("alg", "mac"), [(alg, "") for alg in AEAD] + ETM)
def test_the_same_bytes_on_the_wire_as_asyncssh(alg: str, mac: str) -> None:
    """On the same keys, stock asyncssh and the fast path encrypt to the same bytes, and each
    decrypts what the other encrypted."""
    keys, plain = Keys.fresh(alg, mac), packets()
    stock_send, stock_recv = keys.encryption(), keys.encryption()
    assert apply(True) is FastPathState.ON
    fast_send, fast_recv = keys.encryption(), keys.encryption()
    if alg in AEAD:  # else this compares asyncssh with itself: CTR is asyncssh's own
        assert cipher_class(fast_send) is not cipher_class(stock_send)
    wire = send_all(stock_send, plain)
    assert send_all(fast_send, plain) == wire
    for (seq, _, packet), data in zip(plain, wire, strict=True):
        assert receive(fast_recv, keys, seq, data) == packet
        assert receive(stock_recv, keys, seq, data) == packet


@pytest.mark.parametrize("fast", [False, True], ids=["stock", "fast"])
@pytest.mark.parametrize(("alg", "mac"), [(alg, "") for alg in AEAD] + ETM[:1])
def test_a_flipped_bit_fails_verification(alg: str, mac: str, fast: bool) -> None:
    """None is what makes asyncssh answer "MAC verification failed" and disconnect: in the
    length (authenticated data), the payload and the tag alike."""
    keys = Keys.fresh(alg, mac)
    apply(fast)
    seq, header, packet = packets()[2]
    (wire,) = send_all(keys.encryption(), [(seq, header, packet)])
    assert receive(keys.encryption(), keys, seq, wire) == packet
    for position in (3, len(wire) // 2, len(wire) - 1):
        tampered = bytearray(wire)
        tampered[position] ^= 1
        assert receive(keys.encryption(), keys, seq, bytes(tampered)) is None


# -- the input buffer ----------------------------------------------------------------------------


def test_the_input_buffer_hands_out_bytes_and_consumes_from_the_front() -> None:
    buffer = _InputBuffer(b"SSH-2.0-peer\r\n")
    buffer += b"\x00\x00\x00\x0cpacket"
    assert buffer.find(b"\n", 0, 255) == 13
    assert buffer[:13] == b"SSH-2.0-peer\r" and type(buffer[:13]) is bytes
    assert type(buffer[14:18]) is bytes and buffer[14:18] == b"\x00\x00\x00\x0c"
    assert buffer[0] == ord("S")
    assert buffer[:] == bytes(buffer) and len(buffer) == 24  # `[:]` is bounded: nothing goes
    rest = buffer[14:]
    assert rest is buffer and bytes(buffer) == b"\x00\x00\x00\x0cpacket"
    buffer += b"more"
    assert bytes(buffer[4:]) == b"packetmore"
    assert not buffer[16:] and buffer is buffer[0:]


def test_asyncssh_assigns_every_open_ended_slice_of_its_buffer_back_to_it() -> None:
    """What _InputBuffer relies on, read from the pinned asyncssh's own source."""
    source = inspect.getsource(asyncssh.connection)
    open_ended = re.findall(r"^.*self\._inpbuf\[[^]:]+:\].*$", source, re.M)
    assert len(open_ended) == 3  # the version line, the packet header, the packet
    for line in open_ended:
        assert re.fullmatch(r"\s*self\._inpbuf = self\._inpbuf\[[^]:]+:\]", line), line


# -- the version guard and the switch ------------------------------------------------------------


def snapshot() -> dict[tuple[str, str, str], object]:
    """Every attribute of every class of the asyncssh modules the fast path touches."""
    found = {}
    for module in MODULES:
        for name, cls in vars(module).items():
            if isinstance(cls, type) and cls.__module__ == module.__name__:
                for attr, value in vars(cls).items():
                    found[module.__name__, name, attr] = value
    return found


def changed_since(before: dict[tuple[str, str, str], object]) -> set[tuple[str, str, str]]:
    after = snapshot()
    return {key for key in before.keys() | after.keys() if before.get(key) is not after.get(key)}


def test_the_pinned_version_replaces_seven_methods_and_remove_puts_them_back() -> None:
    before = snapshot()
    assert apply(True) is FastPathState.ON
    assert fast_path_state() is FastPathState.ON
    assert changed_since(before) == {
        ("asyncssh.connection", "SSHConnection", "send_packet"),
        ("asyncssh.connection", "SSHConnection", "data_received"),
        ("asyncssh.connection", "SSHConnection", "_recv_pkthdr"),
        ("asyncssh.channel", "SSHChannel", "write"),
        ("asyncssh.channel", "SSHChannel", "_flush_send_buf"),
        ("asyncssh.encryption", "GCMEncryption", "new"),
        ("asyncssh.encryption", "ChachaEncryption", "new"),
    }
    fast_path.remove()
    assert changed_since(before) == set()
    assert fast_path_state() is FastPathState.NOT_APPLIED


def test_another_version_leaves_asyncssh_untouched(caplog: pytest.LogCaptureFixture) -> None:
    before = snapshot()
    with caplog.at_level(logging.WARNING, logger="kilnproxy.fast_path"):
        assert apply(True, installed="2.25.0") is FastPathState.UNSUPPORTED
    assert changed_since(before) == set()
    assert fast_path_state() is FastPathState.UNSUPPORTED
    assert [record.getMessage() for record in caplog.records] == [
        "asyncssh 2.25.0 is installed, not 2.24.1: kilnproxy's fast path is off (stock "
        "asyncssh, more CPU per packet); install the version constraints.txt pins"
    ]


def test_switched_off_asyncssh_stays_or_goes_back_to_stock() -> None:
    before = snapshot()
    assert apply(False) is FastPathState.DISABLED
    assert changed_since(before) == set()
    apply(True)
    assert apply(False) is FastPathState.DISABLED
    assert changed_since(before) == set()
    assert fast_path_state() is FastPathState.DISABLED


# -- asyncssh with itself, both ends on the fast path --------------------------------------------


class _Open(asyncssh.SSHServer):
    def begin_auth(self, username: str) -> bool:
        return False  # no authentication: what is tested is the transport


async def _echo(process: asyncssh.SSHServerProcess[bytes]) -> None:
    while chunk := await process.stdin.read(1 << 16):
        process.stdout.write(chunk)
        await process.stdout.drain()
    process.exit(0)


async def echo_through(alg: str, mac: str, data: bytes, rekey_bytes: int) -> bytes:
    """`data` sent to an asyncssh server that echoes it, both ends rekeying every rekey_bytes."""
    algs: dict[str, Any] = {"encryption_algs": [alg], "rekey_bytes": rekey_bytes}
    algs |= {"mac_algs": [mac]} if mac else {}
    server = await asyncssh.listen(
        "127.0.0.1", 0, server_host_keys=[asyncssh.generate_private_key("ssh-ed25519")],
        server_factory=_Open, process_factory=_echo, encoding=None, **algs,
    )  # fmt: skip
    port = server.sockets[0].getsockname()[1]
    try:
        async with (
            asyncssh.connect(
                "127.0.0.1",
                port,
                username="test",
                known_hosts=None,
                config=None,
                client_keys=None,
                agent_path=None,
                **algs,
            ) as conn,
            conn.create_process(encoding=None) as process,
        ):

            async def feed() -> None:
                for start in range(0, len(data), 1 << 16):
                    process.stdin.write(data[start : start + (1 << 16)])
                    await process.stdin.drain()
                process.stdin.write_eof()

            feeder = asyncio.create_task(feed())
            echoed = await process.stdout.read()
            await feeder
            return bytes(echoed)
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize(("alg", "mac"), [(alg, "") for alg in AEAD] + [*ETM, CBC])
def test_asyncssh_rekeying_itself_mid_transfer(
    alg: str, mac: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Key exchanges that asyncssh starts (every 256 KiB, on both ends), each switching the
    fast path's per-key ciphers at the right packet; with uvloop, as kilnproxy runs."""
    apply(True)
    data = os.urandom(4 << 20)
    with caplog.at_level(logging.DEBUG, logger="asyncssh"):
        echoed = uvloop.run(echo_through(alg, mac, data, 256 << 10))
    assert hashlib.sha256(echoed).digest() == hashlib.sha256(data).digest()
    assert len(echoed) == len(data)
    kex = [r for r in caplog.records if r.getMessage().endswith("Requesting key exchange")]
    assert len(kex) >= 2 * 16  # the first on each end, then one every 256 KiB sent
