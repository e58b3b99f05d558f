"""kilnproxy/ssh/server.py's connection class, against asyncssh's own: at login it keeps the
listener's options, where asyncssh builds a copy of them (in a thread) that each connection then
holds for its life; its channels keep only GIT_PROTOCOL of a client's env requests; and it stops
reading a client that reads nothing."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import asyncssh
import pytest
import uvloop
from asyncssh.packet import SSHPacket

from kilnproxy.config import from_mapping
from kilnproxy.errors import OperatorError
from kilnproxy.ssh import server

OURS_AND_STOCK = pytest.mark.parametrize(
    ("connection", "ours"),
    [(server._Connection, True), (asyncssh.SSHServerConnection, False)],
    ids=["kilnproxy", "stock"],
)


@contextlib.asynccontextmanager
async def connected(
    tmp_path: Path,
    connection: type[asyncssh.SSHServerConnection],
    factory: type[asyncssh.SSHServer],
    **client: Any,
) -> AsyncIterator[asyncssh.SSHClientConnection]:
    """A client of a listener of `connection`s that kilnproxy's options set up, served by
    `factory`; the listener closes after."""
    loop = asyncio.get_running_loop()
    keys = [asyncssh.load_keypairs([asyncssh.generate_private_key("ssh-ed25519")])[0]]
    options = await asyncssh.SSHServerConnectionOptions.construct(
        server.server_options(from_mapping({}, tmp_path), keys), server_factory=factory
    )
    listener = await loop.create_server(lambda: connection(loop, options), "127.0.0.1", 0)
    try:
        conn = await asyncssh.connect(
            "127.0.0.1", listener.sockets[0].getsockname()[1], username="git",
            known_hosts=None, config=None, agent_path=None, **client,
        )  # fmt: skip
        try:
            yield conn
        finally:
            conn.close()
            await conn.wait_closed()
    finally:
        listener.close()


async def options_at_login(
    tmp_path: Path, connection: type[asyncssh.SSHServerConnection]
) -> tuple[bool, bool]:
    """Whether a connection that logged in still holds the listener's options, and whether it
    still takes public keys (what the rebuilt options would have set again)."""
    seen: list[tuple[bool, bool]] = []
    options: object = None

    class Accepting(asyncssh.SSHServer):
        def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
            nonlocal options
            self.conn: Any = conn
            options = options or conn._options  # the listener's, before any login

        def public_key_auth_supported(self) -> bool:
            return True

        def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
            return True

        def auth_completed(self) -> None:
            seen.append((self.conn._options is options, self.conn._public_key_auth))

    async with connected(tmp_path, connection, Accepting,
                         client_keys=[asyncssh.generate_private_key("ssh-ed25519")]):  # fmt: skip
        pass
    assert len(seen) == 1
    return seen[0]


@OURS_AND_STOCK
def test_a_login_keeps_the_listeners_options(
    tmp_path: Path, connection: type[asyncssh.SSHServerConnection], ours: bool
) -> None:
    assert uvloop.run(options_at_login(tmp_path, connection)) == (ours, True)


async def env_and_backlog(
    tmp_path: Path, connection: type[asyncssh.SSHServerConnection]
) -> tuple[dict[str, str], bool, bool]:
    """What a channel kept of a client's `env` requests, and whether the connection stopped
    reading a client that reads nothing (its window 1 GiB) and read again once it did."""
    envs: list[dict[str, str]] = []
    conns: list[Any] = []
    ready, go = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()

    class Flooding(asyncssh.SSHServerSession):  # type: ignore[type-arg]
        def connection_made(self, chan: Any) -> None:
            self.chan = chan

        def exec_requested(self, command: str) -> bool:
            envs.append(dict(self.chan.get_environment()))
            return True

        def session_started(self) -> None:
            self.flooding = loop.create_task(self.flood())

        async def flood(self) -> None:
            await go.wait()  # once the client reads nothing
            for _ in range(256):  # 16 MiB, far past what the kernel's buffers take
                self.chan.write(b"x" * 65536)
            ready.set()

    class Accepting(asyncssh.SSHServer):
        def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
            conns.append(conn)

        def begin_auth(self, username: str) -> bool:
            return False

        def session_requested(self) -> Flooding:
            return Flooding()

    async with connected(tmp_path, connection, Accepting) as client:
        env: Mapping[str | bytes, str | bytes] = {
            "GIT_PROTOCOL": "version=2", "LANG": "C.UTF-8", "PAD": "x" * 200_000
        }  # fmt: skip
        chan, _ = await client.create_session(
            asyncssh.SSHClientSession, "git-upload-pack 'a/b'", env=env, window=1 << 30
        )
        reading = client._transport
        assert reading is not None
        reading.pause_reading()  # reads nothing from now on
        go.set()
        await asyncio.wait_for(ready.wait(), 10)
        await asyncio.sleep(0.1)
        stopped = not conns[0]._transport.is_reading()
        reading.resume_reading()
        await asyncio.sleep(0.5)
        again = conns[0]._transport.is_reading()
        chan.close()
    return envs[0], stopped, again


@OURS_AND_STOCK
def test_a_channel_keeps_only_git_protocol_and_a_client_reading_nothing_is_not_read(
    tmp_path: Path, connection: type[asyncssh.SSHServerConnection], ours: bool
) -> None:
    env, stopped, again = uvloop.run(env_and_backlog(tmp_path, connection))
    if ours:
        assert env == {"GIT_PROTOCOL": "version=2"}
        assert (stopped, again) == (True, True)
    else:  # what asyncssh alone does: keeps all, and reads on while its writes pile up
        assert set(env) == {"GIT_PROTOCOL", "LANG", "PAD"}
        assert (stopped, again) == (False, True)


def test_a_host_key_is_held_to_the_key_policy(tmp_path: Path) -> None:
    """An RSA host key under 2048 bits is refused as a client's would be, in one line."""
    small = tmp_path / "rsa_1024"
    asyncssh.generate_private_key("ssh-rsa", key_size=1024).write_private_key(small)
    with pytest.raises(OperatorError) as refused:
        server.load_host_keys((small,))
    assert (
        str(refused.value) == f"host key {small}: rsa key of 1024 bits is too small (at least 2048)"
    )
    good = tmp_path / "ed25519"
    asyncssh.generate_private_key("ssh-ed25519").write_private_key(good)
    assert len(server.load_host_keys((good,))) == 1


def test_an_rsa_host_key_signs_each_exchange_with_the_algorithm_it_negotiated(
    tmp_path: Path,
) -> None:
    """Every connection of a worker chooses from the same host key pairs, and signs a round
    trip after choosing: a connection that negotiated rsa-sha2-512 signs with it, whatever
    another negotiated meanwhile."""
    path = tmp_path / "ssh_host_rsa_key"
    asyncssh.generate_private_key("ssh-rsa", key_size=2048).write_private_key(path)
    pairs = server.load_host_keys((path,))
    assert [pair.algorithm for pair in pairs] == [b"rsa-sha2-256", b"rsa-sha2-512"]

    async def signed() -> list[bytes]:
        options = await asyncssh.SSHServerConnectionOptions.construct(server_host_keys=pairs)
        loop = asyncio.get_running_loop()
        first, second = (asyncssh.SSHServerConnection(loop, options) for _ in range(2))
        assert first.choose_server_host_key([b"rsa-sha2-512"])  # an OpenSSH client
        assert second.choose_server_host_key([b"rsa-sha2-256", b"ssh-ed25519"])  # a Go client
        keys = (first.get_server_host_key(), second.get_server_host_key())
        return [SSHPacket(key.sign(b"exchange hash")).get_string() for key in keys if key]

    assert uvloop.run(signed()) == [b"rsa-sha2-512", b"rsa-sha2-256"]


class Keytab:
    """What python-gssapi and a readable host keytab would give asyncssh: a GSS server."""

    def __init__(self, host: str, store: object) -> None:
        self.host = host
        self.mechs = [b"\x06\x09*\x86H\x86\xf7\x12\x01\x02\x02"]  # Kerberos 5
        self.complete = False

    def reset(self) -> None:
        pass


def test_a_host_with_a_keytab_still_offers_public_keys_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SPEC 3: public key only, whatever the host has: asyncssh offers GSSAPI login and key
    exchange wherever gssapi imports and a keytab is readable, unless told not to."""
    monkeypatch.setattr(asyncssh.connection, "GSSServer", Keytab)
    keys = [asyncssh.load_keypairs([asyncssh.generate_private_key("ssh-ed25519")])[0]]
    options = server.server_options(from_mapping({}, tmp_path), keys)

    async def offered() -> tuple[bool, bool, bool]:
        conn = server._Connection(asyncio.get_running_loop(), options)
        return conn._gss is not None, conn.gss_mic_auth_supported(), conn._gss_kex

    assert uvloop.run(offered()) == (False, False, False)
