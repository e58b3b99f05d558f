from __future__ import annotations

import asyncio
import socket

import pytest

from kilnproxy.control import Channel, Kind, Message, decode


def test_round_trip() -> None:
    message = Message(Kind.HEARTBEAT, {"stats": {"sessions": 3}, "sessions": []})
    assert decode(message.encode()) == message


@pytest.mark.parametrize(
    "line",
    [
        b'{"v": 2, "kind": "ready"}\n',
        b'{"kind": "ready"}\n',
        b'{"v": 1, "kind": "nope"}\n',
        b"[]\n",
    ],
)
def test_other_versions_and_kinds_are_refused(line: bytes) -> None:
    with pytest.raises(ValueError):
        decode(line)


def test_a_broken_peer_reads_as_gone() -> None:
    async def exchange() -> list[Message | None]:
        ours, theirs = socket.socketpair()
        channel = await Channel.open(ours)
        theirs.sendall(Message(Kind.READY, {"pid": 1}).encode() + b"garbage\n")
        received = [await channel.receive(), await channel.receive()]
        channel.close()
        theirs.close()
        return received

    first, second = asyncio.run(exchange())
    assert first == Message(Kind.READY, {"pid": 1}) and second is None
