"""The PROXY protocol header (HAProxy's proxy-protocol.txt, versions 1 and 2), as bytes in and out.

A load balancer that speaks the PROXY protocol sends one header before the client's first byte:
a text line (`PROXY TCP4 203.0.113.7 10.0.0.1 40000 22\\r\\n`, version 1) or a binary block
(a 12-byte signature, 4 bytes of command, family and length, then addresses and TLVs, version
2). `parse` reads whatever bytes have arrived so far and says: here is a complete header and its
length on the wire, or I need at least N bytes, or these bytes cannot begin a header at all
(the client speaks SSH at once).

Rules: this module never does I/O and never raises anything but `ProxyHeaderError` on any input
(the property tests feed it every shape of bytes). It never accepts more than `MAX_HEADER` bytes,
so a reader that follows `NeedMore` holds a bounded amount. Whether a peer may send a header at
all is not its business (that is the acceptor's, with `[ssh] proxy_allowed`).
"""

from __future__ import annotations

import ipaddress
import re
import struct
from dataclasses import dataclass

from kilnproxy.errors import KilnproxyError

V1_SIGNATURE = b"PROXY "
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_MAX = 107  # the longest version 1 line, CRLF included (proxy-protocol.txt 2.1)
V2_FIXED = 16  # signature, version and command, family and protocol, length
# The spec allows 64 KiB of addresses and TLVs; balancers send a few hundred bytes at most
# (HAProxy's SSL TLVs included), and whatever we accept a slow peer may make us wait for.
V2_MAX_BODY = 4096
MAX_HEADER = V2_FIXED + V2_MAX_BODY

Address = tuple[str, int]

_PORT = re.compile(rb"0|[1-9][0-9]{0,4}")
_PRINTABLE = re.compile(rb"[\x20-\x7e]*")
_V2_HEAD = struct.Struct("!BBH")
_INET = struct.Struct("!4s4sHH")
_INET6 = struct.Struct("!16s16sHH")
_TLV = struct.Struct("!BH")


class ProxyHeaderError(KilnproxyError):
    """The bytes begin a PROXY header but are not a valid one: the connection must end."""


@dataclass(frozen=True)
class ProxyHeader:
    """A complete header. `source` is None when the header gives no client address (v1
    UNKNOWN, v2 LOCAL as in a balancer's health check, v2 UNSPEC or AF_UNIX): the connection
    is then the peer's own."""

    version: int
    length: int  # bytes the header occupies on the wire: exactly these are consumed
    source: Address | None
    destination: Address | None
    tlvs: tuple[tuple[int, bytes], ...] = ()


@dataclass(frozen=True)
class NeedMore:
    """Not decided yet: parse again once at least `total` bytes have arrived."""

    total: int


def parse(data: bytes) -> ProxyHeader | NeedMore | None:
    """Read the header at the start of `data`; None if `data` cannot begin one.

    `data` may hold more than the header (the client's first bytes): `length` says where the
    header ends. Raises ProxyHeaderError for a header that is malformed or too long.
    """
    if data[: len(V1_SIGNATURE)] == V1_SIGNATURE[: len(data)]:
        if len(data) < len(V1_SIGNATURE):
            # Still a possible prefix of either signature (only the empty string is both).
            return NeedMore(len(data) + 1)
        return _parse_v1(data)
    if data[: len(V2_SIGNATURE)] == V2_SIGNATURE[: len(data)]:
        return _parse_v2(data) if len(data) >= V2_FIXED else NeedMore(V2_FIXED)
    return None


# -- version 1: one text line ---------------------------------------------------------------------


def _parse_v1(data: bytes) -> ProxyHeader | NeedMore:
    end = data.find(b"\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX:
            raise ProxyHeaderError(f"v1 header longer than {V1_MAX} bytes")
        return NeedMore(len(data) + 1)
    if data[end - 1 : end] != b"\r":
        raise ProxyHeaderError("v1 header line does not end with CRLF")
    line = data[len(V1_SIGNATURE) : end - 1]
    if not _PRINTABLE.fullmatch(line):
        raise ProxyHeaderError("v1 header has bytes that are not printable ASCII")
    fields = line.split(b" ")
    if fields[0] == b"UNKNOWN":  # whatever follows is to be ignored (proxy-protocol.txt 2.1)
        return ProxyHeader(version=1, length=end + 1, source=None, destination=None)
    if fields[0] not in (b"TCP4", b"TCP6") or len(fields) != 5:
        raise ProxyHeaderError("v1 header is not TCP4, TCP6 or UNKNOWN with four fields")
    version = 4 if fields[0] == b"TCP4" else 6
    source = (_v1_ip(fields[1], version), _v1_port(fields[3]))
    destination = (_v1_ip(fields[2], version), _v1_port(fields[4]))
    return ProxyHeader(version=1, length=end + 1, source=source, destination=destination)


def _v1_ip(text: bytes, version: int) -> str:
    try:
        # Printable ASCII already. A scope (`%eth0`) only means something on the balancer.
        if b"%" in text:
            raise ValueError("scoped address")
        address = ipaddress.ip_address(text.decode())
    except ValueError:
        raise ProxyHeaderError(f"v1 header has a bad IPv{version} address") from None
    if address.version != version:
        raise ProxyHeaderError(f"v1 header has a bad IPv{version} address")
    return str(address)


def _v1_port(text: bytes) -> int:
    if not _PORT.fullmatch(text) or int(text) > 65535:
        raise ProxyHeaderError("v1 header has a bad port")
    return int(text)


# -- version 2: a binary block --------------------------------------------------------------------


# UNSPEC, then TCP and UDP over IPv4 and IPv6, then AF_UNIX stream and datagram: no other byte is
# valid, and a receiver drops what presents one (proxy-protocol.txt 2.2).
_V2_FAMILIES = frozenset({0x00, 0x11, 0x12, 0x21, 0x22, 0x31, 0x32})


def _parse_v2(data: bytes) -> ProxyHeader | NeedMore:
    version_command, family_protocol, body_length = _V2_HEAD.unpack_from(data, 12)
    if version_command >> 4 != 2:
        raise ProxyHeaderError(f"v2 header has version {version_command >> 4}")
    command = version_command & 0x0F
    if command not in (0, 1):  # LOCAL, PROXY
        raise ProxyHeaderError(f"v2 header has unknown command {command}")
    family = family_protocol >> 4
    # A LOCAL header's byte is skipped, whatever it says (proxy-protocol.txt 2.2).
    if command == 1 and family_protocol not in _V2_FAMILIES:
        raise ProxyHeaderError(f"v2 header has unknown family or protocol {family_protocol:#04x}")
    if body_length > V2_MAX_BODY:
        raise ProxyHeaderError(f"v2 header of {body_length} bytes is over {V2_MAX_BODY}")
    length = V2_FIXED + body_length
    if len(data) < length:
        return NeedMore(length)
    body = data[V2_FIXED:length]
    # LOCAL (a health check), UNSPEC and AF_UNIX carry no client address we can use: the
    # connection is the peer's own, and the block is skipped whole (proxy-protocol.txt 2.2).
    if command == 0 or family in (0, 3):
        return ProxyHeader(version=2, length=length, source=None, destination=None)
    layout, kind = (
        (_INET, ipaddress.IPv4Address) if family == 1 else (_INET6, ipaddress.IPv6Address)
    )
    if body_length < layout.size:
        raise ProxyHeaderError(f"v2 header too short for its addresses ({body_length} bytes)")
    src, dst, src_port, dst_port = layout.unpack_from(body)
    return ProxyHeader(
        version=2,
        length=length,
        source=(str(kind(src)), src_port),
        destination=(str(kind(dst)), dst_port),
        tlvs=_tlvs(body[layout.size :]),
    )


def _tlvs(block: bytes) -> tuple[tuple[int, bytes], ...]:
    """The TLVs after the addresses. None of them changes what we do with the connection, but
    one that runs past the block makes the whole header malformed, as HAProxy holds it."""
    out = []
    offset = 0
    while offset < len(block):
        if len(block) - offset < _TLV.size:
            raise ProxyHeaderError("v2 header has a truncated TLV")
        kind, size = _TLV.unpack_from(block, offset)
        offset += _TLV.size
        if len(block) - offset < size:
            raise ProxyHeaderError("v2 header has a TLV longer than the header")
        out.append((kind, block[offset : offset + size]))
        offset += size
    return tuple(out)


# -- building headers (what a balancer sends; tests and tools use it) -----------------------------


def build_v1(source: Address | None, destination: Address | None = None) -> bytes:
    """A version 1 line; `PROXY UNKNOWN` when there is no source."""
    if source is None or destination is None:
        return b"PROXY UNKNOWN\r\n"
    version = ipaddress.ip_address(source[0]).version
    if ipaddress.ip_address(destination[0]).version != version:
        raise ValueError("source and destination must be of one address family")
    family = "TCP4" if version == 4 else "TCP6"
    return f"PROXY {family} {source[0]} {destination[0]} {source[1]} {destination[1]}\r\n".encode()


def build_v2(
    source: Address | None,
    destination: Address | None = None,
    tlvs: tuple[tuple[int, bytes], ...] = (),
) -> bytes:
    """A version 2 block: PROXY over TCP with TLVs, or LOCAL when there is no source."""
    tail = b"".join(_TLV.pack(kind, len(value)) + value for kind, value in tlvs)
    if source is None or destination is None:
        return V2_SIGNATURE + _V2_HEAD.pack(0x20, 0x00, len(tail)) + tail
    src, dst = ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])
    if src.version != dst.version:
        raise ValueError("source and destination must be of one address family")
    layout, family = (_INET, 0x11) if src.version == 4 else (_INET6, 0x21)
    body = layout.pack(src.packed, dst.packed, source[1], destination[1]) + tail
    return V2_SIGNATURE + _V2_HEAD.pack(0x21, family, len(body)) + body
