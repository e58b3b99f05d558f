"""Admitting connections by admission and by their PROXY header: the policy as plain functions,
the settings, and `ProxyListener` on real loopback sockets with a recording hand-off in
asyncssh's place and a recording admission in the worker's."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import uvloop

from kilnproxy.config import SshSettings, from_mapping
from kilnproxy.errors import OperatorError
from kilnproxy.policy.admission import Refusal
from kilnproxy.policy.penalty import PenaltyEvent
from kilnproxy.ssh import proxy_accept
from kilnproxy.ssh.proxy_accept import (
    Admit,
    ProxyListener,
    ProxyMode,
    Refuse,
    TimedOut,
    decide,
    is_health_check,
    peer_allowed,
    refuse_at_accept,
)
from kilnproxy.ssh.proxy_header import ProxyHeader, build_v1, build_v2, parse
from kilnproxy.ssh.services import Startup

CLIENT = ("203.0.113.7", 40000)
HEADER = ProxyHeader(version=1, length=40, source=CLIENT, destination=("10.0.0.1", 22))
LOCAL = ProxyHeader(version=2, length=16, source=None, destination=None)
SSH = b"SSH-2.0-OpenSSH_9.6\r\n"

# -- the policy -----------------------------------------------------------------------------------


NOT_ALLOWED = Refuse(
    "PROXY header from a peer not in [ssh] proxy_allowed", Refusal.PROXY_NOT_ALLOWED
)


def slow(received: int) -> Refuse:
    return Refuse(
        f"no complete PROXY header within 5s ({received} bytes received)", Refusal.PROXY_TIMEOUT
    )


@pytest.mark.parametrize(
    ("mode", "allowed", "seen", "outcome"),
    [
        (ProxyMode.OPTIONAL, True, HEADER, Admit(CLIENT)),
        (ProxyMode.REQUIRE, True, HEADER, Admit(CLIENT)),
        (ProxyMode.REQUIRE, True, LOCAL, Admit(None)),
        (ProxyMode.OPTIONAL, True, None, Admit(None)),
        (ProxyMode.OPTIONAL, False, None, Admit(None)),
        (
            ProxyMode.REQUIRE,
            True,
            None,
            Refuse("no PROXY header (proxy_protocol is 'require')", Refusal.PROXY_HEADER),
        ),
        (ProxyMode.OPTIONAL, False, HEADER, NOT_ALLOWED),
        (ProxyMode.OPTIONAL, False, LOCAL, NOT_ALLOWED),
        (ProxyMode.OPTIONAL, True, TimedOut(0), Admit(None)),
        (ProxyMode.OPTIONAL, True, TimedOut(3), slow(3)),
        (ProxyMode.REQUIRE, True, TimedOut(0), slow(0)),
    ],
)
def test_decide(
    mode: ProxyMode, allowed: bool, seen: ProxyHeader | TimedOut | None, outcome: object
) -> None:
    assert decide(mode, allowed, seen, 5.0) == outcome


def test_require_refuses_other_peers_before_reading() -> None:
    assert refuse_at_accept(ProxyMode.REQUIRE, False) == Refuse(
        "peer not in [ssh] proxy_allowed", Refusal.PROXY_NOT_ALLOWED
    )
    assert refuse_at_accept(ProxyMode.REQUIRE, True) is None
    assert refuse_at_accept(ProxyMode.OPTIONAL, False) is None  # it may still speak plain SSH


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("10.1.2.3", True),
        ("::ffff:10.1.2.3", True),  # an IPv4 peer on a dual-stack socket
        ("11.0.0.1", False),
        ("fd00::1", True),
        ("fe80::1%eth0", False),
        ("2001:db8::1", False),
        ("", False),
        ("not an address", False),
    ],
)
def test_peer_allowed(host: str, allowed: bool) -> None:
    networks = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8"))
    assert peer_allowed(host, networks) is allowed


def test_a_flood_of_bad_headers_is_logged_at_most_burst_lines_a_second(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(proxy_accept, "LOG_BURST", 3)

    async def scenario(listener: ProxyListener, port: int, received: Received) -> None:
        await asyncio.gather(*(send(port, b"PROXY NONSENSE\r\n") for _ in range(10)))
        await until(lambda: listener.statistics().refused == 10)
        await asyncio.sleep(1.1)  # the burst refills
        await send(port, b"PROXY NONSENSE\r\n")
        await until(lambda: listener.statistics().refused == 11)

    with caplog.at_level(logging.WARNING, logger="kilnproxy.proxy"):
        serve(scenario)
    lines = [r.getMessage() for r in caplog.records]
    flood, last = lines[:-1], lines[-1]
    assert 3 <= len(flood) <= 4, lines  # a token may come back while the ten arrive
    assert all(line.startswith("closed connection from 127.0.0.1:") for line in lines)
    held = int(last.rsplit("(", 1)[1].split()[0])
    assert last.endswith(f"({held} more not logged)") and len(flood) + held == 10, lines


# -- the settings ---------------------------------------------------------------------------------


def test_settings_default_to_off(tmp_path: Path) -> None:
    ssh = from_mapping({}, tmp_path).ssh
    assert (ssh.proxy_protocol, ssh.proxy_allowed, ssh.proxy_timeout) == ("off", (), 5.0)


def test_settings_parse(tmp_path: Path) -> None:
    allowed = ["10.0.0.0/8", "2001:db8::/32", "192.0.2.1"]
    raw = {"proxy_protocol": "require", "proxy_allowed": allowed, "proxy_timeout": "500ms"}
    ssh = from_mapping({"ssh": raw}, tmp_path).ssh
    assert ssh.proxy_protocol == "require" and ssh.proxy_timeout == 0.5
    assert [str(n) for n in ssh.proxy_allowed] == ["10.0.0.0/8", "2001:db8::/32", "192.0.2.1/32"]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"proxy_protocol": "on"}, r"proxy_protocol: 'on' is not one of off, optional, require"),
        ({"proxy_protocol": True}, r"proxy_protocol: expected a string"),
        ({"proxy_allowed": "10.0.0.0/8"}, r"proxy_allowed: expected a list of strings"),
        ({"proxy_allowed": ["10.0.0.1/8"]}, r"proxy_allowed: '10.0.0.1/8' is not a network"),
        ({"proxy_allowed": ["lb.example"]}, r"proxy_allowed: 'lb.example' is not a network"),
        ({"proxy_timeout": "0s"}, r"proxy_timeout: '0s' must be longer than zero"),
        ({"proxy_protocol": "optional"}, r"proxy_allowed: the load balancers' networks are needed"),
    ],
)
def test_bad_settings_are_one_line(tmp_path: Path, raw: dict[str, object], message: str) -> None:
    with pytest.raises(OperatorError, match=r"^\[ssh\] " + message) as caught:
        from_mapping({"ssh": raw}, tmp_path)
    assert "\n" not in str(caught.value)


# -- the listener on real sockets -----------------------------------------------------------------

Received = list[tuple[tuple[str, int] | None, bytes]]


class FakeStartup:
    def __init__(self) -> None:
        self.ended: list[str] = []

    def authenticated(self) -> None:
        self.ended.append("authenticated")

    def closed(self, event: PenaltyEvent | None) -> None:
        self.ended.append(f"closed {event}")


class Gatekeeper:
    """Admission in the worker's place: refuses the hosts in `refused`, records every call."""

    def __init__(self, *refused: str) -> None:
        self.refused = set(refused)
        self.asked: list[str] = []
        self.startups: list[FakeStartup] = []

    def __call__(self, client: tuple[str, int]) -> FakeStartup | None:
        self.asked.append(client[0])
        if client[0] in self.refused:
            return None
        self.startups.append(FakeStartup())
        return self.startups[-1]


def settings(mode: str = "optional", timeout: str = "1s") -> SshSettings:
    raw = {"proxy_protocol": mode, "proxy_allowed": ["127.0.0.0/8"], "proxy_timeout": timeout}
    return from_mapping({"ssh": raw}, Path("/")).ssh


handed_after: list[float] = []  # seconds from each accept to its hand-off, the last serve's


def serve(
    scenario: Callable[[ProxyListener, int, Received], Awaitable[None]],
    ssh: SshSettings | None = None,
    admit: Gatekeeper | None = None,
    fail: bool = False,
    counted: list[Refusal] | None = None,
) -> Received:
    """Run `scenario` against a listener on uvloop; the hand-off records what SSH would get
    (or, with `fail`, fails as a connection reset before SSH could start would); `counted`
    gets the refusals /metrics would count."""
    received: Received = []

    async def hand_off(
        conn: socket.socket,
        source: tuple[str, int] | None,
        startup: Startup,
        health_check: bool,
        accepted_at: float,
    ) -> None:
        if fail:
            raise ConnectionResetError(104, "Connection reset by peer")
        loop = asyncio.get_running_loop()
        handed_after.append(loop.time() - accepted_at)
        with conn:
            data = b""
            while chunk := await loop.sock_recv(conn, 4096):
                data += chunk
            received.append((source, data))

    async def main() -> None:
        with socket.create_server(("127.0.0.1", 0)) as sock:
            count = counted.append if counted is not None else lambda kind: None
            listener = ProxyListener(
                sock, ssh or settings(), hand_off, admit or Gatekeeper(), count=count
            )
            await listener.start_serving()
            try:
                await scenario(listener, sock.getsockname()[1], received)
            finally:
                listener.close()
                await listener.wait_closed()

    uvloop.run(main())
    return received


async def send(
    port: int, *parts: bytes, pause: float = 0.0, eof: bool = True, source: str = "127.0.0.1"
) -> bytes:
    """Connect from `source`, send `parts` (pausing between them) and EOF, and read until the
    server closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    try:
        for part in parts:
            writer.write(part)
            await writer.drain()
            await asyncio.sleep(pause)
        if eof:
            writer.write_eof()
        try:
            return await asyncio.wait_for(reader.read(), 5)
        except ConnectionResetError:  # closed with our bytes unread: the kernel sends a reset
            return b""
    finally:
        writer.close()
        with contextlib.suppress(OSError):  # reset, or (closed at accept) never quite up
            await writer.wait_closed()


async def until(condition: Callable[[], bool]) -> None:
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("timed out")


def test_only_the_header_is_consumed() -> None:
    async def scenario(listener: ProxyListener, port: int, received: Received) -> None:
        await send(port, build_v2(CLIENT, ("10.0.0.1", 22), ((1, b"h2"),)) + SSH)
        await send(port, SSH)  # no header: every byte reaches SSH
        await until(lambda: len(received) == 2)

    assert serve(scenario) == [(CLIENT, SSH), (None, SSH)]


def test_a_header_in_pieces_is_read_whole() -> None:
    """And the hand-off says when the connection was accepted: the login grace runs from
    then (SPEC 4), not from the header's end."""
    header = build_v1(CLIENT, ("10.0.0.1", 22))

    async def scenario(listener: ProxyListener, port: int, received: Received) -> None:
        pieces = [header[:1], header[1:7], header[7:30], header[30:], SSH]
        await send(port, *pieces, pause=0.1)

    handed_after.clear()
    assert serve(scenario) == [(CLIENT, SSH)]
    assert handed_after[0] >= 0.25  # three pauses before the header was whole


def test_slow_and_silent_clients(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario(listener: ProxyListener, port: int, received: Received) -> None:
        started = asyncio.get_running_loop().time()
        assert await send(port, b"PROXY TCP4 ", eof=False) == b""
        assert 0.2 < asyncio.get_running_loop().time() - started < 2
        await send(port, eof=False)  # says nothing: in require mode that is refused too
        await send(port)  # closes at once: a balancer's TCP check, not worth a warning

    counted: list[Refusal] = []
    with caplog.at_level(logging.DEBUG, logger="kilnproxy.proxy"):
        received = serve(scenario, settings("require", timeout="300ms"), counted=counted)
    assert received == []
    assert counted == [Refusal.PROXY_TIMEOUT] * 2  # the silent close is no refusal of ours
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(lines) == 2
    assert lines[0].endswith("no complete PROXY header within 300ms (11 bytes received)")
    assert lines[1].endswith("no complete PROXY header within 300ms (0 bytes received)")
    assert caplog.records[-1].getMessage().endswith("closed before sending anything")


def test_pending_headers_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(proxy_accept, "PENDING_LIMIT", 2)

    async def scenario(listener: ProxyListener, port: int, received: Received) -> None:
        silent = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
        await until(lambda: listener.statistics().accepted == 2)
        await asyncio.sleep(0.1)
        assert listener.statistics().pending == 2  # the third waits in the listen queue
        assert listener.statistics().accepted == 2
        _, first = silent.pop(0)
        first.close()  # EOF: that slot is free, and the third is accepted
        await until(lambda: listener.statistics().accepted == 3)
        assert listener.statistics().pending == 2
        assert listener.statistics().refused == 0  # a peer that closes at once is not refused
        listener.close()  # stops accepting; those already accepted are still handed on
        assert not listener.is_serving()
        assert listener.statistics().pending == 2
        for number, (_, writer) in enumerate(silent):
            writer.write(build_v1(CLIENT, ("10.0.0.1", 22)) + f"SSH {number}".encode())
            writer.write_eof()
        await until(lambda: len(received) == 2)
        for _, writer in silent:
            writer.close()

    received = serve(scenario, settings(timeout="30s"))
    assert sorted(received) == [(CLIENT, b"SSH 0"), (CLIENT, b"SSH 1")]


def test_a_stalled_header_does_not_spin_the_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bytes already looked at keep the socket readable; the low-water mark keeps the loop
    from waking for them again and again while the rest of the header is awaited."""
    looks: list[bytes] = []

    def counting_parse(data: bytes) -> object:
        looks.append(data)
        return parse(data)

    monkeypatch.setattr(proxy_accept, "parse", counting_parse)

    async def scenario(listener: ProxyListener, port: int, received: Received) -> None:
        assert await send(port, b"PROXY TCP4 203.0.113.7", eof=False) == b""

    serve(scenario, settings(timeout="500ms"))
    assert 1 <= len(looks) <= 3, len(looks)


def test_a_health_check_is_a_header_without_a_client() -> None:
    local = parse(build_v2(None))
    unknown = parse(build_v1(None))
    client = parse(build_v2(("203.0.113.7", 40000), ("127.0.0.1", 22)))
    assert isinstance(local, ProxyHeader) and is_health_check(local)
    assert isinstance(unknown, ProxyHeader) and is_health_check(unknown)
    assert isinstance(client, ProxyHeader) and not is_health_check(client)
    assert not is_health_check(None) and not is_health_check(TimedOut(0))


def test_a_health_check_is_served_whatever_admission_says() -> None:
    """A flood that fills max_startups must not fail the balancer's checks: they are not put
    to admission (only a peer in proxy_allowed may send one)."""
    gate = Gatekeeper("127.0.0.1")  # the balancer's address, refused as the flood's would be

    async def scenario(listener: ProxyListener, port: int, received: Received) -> None:
        await send(port, build_v2(None) + SSH)
        await send(port, build_v1(CLIENT, ("10.0.0.1", 22)) + SSH)  # a client: admitted
        await until(lambda: len(received) == 2)

    assert serve(scenario, settings(), gate) == [(None, SSH), (CLIENT, SSH)]
    assert gate.asked == [CLIENT[0]]


def test_health_checks_outside_admission_are_few(monkeypatch: pytest.MonkeyPatch) -> None:
    """They are SSH connections like any other: past HEALTH_CHECKS_AT_ONCE still open, one is
    put to admission as the balancer's; one that ended gives its place back."""
    monkeypatch.setattr(proxy_accept, "HEALTH_CHECKS_AT_ONCE", 1)
    gate = Gatekeeper("127.0.0.1")
    startups: list[Startup] = []

    async def keep(conn: socket.socket, _: object, startup: Startup, *rest: object) -> None:
        startups.append(startup)
        conn.close()

    async def main() -> list[int]:
        with socket.create_server(("127.0.0.1", 0)) as sock:
            listener = ProxyListener(sock, settings(), keep, gate)
            await listener.start_serving()
            port = sock.getsockname()[1]
            await send(port, build_v2(None) + SSH)  # outside admission, and still open
            await send(port, build_v2(None) + SSH)  # past the one: the balancer's, refused
            startups[0].closed(None)  # the first ended
            await send(port, build_v2(None) + SSH)  # outside admission again
            listener.close()
            await listener.wait_closed()
        return [listener.statistics().admitted, listener.statistics().refused]

    assert uvloop.run(main()) == [2, 1]
    assert gate.asked == ["127.0.0.1"]


# -- admission at accept ---------------------------------------------------------------------------


def test_without_proxy_protocol_admission_decides_at_accept() -> None:
    """A refused connection is closed before a byte is read or written; an admitted one
    reaches SSH whole, with its startup."""
    gate = Gatekeeper("127.0.0.2")

    async def scenario(listener: ProxyListener, port: int, received: Received) -> None:
        assert await send(port, SSH, source="127.0.0.2") == b""
        await send(port, SSH, source="127.0.0.3")
        await until(lambda: len(received) == 1)
        stats = listener.statistics()
        assert (stats.accepted, stats.admitted, stats.refused) == (2, 1, 1)

    assert serve(scenario, settings("off"), gate) == [(None, SSH)]
    assert gate.asked == ["127.0.0.2", "127.0.0.3"]
    assert [s.ended for s in gate.startups] == [[]]  # SSH's to end: the session ends it


def test_behind_a_balancer_admission_is_asked_with_the_headers_address() -> None:
    gate = Gatekeeper(CLIENT[0])
    header = build_v1(CLIENT, ("10.0.0.1", 22))

    async def scenario(listener: ProxyListener, port: int, received: Received) -> None:
        assert await send(port, header + SSH) == b""
        await send(port, build_v1(("203.0.113.8", 1), ("10.0.0.1", 22)) + SSH)
        await send(port, SSH, source="127.0.0.4")  # a direct client: the peer's address
        await until(lambda: len(received) == 2)

    received = serve(scenario, settings("optional"), gate)
    assert received == [(("203.0.113.8", 1), SSH), (None, SSH)]
    assert gate.asked == [CLIENT[0], "203.0.113.8", "127.0.0.4"]


def test_a_peer_that_may_not_send_a_header_is_put_to_admission_at_accept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """In optional mode a peer outside proxy_allowed is the client whatever it sends: it is
    counted (or refused) at accept, as with the protocol off, so that connections which never
    finish a header cannot fill the pending places and stop the worker accepting."""
    monkeypatch.setattr(proxy_accept, "PENDING_LIMIT", 2)
    gate = Gatekeeper("127.0.0.6")
    raw = {"proxy_protocol": "optional", "proxy_allowed": ["127.0.0.1/32"], "proxy_timeout": "5s"}
    ssh = from_mapping({"ssh": raw}, Path("/")).ssh

    async def scenario(listener: ProxyListener, port: int, received: Received) -> None:
        flood = [await asyncio.open_connection("127.0.0.1", port, local_addr=("127.0.0.6", 0))
                 for _ in range(3)]  # fmt: skip
        for _, writer in flood:
            writer.write(b"P")  # the start of a header, never finished
        await until(lambda: listener.statistics().refused == 3)
        assert listener.statistics().pending == 0
        await send(port, SSH, source="127.0.0.5")
        header = build_v1(CLIENT, ("10.0.0.1", 22))
        assert await send(port, header + SSH, source="127.0.0.5") == b""
        await until(lambda: len(received) == 1 and listener.statistics().refused == 4)
        for _, writer in flood:
            writer.close()

    assert serve(scenario, ssh, gate) == [(None, SSH)]
    assert gate.asked == ["127.0.0.6"] * 3 + ["127.0.0.5"] * 2  # at accept, not by the header
    assert [s.ended for s in gate.startups] == [[], ["closed PenaltyEvent.NOAUTH"]]


def test_a_client_outside_proxy_allowed_that_is_not_served_is_penalised() -> None:
    """Counted at accept, as over plain SSH; and, as over plain SSH, penalised if it ends
    without being served for what it did: a header it started and never finished is a stall
    (grace_exceeded), one it may not send or a close without a word is noauth. Else a few
    sources could hold every startup, `proxy_timeout` at a time, unpenalised."""
    gate = Gatekeeper()
    raw = {
        "proxy_protocol": "optional",
        "proxy_allowed": ["127.0.0.1/32"],
        "proxy_timeout": "300ms",
    }
    ssh = from_mapping({"ssh": raw}, Path("/")).ssh
    header = build_v1(CLIENT, ("10.0.0.1", 22))

    async def scenario(listener: ProxyListener, port: int, received: Received) -> None:
        await send(port, b"PROXY TCP4 ", eof=False, source="127.0.0.7")  # stalls
        await send(port, header + SSH, source="127.0.0.7")  # may not send one
        await send(port, source="127.0.0.7")  # closes without a word
        await send(port, header + SSH)  # the balancer: served, and its client's
        await until(lambda: len(received) == 1)

    counted: list[Refusal] = []
    assert serve(scenario, ssh, gate, counted=counted) == [(CLIENT, SSH)]
    assert counted == [Refusal.PROXY_TIMEOUT, Refusal.PROXY_NOT_ALLOWED]
    assert [s.ended for s in gate.startups] == [
        ["closed PenaltyEvent.GRACE_EXCEEDED"], ["closed PenaltyEvent.NOAUTH"],
        ["closed PenaltyEvent.NOAUTH"], [],
    ]  # fmt: skip


@pytest.mark.parametrize("mode", ["off", "optional"])
def test_a_hand_off_that_fails_ends_its_startup(
    mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    gate = Gatekeeper()

    async def scenario(listener: ProxyListener, port: int, received: Received) -> None:
        await send(port, SSH)
        await until(lambda: listener.statistics().refused == 1)

    with caplog.at_level(logging.WARNING, logger="kilnproxy.proxy"):
        assert serve(scenario, settings(mode), gate, fail=True) == []
    assert [s.ended for s in gate.startups] == [["closed None"]]  # uncounted, not penalised
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.endswith("connection failed: Connection reset by peer")


class Exhausted(socket.socket):
    """A listening socket whose accepts fail as out of descriptors, while `failing` is set."""

    failing = False

    def accept(self) -> tuple[socket.socket, Any]:
        if self.failing:
            raise OSError(24, "Too many open files")
        return super().accept()


def test_an_accept_error_is_waited_out_whatever_else_ends(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """After EMFILE the worker waits ACCEPT_RETRY before it accepts again: a connection whose
    header is done meanwhile (which frees a pending place) does not cut the wait short."""
    monkeypatch.setattr(proxy_accept, "ACCEPT_RETRY", 3.0)
    header = build_v1(CLIENT, ("10.0.0.1", 22))

    async def hand_off(conn: socket.socket, *_: object) -> None:
        conn.close()

    async def main() -> list[str]:
        plain = socket.create_server(("127.0.0.1", 0))
        with Exhausted(plain.family, plain.type, plain.proto, plain.detach()) as sock:
            listener = ProxyListener(sock, settings(), hand_off, Gatekeeper())
            await listener.start_serving()
            port = sock.getsockname()[1]
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(header[:5])  # pending: half a header
            await until(lambda: listener.statistics().pending == 1)
            sock.failing = True
            waiting = await asyncio.open_connection("127.0.0.1", port)  # cannot be accepted
            await until(lambda: "cannot accept" in caplog.text)
            writer.write(header[5:])  # the pending one is done, and frees its place
            await until(lambda: listener.statistics().pending == 0)
            await asyncio.sleep(0.5)  # within ACCEPT_RETRY
            for each in (writer, waiting[1]):
                each.close()
            listener.close()
            await listener.wait_closed()
        return [r.getMessage() for r in caplog.records if "cannot accept" in r.getMessage()]

    with caplog.at_level(logging.ERROR, logger="kilnproxy.proxy"):
        errors = uvloop.run(main())
    assert errors == ["cannot accept: [Errno 24] Too many open files; retrying in 3.0s"]
