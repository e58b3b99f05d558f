"""The PROXY protocol on the SSH listener (SPEC 3): real git and OpenSSH through a loopback relay
that plays the load balancer, prepending a v1 or v2 header with a made-up client address.

203.0.113.7 and 2001:db8::7 are documentation addresses that only ever travel as data inside
a header; nothing connects to them.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import World, make_world
from harness import KILNPROXY, finish_upload_pack, poll, run

from kilnproxy.ssh.proxy_header import build_v1, build_v2

CLIENT = ("203.0.113.7", 40000)
CLIENT6 = ("2001:db8::7", 40001)
BALANCED = {"proxy_protocol": "optional", "proxy_allowed": ["127.0.0.0/8"], "proxy_timeout": "1s"}


class Balancer:
    """A loopback TCP relay in the load balancer's place: for each client connection it opens
    one to the server, sends `header` first, then carries bytes both ways until both sides
    are done."""

    def __init__(self, upstream: int, header: bytes) -> None:
        self.upstream = upstream
        self.header = header
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = self.listener.accept()
                thread = threading.Thread(target=self._relay, args=(client,), daemon=True)
                thread.start()
                self._threads.append(thread)

    def _relay(self, client: socket.socket) -> None:
        with client, socket.create_connection(("127.0.0.1", self.upstream)) as server:
            server.sendall(self.header)
            back = threading.Thread(target=_pump, args=(server, client), daemon=True)
            back.start()
            _pump(client, server)
            back.join(30)

    def close(self) -> None:
        with contextlib.suppress(OSError):  # wakes the accept() that close() alone would not
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        for thread in self._threads:
            thread.join(30)


def _pump(src: socket.socket, dst: socket.socket) -> None:
    """Carry bytes one way; at the end (EOF, or a reset) tell the other side with a FIN."""
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


@contextlib.contextmanager
def balancer(world: World, header: bytes) -> Iterator[Balancer]:
    relay = Balancer(world.kiln.port, header)
    # The client checks the host key under the address it dialled: the relay's.
    line = world.kiln.known_hosts.read_text().splitlines()[0]
    with world.kiln.known_hosts.open("a") as known:
        known.write(line.replace(f"]:{world.kiln.port} ", f"]:{relay.port} ") + "\n")
    try:
        yield relay
    finally:
        relay.close()


def ssh_via(world: World, port: int, command: str, key: Path | None = None) -> Any:
    key = key or world.alice
    argv = [*world.kiln.ssh_argv(key), "-p", str(port), "git@127.0.0.1", command]
    return run(argv, env=world.kiln.client_env(key), input=b"0000", timeout=60, check=False)


def refused_lines(world: World) -> list[str]:
    return re.findall(r"^.*kilnproxy\.proxy closed connection from .*$", world.kiln.log(), re.M)


def wait_for_refusal(world: World, before: int, pattern: str) -> str:
    deadline = time.monotonic() + 10
    while len(lines := refused_lines(world)) == before:
        assert time.monotonic() < deadline, world.kiln.log()[-3000:]
        time.sleep(0.05)
    assert len(lines) == before + 1, lines  # one line per refused connection
    assert re.search(pattern, lines[-1]), lines[-1]
    return lines[-1]


def closed_without_ssh(port: int, data: bytes, wait: float = 10) -> tuple[bytes, float]:
    """Send `data` and read until the server closes: what it sent, and how long that took."""
    started = time.monotonic()
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        sock.sendall(data)
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(4096):
                received += chunk
    return received, time.monotonic() - started


@pytest.fixture(scope="module")
def proxied(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = make_world(tmp_path_factory.mktemp("proxied"), {"ssh": BALANCED})
    yield w
    w.kiln.stop()


# -- optional mode: the balancer's clients and direct clients alike --------------------------------


def test_clone_through_a_v1_balancer_logs_the_clients_address(
    proxied: World, tmp_path: Path
) -> None:
    kiln = proxied.kiln
    with balancer(proxied, build_v1(CLIENT, ("127.0.0.1", kiln.port))) as relay:
        clone = tmp_path / "website"
        url = f"ssh://git@127.0.0.1:{relay.port}/aviato/website.git"
        kiln.git(proxied.alice, "clone", "-q", url, str(clone))
    assert (clone / "README.md").read_bytes() == b"# website\n"
    line = kiln.wait_for_log(r"^.*access .*remote=203\.0\.113\.7:40000 .*verb=git-upload-pack.*$")
    assert "exit=0" in line.group(0)
    assert re.search(r"\[\w{8}\] connection from 203\.0\.113\.7:40000$", kiln.log(), re.M)


def test_connections_show_the_clients_address(proxied: World) -> None:
    kiln = proxied.kiln
    header = build_v2(CLIENT6, ("::1", kiln.port), ((0x04, b"\x00" * 5), (0xE0, b"opaque")))
    with balancer(proxied, header) as relay:
        argv = [*kiln.ssh_argv(proxied.alice), "-p", str(relay.port), "git@127.0.0.1"]
        with subprocess.Popen(
            [*argv, "git-upload-pack 'aviato/website.git'"], env=kiln.client_env(proxied.alice),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0,
        ) as client:  # fmt: skip
            assert client.stdout is not None
            assert b" HEAD\x00" in client.stdout.read(200)
            try:
                (row,) = poll(lambda: [r for r in kiln.connections() if r["repo"]])
                assert row["remote_addr"] == "2001:db8::7:40001"
                cli = run([*KILNPROXY, "connections", "--config", str(kiln.config_path)],
                          env=kiln.server_env())  # fmt: skip
                assert f"{row['session']}  worker 0  2001:db8::7:40001  " in cli.stdout.decode()
                url = f"http://127.0.0.1:{kiln.http_port}/connections"
                with urllib.request.urlopen(url, timeout=30) as response:
                    rows = json.loads(response.read())
                assert [r["remote_addr"] for r in rows] == ["2001:db8::7:40001"]
            finally:
                assert finish_upload_pack(client) == 0
    kiln.wait_for_log(r"access .*remote=2001:db8::7:40001 .*verb=git-upload-pack")


def test_direct_client_and_health_checks_use_the_peers_address(proxied: World) -> None:
    kiln = proxied.kiln
    direct = ssh_via(proxied, kiln.port, "git-upload-pack 'aviato/website'")
    assert direct.returncode == 0, direct.stderr
    assert b"refs/heads/main" in direct.stdout
    for header in (build_v2(None), build_v1(None)):  # LOCAL and UNKNOWN: the balancer itself
        with balancer(proxied, header) as relay:
            reply = ssh_via(proxied, relay.port, "git-upload-pack 'aviato/designs.git'")
        assert reply.returncode == 1
        assert b"not found or access denied" in reply.stderr  # designs is hg: SSH got through
    log = kiln.log()
    remotes = re.findall(r"access .*remote=(\S+) .*repo=aviato/designs ", log)
    assert len(remotes) == 2 and all(r.startswith("127.0.0.1:") for r in remotes), remotes


def test_a_health_check_is_served_and_not_logged_as_a_failed_login(proxied: World) -> None:
    kiln = proxied.kiln
    before = kiln.log().count(" access ")
    # HAProxy's check: a LOCAL header, the banner read, and the connection closed.
    with (
        balancer(proxied, build_v2(None)) as relay,
        socket.create_connection(("127.0.0.1", relay.port), timeout=10) as sock,
    ):
        assert sock.recv(100).startswith(b"SSH-2.0-kilnproxy")
    kiln.wait_idle()
    assert kiln.log().count(" access ") == before  # at debug level only: one a second is noise


def test_a_client_that_waits_for_the_banner_is_served_after_the_timeout(proxied: World) -> None:
    """Optional mode: no byte at all is not a header; after proxy_timeout we speak first."""
    with socket.create_connection(("127.0.0.1", proxied.kiln.port), timeout=10) as sock:
        started = time.monotonic()
        banner = sock.recv(100)
        waited = time.monotonic() - started
    assert banner.startswith(b"SSH-2.0-kilnproxy")
    assert 0.9 < waited < 5


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"PROXY TCP4 203.0.113.7 10.0.0.1 99999 22\r\n", "v1 header has a bad port"),
        (b"PROXY TCP4 " + b"1" * 120, "v1 header longer than 107 bytes"),
        (
            build_v2(CLIENT, ("10.0.0.1", 22))[:14] + b"\xff\xff",
            "v2 header of 65535 bytes is over 4096",
        ),
        (b"PROXY TCP4 203.0.113.7", r"no complete PROXY header within 1s \(22 bytes received\)"),
    ],
    ids=["malformed", "oversized-v1", "oversized-v2", "slow"],
)
def test_bad_headers_close_the_connection_with_one_line(
    proxied: World, data: bytes, reason: str
) -> None:
    before = len(refused_lines(proxied))
    received, took = closed_without_ssh(proxied.kiln.port, data)
    assert received == b""  # closed before any SSH: not even our banner
    wait_for_refusal(proxied, before, rf"closed connection from 127\.0\.0\.1:\d+: {reason}$")
    if reason.startswith("no complete"):
        assert 0.9 < took < 5


def test_a_truncated_header_is_one_line(proxied: World) -> None:
    before = len(refused_lines(proxied))
    with socket.create_connection(("127.0.0.1", proxied.kiln.port), timeout=10) as sock:
        sock.sendall(build_v2(CLIENT, ("10.0.0.1", 22))[:20])
    wait_for_refusal(proxied, before, r"connection closed after 20 bytes of a header$")


def test_sessions_behind_the_balancer_leave_nothing_behind(proxied: World) -> None:
    idle = proxied.kiln.wait_idle()
    with balancer(proxied, build_v1(CLIENT, ("127.0.0.1", 22))) as relay:
        for _ in range(3):
            assert ssh_via(proxied, relay.port, "git-upload-pack 'aviato/website'").returncode == 0
    for data in (b"PROXY junk\r\n", b"PROXY TCP4 1.2.3"):
        closed_without_ssh(proxied.kiln.port, data)
    proxied.kiln.wait_idle()
    baseline = (idle["tasks"], idle["fds"])
    poll(
        lambda: (w := proxied.kiln.worker())["sessions"] == 0 and (w["tasks"], w["fds"]) == baseline
    )
    assert "Traceback" not in proxied.kiln.log()


# -- require mode, and peers not allowed ----------------------------------------------------------


def test_require_closes_connections_without_a_header(tmp_path: Path) -> None:
    """Two workers accept from one queue: the one that loses a race for a connection sees
    EAGAIN and waits for the next."""
    settings: dict[str, dict[str, Any]] = {
        "ssh": {**BALANCED, "proxy_protocol": "require"},
        "workers": {"count": 2},
    }
    world = make_world(tmp_path / "require", settings)
    try:
        kiln = world.kiln
        before = len(refused_lines(world))
        direct = ssh_via(world, kiln.port, "git-upload-pack 'aviato/website'")
        assert direct.returncode == 255
        wait_for_refusal(world, before, r"no PROXY header \(proxy_protocol is 'require'\)$")
        with balancer(world, build_v2(CLIENT, ("127.0.0.1", kiln.port))) as relay:
            for _ in range(4):
                reply = ssh_via(world, relay.port, "git-upload-pack 'aviato/website'")
                assert reply.returncode == 0, reply.stderr
        access = r"access .*remote=(\S+) .*verb=git-upload-pack"
        remotes = poll(lambda: len(r := re.findall(access, kiln.log())) == 4 and r)
        assert remotes == ["203.0.113.7:40000"] * 4
        assert "Traceback" not in kiln.log()
    finally:
        world.kiln.stop()


def test_a_header_from_a_peer_not_allowed_is_refused(tmp_path: Path) -> None:
    settings = {**BALANCED, "proxy_allowed": ["10.0.0.0/8", "fd00::/8"]}
    world = make_world(tmp_path / "not-allowed", {"ssh": settings})
    try:
        kiln = world.kiln
        before = len(refused_lines(world))
        with balancer(world, build_v1(CLIENT, ("127.0.0.1", kiln.port))) as relay:
            reply = ssh_via(world, relay.port, "git-upload-pack 'aviato/website'")
        assert reply.returncode == 255
        pattern = r"127\.0\.0\.1:\d+: PROXY header from a peer not in \[ssh\] proxy_allowed$"
        wait_for_refusal(world, before, pattern)
        assert "203.0.113.7" not in kiln.log()
        direct = ssh_via(world, kiln.port, "git-upload-pack 'aviato/website'")  # plain SSH
        assert direct.returncode == 0, direct.stderr
    finally:
        world.kiln.stop()
