"""The fast path on the wire (kilnproxy/ssh/fast_path.py): a stock OpenSSH client against a real
`kilnproxy serve`, for every cipher and encrypt-then-MAC kilnproxy can offer.

The local backend finds a `git` on its PATH that sends the repository's `payload` file for
upload-pack and prints the sha256 of what it reads for receive-pack, so the bytes are checked
at both ends of the SSH leg. The client is held to one cipher and MAC (-c, -m; what it agreed is
checked), and runs with -vvv, which logs what was negotiated, each SSH2_MSG_IGNORE it receives
and each key exchange: counted, with the fast path off as a control.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import subprocess
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from harness import Kiln

from kilnproxy.policy.access import Role

BIG = 100 << 20  # each cipher and MAC, each way: about 25 s for all on two busy cores
SMALL = 20 << 20  # rekeying, CBC, corruption
GCM = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")
CHACHA = "chacha20-poly1305@openssh.com"
CTR = ("aes128-ctr", "aes192-ctr", "aes256-ctr")
ETM_MACS = (
    "hmac-sha2-256-etm@openssh.com",
    "hmac-sha2-512-etm@openssh.com",
    "umac-64-etm@openssh.com",
    "umac-128-etm@openssh.com",
)
CBC = "aes128-cbc"  # never offered by default (SPEC 3); here to see the countermeasure kept
COMBOS = [
    *[(cipher, "") for cipher in (*GCM, CHACHA)],
    *[(cipher, mac) for cipher in ("aes128-ctr", "aes256-ctr") for mac in ETM_MACS],
    ("aes192-ctr", ETM_MACS[0]),
]
IGNORE_LINE = "Received SSH2_MSG_IGNORE"
NEWKEYS_LINE = "SSH2_MSG_NEWKEYS received"
FAKE_GIT = """#!/bin/sh
case "$1" in
  upload-pack) exec cat "$2/payload" ;;
  receive-pack) exec sha256sum ;;
esac
exit 3
"""


@dataclass
class Payload:
    repo: str
    path: Path
    sha256: str


@dataclass
class Relay:
    kiln: Kiln
    key: Path
    payloads: dict[int, Payload]


@dataclass
class Transfer:
    status: int
    sha256: str
    log: str

    def count(self, line: str) -> int:
        return self.log.count(line)


def start_relay(
    root: Path,
    sizes: tuple[int, ...],
    settings: dict[str, object],
    env: dict[str, str] | None = None,
) -> Relay:
    """A kilnproxy whose repositories each hold a random payload of one of `sizes`."""
    fake = root / "bin"
    fake.mkdir(parents=True)
    (fake / "git").write_text(FAKE_GIT)
    (fake / "git").chmod(0o755)
    algorithms = {"encryption_algs": [*GCM, CHACHA, *CTR, CBC], "mac_algs": list(ETM_MACS)}
    kiln = Kiln(root / "kiln", {"ssh": algorithms | settings})
    key = kiln.add_user("aviato", "alice", Role.WRITE)
    payloads = {}
    for size in sizes:
        repo = f"aviato/payload-{size}"
        path = kiln.add_repo(repo, "git") / "payload"
        data = os.urandom(size)
        path.write_bytes(data)
        payloads[size] = Payload(repo, path, hashlib.sha256(data).hexdigest())
    kiln.start(env={"PATH": f"{fake}{os.pathsep}{os.environ['PATH']}"} | (env or {}))
    return Relay(kiln, key, payloads)


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relay]:
    started = start_relay(tmp_path_factory.mktemp("fast"), (BIG, SMALL), {})
    yield started
    started.kiln.stop()


def transfer(
    relay: Relay, verb: str, payload: Payload, options: list[str], port: int = 0
) -> Transfer:
    """One ssh session: upload-pack sends the payload to us, receive-pack takes it from us and
    answers its sha256. The sha256 returned is of what arrived at the far end."""
    kiln = relay.kiln
    log = kiln.root / "ssh-vvv.log"
    argv = [*kiln.ssh_argv(relay.key, "DEBUG3"), *options, "-p", str(port or kiln.port),
            "git@127.0.0.1", f"git-{verb}-pack '{payload.repo}'"]  # fmt: skip
    with log.open("wb") as stderr, payload.path.open("rb") as data:
        client = subprocess.Popen(
            argv, env=kiln.client_env(relay.key), stdout=subprocess.PIPE, stderr=stderr,
            stdin=data if verb == "receive" else subprocess.DEVNULL,
        )  # fmt: skip
    with client:
        assert client.stdout is not None
        digest, answer = hashlib.sha256(), b""
        while chunk := client.stdout.read(1 << 20):
            digest.update(chunk)
            answer = (answer + chunk)[:200]  # receive-pack's answer is one short line
        status = client.wait(timeout=60)
    arrived = digest.hexdigest() if verb == "upload" else answer.decode().split(" ")[0]
    return Transfer(status, arrived, log.read_text(errors="replace"))


def cipher_options(cipher: str, mac: str) -> list[str]:
    return ["-c", cipher, *(["-m", mac] if mac else [])]


def negotiated(cipher: str, mac: str) -> str:
    """OpenSSH's line for what was agreed, one for each direction."""
    return f"cipher: {cipher} MAC: {mac or '<implicit>'} compression: none"


@pytest.mark.timeout(180)
@pytest.mark.parametrize("verb", ["upload", "receive"])
@pytest.mark.parametrize(("cipher", "mac"), COMBOS)
def test_bytes_arrive_intact_and_no_ignore_is_sent(
    relay: Relay, cipher: str, mac: str, verb: str
) -> None:
    payload = relay.payloads[BIG]
    done = transfer(relay, verb, payload, cipher_options(cipher, mac))
    assert done.status == 0, done.log[-3000:]
    assert done.count(negotiated(cipher, mac)) == 2  # client to server, server to client
    assert done.sha256 == payload.sha256
    assert done.count(IGNORE_LINE) == 0


@pytest.mark.parametrize("verb", ["upload", "receive"])
@pytest.mark.parametrize("cipher", [GCM[0], CHACHA, "aes256-ctr"])
def test_rekeying_mid_transfer(relay: Relay, cipher: str, verb: str) -> None:
    """The client starts a key exchange every MiB: the fast path's ciphers are per key, so each
    new key must take over at exactly the right packet, in both directions."""
    payload = relay.payloads[SMALL]
    options = [*cipher_options(cipher, ETM_MACS[1] if "ctr" in cipher else ""),
               "-o", "RekeyLimit=1M"]  # fmt: skip
    done = transfer(relay, verb, payload, options)
    assert done.status == 0, done.log[-3000:]
    assert done.sha256 == payload.sha256
    assert done.count(NEWKEYS_LINE) >= 10  # the first, then about one per MiB or two
    assert done.count(IGNORE_LINE) == 0


def test_cbc_keeps_its_ignore_packets(relay: Relay) -> None:
    """CBC's countermeasure stays: an empty MSG_IGNORE before each packet."""
    payload = relay.payloads[SMALL]
    done = transfer(relay, "upload", payload, cipher_options(CBC, ETM_MACS[0]))
    assert done.status == 0, done.log[-3000:]
    assert done.count(negotiated(CBC, ETM_MACS[0])) == 2
    assert done.sha256 == payload.sha256
    assert done.count(IGNORE_LINE) > SMALL // (64 << 10)  # one per packet of at most 32 KiB


class CorruptingProxy:
    """A TCP relay to the kilnproxy that flips the lowest bit of one byte the client sends.

    The lowest bit: if it lands in a packet's length (clear for GCM and ETM, a stream cipher's
    for ChaCha20), the length is one off, which the MAC also catches, rather than too large."""

    def __init__(self, target: int, flip_at: int) -> None:
        self.target = target
        self.flip_at = flip_at
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        client, _ = self.listener.accept()
        server = socket.create_connection(("127.0.0.1", self.target))
        back = threading.Thread(target=self._pump, args=(server, client, None), daemon=True)
        back.start()
        self._pump(client, server, self.flip_at)
        back.join(30)
        for sock in (client, server, self.listener):
            sock.close()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket, flip_at: int | None) -> None:
        """Once the sink is gone, what the source sends is read and dropped until it stops: a
        socket closed with bytes unread resets its connection, and the client's ssh could
        then fail a write ("Broken pipe") before it reads why the server hung up."""
        seen = 0
        sinking = True
        try:
            while data := source.recv(1 << 16):
                if flip_at is not None and seen <= flip_at < seen + len(data):
                    flipped = bytearray(data)
                    flipped[flip_at - seen] ^= 1
                    data = bytes(flipped)
                seen += len(data)
                if sinking:
                    try:
                        sink.sendall(data)
                    except OSError:  # the other side hung up: the session is over
                        sinking = False
        except OSError:
            pass
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)


@pytest.mark.parametrize(("cipher", "mac"), [(GCM[0], ""), (CHACHA, ""), (CTR[0], ETM_MACS[2])])
def test_a_corrupted_packet_ends_the_connection(relay: Relay, cipher: str, mac: str) -> None:
    """As asyncssh does: a packet that fails its MAC is a disconnect, not a session going on."""
    kiln = relay.kiln
    proxy = CorruptingProxy(kiln.port, flip_at=1 << 20)  # well past the handshake
    host_key = kiln.known_hosts.read_text().split()[1:]
    with kiln.known_hosts.open("a") as known:
        known.write(f"[127.0.0.1]:{proxy.port} {' '.join(host_key)}\n")
    done = transfer(relay, "receive", relay.payloads[SMALL], cipher_options(cipher, mac),
                    port=proxy.port)  # fmt: skip
    proxy.thread.join(30)
    assert done.status == 255
    assert "MAC verification failed" in done.log
    assert done.count(negotiated(cipher, mac)) == 2


def test_off_sends_stock_asyncssh_ignore_packets(tmp_path: Path) -> None:
    """The control: with `fast_path = false`, asyncssh's MSG_IGNORE before every packet, which
    is what the tests above count."""
    off = start_relay(tmp_path, (4 << 20,), {"fast_path": False})
    try:
        payload = off.payloads[4 << 20]
        done = transfer(off, "upload", payload, cipher_options(GCM[0], ""))
        assert done.status == 0, done.log[-3000:]
        assert done.sha256 == payload.sha256
        assert done.count(IGNORE_LINE) > (4 << 20) // (64 << 10)
        assert fast_path_shown(off.kiln) == "disabled"
    finally:
        off.kiln.stop()


FAULT_INJECTION = Path(__file__).parents[1] / "fault_injection"


def test_another_asyncssh_version_runs_stock_with_a_warning(tmp_path: Path) -> None:
    """The version guard, in a real worker that asyncssh tells it is 2.24.0."""
    env = {"PYTHONPATH": str(FAULT_INJECTION), "KILNPROXY_TEST_ASYNCSSH_VERSION": "2.24.0"}
    other = start_relay(tmp_path, (4 << 20,), {}, env)
    try:
        payload = other.payloads[4 << 20]
        done = transfer(other, "upload", payload, cipher_options(GCM[0], ""))
        assert done.status == 0, done.log[-3000:]
        assert done.sha256 == payload.sha256
        assert done.count(IGNORE_LINE) > (4 << 20) // (64 << 10)
        log = other.kiln.log()
        assert (
            log.count("asyncssh 2.24.0 is installed, not 2.24.1: kilnproxy's fast path is off") == 1
        )
        assert fast_path_shown(other.kiln) == "unsupported"
    finally:
        other.kiln.stop()


def fast_path_shown(kiln: Kiln) -> str:
    """The fast path's state as /info and `kilnproxy status` show it, which must agree."""
    with urllib.request.urlopen(f"http://127.0.0.1:{kiln.http_port}/info", timeout=30) as page:
        info = json.load(page)
    status = kiln.status()
    assert [worker["fast_path"] for worker in status["workers"]] == [info["fast_path"]]
    assert status["fast_path"] == info["fast_path"]
    return str(info["fast_path"])
