"""The agent leg's receiving side alone: CPU per GB to take frames off a TLS connection.

A thread sends 256 KiB STDOUT frames over TLS 1.3 on 127.0.0.1 (ssl.SSLSocket, as fast as it
can); the main thread takes them on uvloop with a FrameReader, either as a plain Protocol
(`data_received`: uvloop's SSL protocol decrypts into bytes of its own, one per 16 KiB record,
and joins them; the reader then copies them into its area: the extra copy a plain Protocol
costs) or as a BufferedProtocol (`get_buffer`: it decrypts straight into the reader's
area), which is how `backends.wire.FrameConnection` reads. A third way, `socket`, has no event
loop: a blocking ssl.SSLSocket reads into the reader's area, OpenSSL taking the bytes off the
socket itself, not out of a memory BIO that uvloop fills, so nothing is copied into a BIO (nor
zeroed there first); but it reads each 16 KiB record with two reads, its header and then its
body (Python's ssl module cannot turn on OpenSSL's read-ahead), where uvloop takes 256 KiB at a
time. Prints the receiving thread's CPU per GB for each way, with the TLS 1.3 suite negotiated,
alternating. The proxy's whole relay (bench/agent_relay.py) is too noisy on a shared machine to
show a difference of this size; this is not.

Python cannot choose TLS 1.3 suites; OpenSSL's configuration can, to compare them: run with
OPENSSL_CONF naming a file whose `system_default` section (reached from `openssl_conf` through
`ssl_conf`) sets `Ciphersuites`, e.g. to TLS_AES_128_GCM_SHA256 alone.

    python bench/agent_tls_read.py [--gib 1] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import ssl
import sys
import tempfile
import threading
import time
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from agent import Pki, read_frames

from kilnproxy.backends.frames import MAX_PAYLOAD, FrameReader, Kind, data_frames


class Copied(asyncio.Protocol):
    def __init__(self, done: asyncio.Future[int]) -> None:
        self.reader, self.received, self.done = FrameReader(), 0, done

    def data_received(self, data: bytes) -> None:
        for each in read_frames(self.reader, data):
            self.received += len(each.payload)

    def connection_lost(self, exc: Exception | None) -> None:
        self.done.set_result(self.received)


class Buffered(asyncio.BufferedProtocol):
    def __init__(self, done: asyncio.Future[int]) -> None:
        self.reader, self.received, self.done = FrameReader(), 0, done

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.reader.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        for each in self.reader.buffer_updated(nbytes):
            self.received += len(each.payload)

    def connection_lost(self, exc: Exception | None) -> None:
        self.done.set_result(self.received)


def send(listener: socket.socket, context: ssl.SSLContext, total: int) -> None:
    conn, _ = listener.accept()
    with context.wrap_socket(conn, server_side=True) as tls:
        chunk = data_frames(Kind.STDOUT, 1, bytes(MAX_PAYLOAD)) * 4
        for _ in range(0, total, 4 * MAX_PAYLOAD):
            tls.sendall(chunk)


Received = tuple[int, float, str]  # bytes, the receiving thread's CPU seconds, the TLS suite


async def receive(kind: str, port: int, context: ssl.SSLContext) -> Received:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[int] = loop.create_future()
    protocol = Copied if kind == "copied" else Buffered
    started = time.thread_time()
    transport, _ = await loop.create_connection(
        lambda: protocol(done), "127.0.0.1", port, ssl=context, server_hostname="agent.test"
    )
    suite = transport.get_extra_info("cipher")[0]
    received = await done
    return received, time.thread_time() - started, suite


def receive_socket(port: int, context: ssl.SSLContext, total: int) -> Received:
    reader, received = FrameReader(), 0
    plain = socket.create_connection(("127.0.0.1", port))
    started = time.thread_time()
    with context.wrap_socket(plain, server_hostname="agent.test") as tls:
        while received < total:
            count = tls.recv_into(reader.get_buffer())
            if not count:
                break
            for each in reader.buffer_updated(count):
                received += len(each.payload)
        suite = tls.cipher()
    return received, time.thread_time() - started, suite[0] if suite else "?"


def once(kind: str, pki: Pki, total: int) -> tuple[float, str]:
    """The receiving thread's CPU seconds per GB, for one connection of `total` bytes, and the
    TLS suite negotiated."""
    cert, key = pki.issue("agent", "agent.test")
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.minimum_version = ssl.TLSVersion.TLSv1_3
    server.load_cert_chain(cert, key)
    client = ssl.create_default_context(cafile=pki.ca)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        sender = threading.Thread(target=send, args=(listener, server, total), daemon=True)
        sender.start()
        port = listener.getsockname()[1]
        if kind == "socket":
            received, cpu, suite = receive_socket(port, client, total)
        else:
            received, cpu, suite = uvloop.run(receive(kind, port, client))
        sender.join()
    return cpu / (received / 1e9), suite


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0, help="GiB per connection")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        pki = Pki(Path(tmp))
        for _ in range(args.rounds):
            for kind in ("copied", "buffered", "socket"):
                per_gb, suite = once(kind, pki, int(args.gib * (1 << 30)))
                print(f"{kind}: {per_gb:.3f} CPU s/GB ({suite})")


if __name__ == "__main__":
    main()
