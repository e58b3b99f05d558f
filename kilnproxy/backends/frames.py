"""The agent protocol's frames (agent:// backends, SPEC 5): encoding and decoding, nothing else.

Both ends import this module: the proxy's `backends.agent` and the storage agent
(`kilnproxy.agent`). It does no I/O and holds no state beyond a decoder's unread bytes.

One TLS connection carries many sessions, each on its own channel (a number the proxy picks).
A frame is a 9-byte header (kind, channel, payload length) and at most MAX_PAYLOAD bytes.
Flow control is per channel and per direction, in credits: a side may send only as many STDIN
(proxy) or STDOUT+STDERR (agent) bytes as the other side has granted with CREDIT frames, and
grants more only once it has passed the bytes on. The proxy never sends past its credit (it
holds the rest of a write, and stops reading its client); the agent may go past its credit by
what it read from the command's pipe at once, and then stops reading it. So a client that stops
reading stops the agent's command, and neither side holds much more than one window per
channel. An agent that drains says so on every connection (DRAINING on CONTROL) before it
refuses anything for it, and refuses an OPEN with DRAINING on that channel: the proxy then opens
it on another connection, perhaps to the agent that replaced this one. Rule: nothing here may
block, read a socket, or know a process.
"""

from __future__ import annotations

import enum
import json
import struct
from dataclasses import dataclass

from kilnproxy.errors import KilnproxyError

HEADER = struct.Struct("!BII")  # kind, channel, payload length
MAX_PAYLOAD = 256 * 1024
_COUNT = struct.Struct("!I")
CONTROL = 0  # the channel of PING, PONG and DRAINING: the connection itself
# FrameReader.get_buffer's area: room for two whole frames. An incomplete frame is moved to the
# front only when less than a frame's room is left. (Four frames' room measured no faster.)
READ_AREA = 2 * (HEADER.size + MAX_PAYLOAD)


class Kind(enum.IntEnum):
    OPEN = 1  # proxy -> agent: an OpenRequest as JSON; the agent answers CREDIT or REFUSED
    STDIN = 2  # proxy -> agent
    STDIN_EOF = 3  # proxy -> agent
    STDOUT = 4  # agent -> proxy
    STDERR = 5  # agent -> proxy
    CREDIT = 6  # either way: this many more bytes may come on the channel
    EXIT = 7  # agent -> proxy: the exit status, after the last byte of output; channel ends
    REFUSED = 8  # agent -> proxy: why the command was not started (UTF-8); channel ends
    CLOSE = 9  # proxy -> agent: abort the command; nothing more comes on the channel
    PING = 10  # either way, on CONTROL: answer PONG
    PONG = 11
    # agent -> proxy. On CONTROL: open no more channels here (running ones go on). On a channel:
    # its OPEN was refused because the agent drains (the channel ends); try another connection.
    DRAINING = 12


class FrameError(KilnproxyError):
    """The peer broke the protocol: the connection cannot be trusted any further."""


@dataclass(frozen=True)
class Frame:
    kind: Kind
    channel: int
    payload: bytes

    def count(self) -> int:
        """The number a CREDIT or EXIT frame carries."""
        if len(self.payload) != _COUNT.size:
            raise FrameError(f"{self.kind.name} frame of {len(self.payload)} bytes")
        value: int = _COUNT.unpack(self.payload)[0]
        return value


@dataclass(frozen=True)
class OpenRequest:
    """What a channel is opened for: one command, in the proxy's words."""

    session: str  # the proxy's session id, for the agent's log lines
    repo: str  # ACCOUNT/NAME, for log lines
    verb: str  # a policy.commands.Verb value; the agent checks it
    path: str  # absolute, on the storage server; the agent confines it to its base
    env: dict[str, str]  # GIT_PROTOCOL and KILNPROXY_* (BackendRequest.environment())
    window: int  # how much output the proxy grants at first

    def encode(self, channel: int) -> bytes:
        body = json.dumps(
            {
                "session": self.session,
                "repo": self.repo,
                "verb": self.verb,
                "path": self.path,
                "env": self.env,
                "window": self.window,
            }
        ).encode()
        return frame(Kind.OPEN, channel, body)

    @classmethod
    def decode(cls, payload: bytes) -> OpenRequest:
        try:
            raw = json.loads(payload)
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # [[[[...: too deep
            raise FrameError(f"OPEN is not JSON: {exc}") from None
        strings = ("session", "repo", "verb", "path")
        if (
            not isinstance(raw, dict)
            or not all(isinstance(raw.get(k), str) for k in strings)
            or not isinstance(raw.get("env"), dict)
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in raw["env"].items())
            or isinstance(raw.get("window"), bool)
            or not isinstance(raw.get("window"), int)
            or raw["window"] < 1
        ):
            raise FrameError("OPEN lacks session, repo, verb, path, env or window")
        return cls(raw["session"], raw["repo"], raw["verb"], raw["path"], raw["env"], raw["window"])


def frame(kind: Kind, channel: int, payload: bytes = b"") -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"a frame carries at most {MAX_PAYLOAD} bytes, not {len(payload)}")
    return HEADER.pack(kind, channel, len(payload)) + payload


def data_frames(kind: Kind, channel: int, data: bytes) -> bytes:
    """`data` as one frame, or as several when it is larger than a frame carries."""
    if len(data) <= MAX_PAYLOAD:
        return HEADER.pack(kind, channel, len(data)) + data
    view = memoryview(data)
    pieces = (view[i : i + MAX_PAYLOAD] for i in range(0, len(data), MAX_PAYLOAD))
    return b"".join(HEADER.pack(kind, channel, len(p)) + p for p in pieces)


def data_frame_of(kind: Kind, channel: int, pieces: list[bytes]) -> bytes:
    """`pieces` (at most MAX_PAYLOAD bytes in all) as one frame: their bytes copied once, with
    the header, where `data_frames(b"".join(pieces))` copies them twice."""
    size = sum(map(len, pieces))
    if size > MAX_PAYLOAD:
        raise ValueError(f"a frame carries at most {MAX_PAYLOAD} bytes, not {size}")
    return b"".join([HEADER.pack(kind, channel, size), *pieces])


def count_frame(kind: Kind, channel: int, value: int) -> bytes:
    """A CREDIT or EXIT frame."""
    return frame(kind, channel, _COUNT.pack(value))


class FrameReader:
    """Bytes in, whole frames out: what a connection's `get_buffer` and `buffer_updated`
    (asyncio.BufferedProtocol) call.

    The TLS layer decrypts straight into the reader's area, and every payload is copied once,
    out of it: this is the proxy's per-byte work on the agent leg. (A plain Protocol would get
    the TLS layer's own bytes, joined from one piece per 16 KiB record, and copy them again.)
    """

    def __init__(self) -> None:
        self._area = bytearray()  # get_buffer's: allocated on first use, never resized
        self._start = 0  # the area's unread bytes are [_start:_end]
        self._end = 0

    def get_buffer(self) -> memoryview:
        """Where the next bytes go: room for at least one whole frame."""
        if not self._area:
            self._area = bytearray(READ_AREA)
        if len(self._area) - self._end < HEADER.size + MAX_PAYLOAD:
            # What is unread is less than one frame (the rest was parsed): move it to the front.
            unread = self._end - self._start
            view = memoryview(self._area)
            view[:unread] = view[self._start : self._end]
            self._start, self._end = 0, unread
        return memoryview(self._area)[self._end :]

    def buffer_updated(self, count: int) -> list[Frame]:
        """`count` bytes were written at the start of what `get_buffer` returned."""
        self._end += count
        frames, used = _parse(memoryview(self._area)[self._start : self._end])
        self._start += used
        if self._start == self._end:
            self._start = self._end = 0
        return frames

    def pending(self) -> int:
        """Bytes of an incomplete frame held (at most one header and MAX_PAYLOAD)."""
        return self._end - self._start


def _parse(view: memoryview) -> tuple[list[Frame], int]:
    """The whole frames at the start of `view`, and how many bytes they took."""
    frames: list[Frame] = []
    start, size = 0, len(view)
    while size - start >= HEADER.size:
        kind, channel, length = HEADER.unpack_from(view, start)
        if length > MAX_PAYLOAD:
            raise FrameError(f"a frame of {length} bytes (at most {MAX_PAYLOAD})")
        end = start + HEADER.size + length
        if end > size:
            break
        try:
            known = Kind(kind)
        except ValueError:
            raise FrameError(f"unknown frame kind {kind}") from None
        frames.append(Frame(known, channel, view[start + HEADER.size : end].tobytes()))
        start = end
    return frames, start
