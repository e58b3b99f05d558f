"""kilnproxy/ssh/server.py's connection class: at login it keeps the listener's options, where
asyncssh builds a copy of them (in a thread) that each connection then holds for its life."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import asyncssh
import pytest
import uvloop

from kilnproxy.config import from_mapping
from kilnproxy.ssh import server


async def options_at_login(
    tmp_path: Path, connection: type[asyncssh.SSHServerConnection]
) -> tuple[bool, bool]:
    """Whether a connection that logged in still holds the listener's options, and whether it
    still takes public keys (what the rebuilt options would have set again)."""
    seen: list[tuple[bool, bool]] = []
    keys = [asyncssh.load_keypairs([asyncssh.generate_private_key("ssh-ed25519")])[0]]

    class Accepting(asyncssh.SSHServer):
        def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
            self.conn: Any = conn

        def public_key_auth_supported(self) -> bool:
            return True

        def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
            return True

        def auth_completed(self) -> None:
            seen.append((self.conn._options is options, self.conn._public_key_auth))

    loop = asyncio.get_running_loop()
    config = from_mapping({}, tmp_path)
    options = await asyncssh.SSHServerConnectionOptions.construct(
        server.server_options(config, keys), server_factory=Accepting
    )
    listener = await loop.create_server(lambda: connection(loop, options), "127.0.0.1", 0)
    try:
        client = await asyncssh.connect(
            "127.0.0.1", listener.sockets[0].getsockname()[1], username="git",
            known_hosts=None, config=None, agent_path=None,
            client_keys=[asyncssh.generate_private_key("ssh-ed25519")],
        )  # fmt: skip
        client.close()
        await client.wait_closed()
    finally:
        listener.close()
    assert len(seen) == 1
    return seen[0]


@pytest.mark.parametrize(
    ("connection", "kept"),
    [(server._Connection, True), (asyncssh.SSHServerConnection, False)],
    ids=["kilnproxy", "stock"],
)
def test_a_login_keeps_the_listeners_options(
    tmp_path: Path, connection: type[asyncssh.SSHServerConnection], kept: bool
) -> None:
    assert uvloop.run(options_at_login(tmp_path, connection)) == (kept, True)
