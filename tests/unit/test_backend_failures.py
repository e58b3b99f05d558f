"""A relay that raises on what a pooled backend delivers ends its own session, not the pooled
connection it shares with other sessions: the ssh:// stream's boundary (the agent's is in
test_agent_connection.py), and the agent's own, where a request it did not foresee fails."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import cast

import asyncssh
import pytest
from sinks import RecordingSink

from kilnproxy.agent.channel import Channel
from kilnproxy.backends import local
from kilnproxy.backends.frames import Kind, OpenRequest, frame
from kilnproxy.backends.pool import Link, Pool
from kilnproxy.backends.ssh import SshLink, SshStream


class FakeChannel:
    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


class Connection:
    def close(self) -> None: ...


async def _connect(link: Link[Connection]) -> Connection:
    return Connection()


def test_a_relay_failing_on_ssh_output_ends_its_session_only(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def body() -> None:
        pool = Pool("storage", ("127.0.0.1", 22), _connect, 8, 60.0, 2.0)
        link = await pool.acquire("aviato/website")
        sink = RecordingSink(broken=True)
        # The stream needs only its link's pool: no SSH connection is made here.
        ssh_link = cast(SshLink, link)
        stream = SshStream(sink, ssh_link, "3f9c2a1b", "aviato/website", "/srv/a.git")
        chan = FakeChannel()
        stream.connection_made(chan)  # type: ignore[arg-type]
        stream.data_received(b"fatal: bad line\n", asyncssh.EXTENDED_DATA_STDERR)
        assert (chan.closed, sink.ended, link.active) == (True, ["internal error"], 0)
        stream.data_received(b"more", None)
        assert (sink.stdout, sink.ended) == (b"", ["internal error"])  # nothing more reached it
        await pool.close()

    asyncio.run(body())
    (failure,) = caplog.records
    assert failure.message == "backend storage: failed on its output"
    assert (failure.session, failure.exc_info is not None) == ("3f9c2a1b", True)  # type: ignore[attr-defined]


class Wire:
    write_paused = False

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.forgotten: list[int] = []

    def send(self, data: bytes) -> None:
        self.sent.append(data)

    def forget(self, channel: int) -> None:
        self.forgotten.append(channel)


def test_an_agent_channel_that_fails_to_start_is_refused_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A failure the agent did not foresee (here, starting the command) is still an answer to
    the proxy, at once: REFUSED, not a wait for the proxy's dial timeout."""

    async def broken(*args: object) -> local.LocalStream:
        raise RuntimeError("a bug")

    monkeypatch.setattr("kilnproxy.agent.channel.start_command", broken)
    (tmp_path / "a.git").mkdir()
    request = OpenRequest("3f9c2a1b", "aviato/website", "git-upload-pack",
                          str(tmp_path / "a.git"), {}, 65536)  # fmt: skip
    wire = Wire()
    caplog.set_level(logging.INFO)
    asyncio.run(Channel(wire, 1, request, 65536).start(tmp_path, tmp_path / "hg.rc"))
    assert wire.sent == [frame(Kind.REFUSED, 1, b"internal error")]
    assert wire.forgotten == [1]
    (failure,) = [r for r in caplog.records if r.message.startswith("cannot start")]
    assert failure.session == "3f9c2a1b"  # type: ignore[attr-defined]
    assert "RuntimeError: a bug" in caplog.text
