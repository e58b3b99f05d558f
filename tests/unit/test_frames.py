"""The agent protocol's frames (backends.frames): pure encoding and decoding."""

from __future__ import annotations

import pytest
from agent import read_frames

from kilnproxy.backends.frames import (
    HEADER,
    MAX_PAYLOAD,
    READ_AREA,
    Frame,
    FrameError,
    FrameReader,
    Kind,
    OpenRequest,
    count_frame,
    data_frame_of,
    data_frames,
    frame,
)

REQUEST = OpenRequest("0badf00d", "aviato/site", "git-upload-pack", "/srv/a.git",
                      {"KILNPROXY_SESSION": "0badf00d"}, 1 << 20)  # fmt: skip


def _fill(reader: FrameReader, wire: bytes, step: int) -> list[Frame]:
    """`wire` into `reader`, at most `step` bytes per read."""
    frames: list[Frame] = []
    for i in range(0, len(wire), step):
        frames += read_frames(reader, wire[i : i + step])
    return frames


def test_frames_come_out_whole_however_the_bytes_are_cut() -> None:
    wire = (
        REQUEST.encode(3) + data_frames(Kind.STDIN, 3, b"x" * 1000) + count_frame(Kind.EXIT, 3, 128)
    )
    for step in (1, 7, 4096, len(wire)):
        reader = FrameReader()
        frames = _fill(reader, wire, step)
        assert [(f.kind, f.channel) for f in frames] == [
            (Kind.OPEN, 3), (Kind.STDIN, 3), (Kind.EXIT, 3)
        ]  # fmt: skip
        assert OpenRequest.decode(frames[0].payload) == REQUEST
        assert frames[1].payload == b"x" * 1000 and frames[2].count() == 128
        assert reader.pending() == 0


@pytest.mark.parametrize("step", [1000, 100_003, MAX_PAYLOAD + 5, READ_AREA])
def test_a_buffered_reader_gives_the_same_frames_however_the_reads_fall(step: int) -> None:
    """Several areas' worth of frames, cut across frame boundaries (so an incomplete frame is
    moved to the front of the area many times): every payload whole and in order."""
    payloads = [bytes([n]) * size for n, size in
                enumerate([MAX_PAYLOAD, 5, MAX_PAYLOAD - 1, 70_000, MAX_PAYLOAD] * 3)]  # fmt: skip
    wire = b"".join(data_frames(Kind.STDOUT, 7, p) + count_frame(Kind.CREDIT, 7, n)
                    for n, p in enumerate(payloads))  # fmt: skip
    assert len(wire) > 2 * READ_AREA
    reader = FrameReader()
    frames = _fill(reader, wire, step)
    assert [f.payload for f in frames if f.kind is Kind.STDOUT] == payloads
    assert [f.count() for f in frames if f.kind is Kind.CREDIT] == list(range(len(payloads)))
    assert reader.pending() == 0


def test_a_buffered_reader_holds_an_incomplete_frame() -> None:
    reader = FrameReader()
    wire = data_frames(Kind.STDOUT, 1, b"abc" * 100)
    assert _fill(reader, wire[:50], 50) == []
    assert reader.pending() == 50
    (whole,) = _fill(reader, wire[50:], 1 << 20)
    assert whole.payload == b"abc" * 100 and reader.pending() == 0


def test_large_data_is_split_into_frames_of_at_most_256_kib() -> None:
    data = bytes(range(256)) * (MAX_PAYLOAD // 256 * 2 + 10)
    frames = read_frames(FrameReader(), data_frames(Kind.STDOUT, 1, data))
    assert [len(f.payload) for f in frames] == [MAX_PAYLOAD, MAX_PAYLOAD, 2560]
    assert b"".join(f.payload for f in frames) == data
    with pytest.raises(ValueError, match="at most"):
        frame(Kind.STDOUT, 1, bytes(MAX_PAYLOAD + 1))


def test_pieces_make_the_same_frame_as_their_join() -> None:
    pieces = [b"a" * 1000, b"", b"b" * (MAX_PAYLOAD - 1000)]
    assert data_frame_of(Kind.STDOUT, 5, pieces) == frame(Kind.STDOUT, 5, b"".join(pieces))
    with pytest.raises(ValueError, match="at most"):
        data_frame_of(Kind.STDOUT, 5, [*pieces, b"c"])


@pytest.mark.parametrize(
    ("wire", "error"),
    [
        (HEADER.pack(99, 1, 0), "unknown frame kind 99"),
        (HEADER.pack(Kind.STDOUT, 1, MAX_PAYLOAD + 1), "at most"),
        (frame(Kind.OPEN, 1, b"{not json"), "not JSON"),
        (frame(Kind.OPEN, 1, b"[" * 100_000), "not JSON"),  # deeper than the parser goes
        (frame(Kind.OPEN, 1, b'{"verb": "x"}'), "lacks"),
        (frame(Kind.CREDIT, 1, b"12"), "CREDIT frame of 2 bytes"),
    ],
)
def test_a_broken_peer_is_a_frame_error(wire: bytes, error: str) -> None:
    with pytest.raises(FrameError, match=error):
        for each in read_frames(FrameReader(), wire):
            if each.kind is Kind.OPEN:
                OpenRequest.decode(each.payload)
            else:
                each.count()
