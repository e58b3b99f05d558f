"""The PROXY protocol parser: the headers balancers send, every way they can be wrong, and
fuzzed bytes that must never raise anything but ProxyHeaderError."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kilnproxy.ssh.proxy_header import (
    MAX_HEADER,
    V1_MAX,
    V2_MAX_BODY,
    V2_SIGNATURE,
    Address,
    NeedMore,
    ProxyHeader,
    ProxyHeaderError,
    build_v1,
    build_v2,
    parse,
)

SSH = b"SSH-2.0-OpenSSH_9.6\r\n"
FUZZ = settings(database=None, deadline=None, max_examples=1000)


def v2(command: int, family: int, body: bytes) -> bytes:
    return V2_SIGNATURE + struct.pack("!BBH", 0x20 | command, family, len(body)) + body


# -- version 1 ------------------------------------------------------------------------------------


def test_v1_tcp4() -> None:
    line = b"PROXY TCP4 203.0.113.7 10.0.0.1 40000 22\r\n"
    assert parse(line + SSH) == ProxyHeader(
        version=1, length=len(line), source=("203.0.113.7", 40000), destination=("10.0.0.1", 22)
    )


def test_v1_tcp6() -> None:
    line = b"PROXY TCP6 2001:db8::7 2001:db8::1 40000 22\r\n"
    header = parse(line)
    assert isinstance(header, ProxyHeader)
    assert (header.source, header.destination) == (("2001:db8::7", 40000), ("2001:db8::1", 22))
    assert header.length == len(line)


@pytest.mark.parametrize("line", [b"PROXY UNKNOWN\r\n", b"PROXY UNKNOWN ffff::1 ::1 1 2\r\n"])
def test_v1_unknown_is_the_peers_own_connection(line: bytes) -> None:
    assert parse(line + SSH) == ProxyHeader(
        version=1, length=len(line), source=None, destination=None
    )


def test_v1_longest_lines_are_accepted() -> None:
    full = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    line = f"PROXY TCP6 {full} {full} 65535 65535\r\n".encode()
    header = parse(line)
    assert isinstance(header, ProxyHeader)
    assert header.source == (full, 65535)
    worst = f"PROXY UNKNOWN {full} {full} 65535 65535\r\n".encode()  # the spec's worst case
    assert len(worst) == V1_MAX
    assert parse(worst) == ProxyHeader(version=1, length=V1_MAX, source=None, destination=None)


@pytest.mark.parametrize(
    ("data", "need"),
    [
        (b"", 1),
        (b"P", 2),
        (b"PROXY", 6),
        (b"PROXY TCP4 203.0.113.7 10.0.0.1 40000 22", 41),
        (b"PROXY TCP4 203.0.113.7 10.0.0.1 40000 22\r", 42),
    ],
)
def test_v1_incomplete(data: bytes, need: int) -> None:
    assert parse(data) == NeedMore(need)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b"PROXY TCP4 203.0.113.7 10.0.0.1 40000 22\n", "CRLF"),
        (b"PROXY TCP5 203.0.113.7 10.0.0.1 40000 22\r\n", "TCP4, TCP6 or UNKNOWN"),
        (b"PROXY TCP4 203.0.113.7 10.0.0.1 40000\r\n", "four fields"),
        (b"PROXY TCP4  203.0.113.7 10.0.0.1 40000 22\r\n", "four fields"),
        (b"PROXY TCP4 203.0.113.7 10.0.0.1 40000 22 \r\n", "four fields"),
        (b"PROXY TCP4 2001:db8::7 10.0.0.1 40000 22\r\n", "IPv4 address"),
        (b"PROXY TCP6 203.0.113.7 2001:db8::1 40000 22\r\n", "IPv6 address"),
        (b"PROXY TCP4 203.0.113.07 10.0.0.1 40000 22\r\n", "IPv4 address"),
        (b"PROXY TCP6 fe80::1%eth0 2001:db8::1 40000 22\r\n", "IPv6 address"),
        (b"PROXY TCP4 203.0.113.7 10.0.0.1 65536 22\r\n", "port"),
        (b"PROXY TCP4 203.0.113.7 10.0.0.1 040000 22\r\n", "port"),
        (b"PROXY TCP4 203.0.113.7 10.0.0.1 +4000 22\r\n", "port"),
        (b"PROXY TCP4 203.0.113.7 10.0.0.1 \xd9\xa1 22\r\n", "printable ASCII"),
        (b"PROXY TCP4 203.0.113.7\t10.0.0.1 40000 22\r\n", "printable ASCII"),
        (b"PROXY \r\n", "TCP4, TCP6 or UNKNOWN"),
    ],
)
def test_v1_malformed(line: bytes, message: str) -> None:
    with pytest.raises(ProxyHeaderError, match=message):
        parse(line)


def test_v1_oversized() -> None:
    with pytest.raises(ProxyHeaderError, match="longer than 107"):
        parse(b"PROXY UNKNOWN " + b"x" * 200)
    assert parse(b"PROXY UNKNOWN " + b"x" * (V1_MAX - 15)) == NeedMore(V1_MAX)


# -- version 2 ------------------------------------------------------------------------------------


def test_v2_proxy_tcp4_with_tlvs() -> None:
    addresses = bytes([203, 0, 113, 7, 10, 0, 0, 1]) + struct.pack("!HH", 40000, 22)
    tlvs = b"\x01\x00\x02h2" + b"\x04\x00\x00" + b"\xea\x00\x03abc"  # ALPN, NOOP, AWS
    data = v2(1, 0x11, addresses + tlvs)
    assert parse(data + SSH) == ProxyHeader(
        version=2,
        length=len(data),
        source=("203.0.113.7", 40000),
        destination=("10.0.0.1", 22),
        tlvs=((1, b"h2"), (4, b""), (0xEA, b"abc")),
    )


def test_v2_proxy_tcp6() -> None:
    data = build_v2(("2001:db8::7", 40000), ("2001:db8::1", 22))
    assert data[12:14] == b"\x21\x21"
    header = parse(data)
    assert isinstance(header, ProxyHeader)
    assert header.source == ("2001:db8::7", 40000) and header.length == 16 + 36


@pytest.mark.parametrize(
    "data",
    [
        v2(0, 0x00, b""),  # LOCAL: a balancer's health check
        v2(0, 0x11, b"\x00" * 12 + b"\x01\x00\x01x"),  # LOCAL whatever the family says
        v2(0, 0x41, b"\x00" * 12),  # even one no sender may present
        v2(1, 0x00, b"anything"),  # PROXY, UNSPEC
        v2(1, 0x31, b"/run/lb.sock".ljust(216, b"\x00")),  # PROXY, AF_UNIX
    ],
)
def test_v2_without_a_client_address(data: bytes) -> None:
    assert parse(data + SSH) == ProxyHeader(
        version=2, length=len(data), source=None, destination=None
    )


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (V2_SIGNATURE + b"\x11\x11\x00\x0c" + b"\x00" * 12, "version 1"),
        (V2_SIGNATURE + b"\x22\x11\x00\x0c" + b"\x00" * 12, "unknown command 2"),
        (V2_SIGNATURE + b"\x21\x41\x00\x0c" + b"\x00" * 12, "unknown family"),
        (V2_SIGNATURE + b"\x21\x13\x00\x0c" + b"\x00" * 12, "unknown family or protocol"),
        (v2(1, 0x10, b"\x00" * 12), "unknown family or protocol 0x10"),  # IPv4, no protocol
        (v2(1, 0x20, b"\x00" * 36), "unknown family or protocol 0x20"),
        (v2(1, 0x01, b""), "unknown family or protocol 0x01"),  # UNSPEC, with a protocol
        (v2(1, 0x30, b"\x00" * 216), "unknown family or protocol 0x30"),
        (v2(1, 0x11, b"\x00" * 11), "too short for its addresses"),
        (v2(1, 0x21, b"\x00" * 35), "too short for its addresses"),
        (v2(1, 0x11, b"\x00" * 12 + b"\x01\x00"), "truncated TLV"),
        (v2(1, 0x11, b"\x00" * 12 + b"\x01\x00\x05abc"), "TLV longer than the header"),
    ],
)
def test_v2_malformed(data: bytes, message: str) -> None:
    with pytest.raises(ProxyHeaderError, match=message):
        parse(data)


def test_v2_oversized() -> None:
    with pytest.raises(ProxyHeaderError, match="over 4096"):
        parse(V2_SIGNATURE + struct.pack("!BBH", 0x21, 0x11, V2_MAX_BODY + 1))
    padding = V2_MAX_BODY - 12 - 3
    largest = v2(1, 0x11, b"\x00" * 12 + b"\x04" + struct.pack("!H", padding) + b"\x00" * padding)
    assert len(largest) == MAX_HEADER
    assert isinstance(parse(largest), ProxyHeader)


@pytest.mark.parametrize(
    ("data", "need"),
    [(V2_SIGNATURE[:1], 16), (V2_SIGNATURE, 16), (v2(1, 0x11, b"\x00" * 12)[:20], 28)],
)
def test_v2_incomplete(data: bytes, need: int) -> None:
    assert parse(data) == NeedMore(need)


# -- not a header at all --------------------------------------------------------------------------


@pytest.mark.parametrize("data", [SSH, b"S", b"GET / HTTP/1.1\r\n", b"PROXX", b"\r\n\r\n\x01"])
def test_not_a_header(data: bytes) -> None:
    assert parse(data) is None


# -- properties -----------------------------------------------------------------------------------

ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
ports = st.integers(0, 65535)
tlv = st.tuples(st.integers(0, 255), st.binary(max_size=40))
pairs: st.SearchStrategy[tuple[Address, Address]] = st.one_of(
    st.tuples(st.tuples(ipv4, ports), st.tuples(ipv4, ports)),
    st.tuples(st.tuples(ipv6, ports), st.tuples(ipv6, ports)),
)


@FUZZ
@given(pairs, st.lists(tlv, max_size=8).map(tuple), st.binary(max_size=64))
def test_v2_round_trip(
    pair: tuple[Address, Address], tlvs: tuple[tuple[int, bytes], ...], rest: bytes
) -> None:
    data = build_v2(*pair, tlvs)
    assert parse(data + rest) == ProxyHeader(2, len(data), pair[0], pair[1], tlvs)


@FUZZ
@given(pairs, st.binary(max_size=64))
def test_v1_round_trip(pair: tuple[Address, Address], rest: bytes) -> None:
    data = build_v1(*pair)
    assert parse(data + rest) == ProxyHeader(1, len(data), pair[0], pair[1])


@FUZZ
@given(pairs, st.lists(tlv, max_size=4).map(tuple), st.booleans())
def test_every_prefix_asks_for_more_and_nothing_past_the_header(
    pair: tuple[Address, Address], tlvs: tuple[tuple[int, bytes], ...], version_one: bool
) -> None:
    """A reader that waits for what NeedMore asks never waits for a byte past the header."""
    data = build_v1(*pair) if version_one else build_v2(*pair, tlvs)
    for cut in range(len(data)):
        result = parse(data[:cut])
        assert isinstance(result, NeedMore), cut
        assert cut < result.total <= len(data)


def _mutated(data: bytes, index: int, byte: int) -> bytes:
    return data[:index] + bytes([byte]) + data[index + 1 :] if data else data


headers = st.one_of(
    pairs.map(lambda p: build_v1(*p)),
    st.builds(build_v2, st.tuples(ipv4, ports), st.tuples(ipv4, ports), st.lists(tlv).map(tuple)),
    st.builds(build_v2, st.tuples(ipv6, ports), st.tuples(ipv6, ports), st.lists(tlv).map(tuple)),
    st.just(build_v2(None)),
)
v2_shaped = st.builds(
    lambda head, family, length, body: V2_SIGNATURE + bytes([head, family]) + length + body,
    st.sampled_from([0x20, 0x21, 0x22, 0x11, 0x2F]),
    st.sampled_from([0x00, 0x01, 0x11, 0x12, 0x21, 0x22, 0x31, 0x41, 0x13]),
    st.integers(0, 80).map(lambda n: struct.pack("!H", n)),
    st.binary(max_size=100),
)


def _with_tail(header: bytes, tail: bytes) -> bytes:
    """A v2 header whose addresses are followed by `tail` where the TLVs go, length fixed."""
    length = struct.unpack_from("!H", header, 14)[0] + len(tail)
    return header[:14] + struct.pack("!H", length) + header[16:] + tail


v2_tails = st.builds(_with_tail, headers.filter(lambda h: h[:1] == b"\r"), st.binary(max_size=20))
shapes = st.one_of(
    v2_tails,
    st.binary(max_size=MAX_HEADER + 64),
    st.binary().map(lambda b: V2_SIGNATURE + b),
    v2_shaped,
    st.binary(max_size=120).map(lambda b: b"PROXY " + b),
    st.text(alphabet="PROXYTCP46UNKW0123456789abcdef:. \r\n", max_size=120).map(str.encode),
    st.builds(_mutated, headers, st.integers(0, 200), st.integers(0, 255)),
    st.builds(lambda h, n: h[:n], headers, st.integers(0, 200)),
)


@FUZZ
@given(shapes)
def test_fuzzed_bytes_never_raise_anything_else(data: bytes) -> None:
    try:
        result = parse(data)
    except ProxyHeaderError:
        return
    if isinstance(result, ProxyHeader):
        assert result.length <= min(len(data), MAX_HEADER)
    elif isinstance(result, NeedMore):
        assert len(data) < result.total <= MAX_HEADER
