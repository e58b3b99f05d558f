"""Gathering the chunks that arrive in one pass of the event loop into one write.

asyncssh sends every `write()` on a channel as packets of its own (it never merges two writes
into one packet), and each packet costs a fixed amount of Python and cipher work on top of its
bytes. A storage server's sshd sends git's output in the 8 KiB pieces `git upload-pack` writes,
so relaying piece by piece sends the client three to four times as many packets as it needs.
One TCP read from the backend carries dozens of those pieces, all delivered in one callback: a
`Coalescer` collects them and hands them on, joined, once that callback is done.

A chunk of LARGE bytes or more (an agent's frame) is written as it came, never joined: it
fills packets by itself, and joining it would copy every byte once more to save at most one
short packet.

It must never hold bytes longer than the current pass of the loop: `add` schedules the flush
with `call_soon`, and anything that must follow the bytes in order (stderr, EOF, the exit
status) calls `flush` first. A write that raises in that later pass (a bug) is its owner's to
handle (`failed`, called inside the `except`): it ran outside the callback that added the
bytes, whose isolation boundary no longer covers it, and the bytes are lost.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

LARGE = 64 * 1024  # two of asyncssh's 32 KiB packets


class Coalescer:
    __slots__ = ("_chunks", "_failed", "_loop", "_scheduled", "_write")

    def __init__(
        self,
        write: Callable[[bytes], None],
        loop: asyncio.AbstractEventLoop,
        failed: Callable[[], None],
    ) -> None:
        self._write = write
        self._failed = failed
        self._loop = loop
        self._chunks: list[bytes] = []
        self._scheduled = False

    def add(self, data: bytes) -> None:
        self._chunks.append(data)
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._flush_soon)

    def flush(self) -> None:
        """Write what has been gathered now."""
        chunks = self._chunks
        if not chunks:
            return
        self._chunks = []
        small: list[bytes] = []
        for chunk in chunks:
            if len(chunk) < LARGE:
                small.append(chunk)
                continue
            if small:
                self._write_joined(small)
                small = []
            self._write(chunk)
        if small:
            self._write_joined(small)

    def _write_joined(self, chunks: list[bytes]) -> None:
        self._write(chunks[0] if len(chunks) == 1 else b"".join(chunks))

    def discard(self) -> None:
        """Drop what has been gathered: the other side is gone."""
        self._chunks = []

    def _flush_soon(self) -> None:
        self._scheduled = False
        try:
            self.flush()
        except Exception:
            self._failed()
