"""What the machine itself costs, so that ratios from different machines can be read together:
its CPU model, and the time of one socket send+recv pair, the per-packet syscall cost a relay
pays (the raw relay throughput of path A, the other machine figure, comes from bench/relay.py).

The pairs are timed from Python in one thread over a loopback TCP connection (TCP_NODELAY): one
`send` of N bytes on one end and the `recv_into` that takes them on the other, N = 64 (the
syscalls alone) and N = 32 KiB (one full SSH channel data packet, with its copies). Each figure
is the median of ROUNDS loops of PAIRS pairs; the interpreter's call overhead is in it, as it is
in the relay's own sends and receives.
"""

from __future__ import annotations

import socket
import statistics
import time
from pathlib import Path
from typing import Any

ROUNDS = 5
PAIRS = 2000


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The first `model name` in /proc/cpuinfo ("unknown" where there is none)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return "unknown"
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == "model name":
            return value.strip()
    return "unknown"


def _loopback_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        sender = socket.create_connection(listener.getsockname())
        receiver, _ = listener.accept()
    for sock in (sender, receiver):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sender, receiver


def send_recv_pair_us(size: int, rounds: int = ROUNDS, pairs: int = PAIRS) -> float:
    """Median microseconds of one send of `size` bytes and the recv_into(s) that take them."""
    payload, buffer = bytes(size), bytearray(size)
    view = memoryview(buffer)
    sender, receiver = _loopback_pair()
    timings = []
    try:
        for _ in range(rounds):
            started = time.perf_counter()
            for _ in range(pairs):
                sender.sendall(payload)
                got = 0
                while got < size:
                    got += receiver.recv_into(view[got:])
            timings.append((time.perf_counter() - started) / pairs * 1e6)
    finally:
        sender.close()
        receiver.close()
    return statistics.median(timings)


def machine_figures(raw_relay_a_mb_per_s: float) -> dict[str, float | str]:
    return {
        "cpu_model": cpu_model(),
        "raw_relay_a_mb_per_s": raw_relay_a_mb_per_s,
        "send_recv_pair_us_64b": send_recv_pair_us(64),
        "send_recv_pair_us_32k": send_recv_pair_us(32 * 1024),
    }


def describe(m: dict[str, Any]) -> list[str]:
    """Markdown list items: the figures and what they measure."""
    return [
        f"- cpu: {m['cpu_model']}",
        f"- machine figures (bench/machine.py): raw relay A {m['raw_relay_a_mb_per_s']:.0f} MB/s; "
        "one socket send+recv pair, i.e. a `send` of N bytes on a loopback TCP connection and "
        "the `recv_into` that takes them at the other end, from one Python thread, median of "
        f"{ROUNDS} loops of {PAIRS} pairs: {m['send_recv_pair_us_64b']:.2f} us "
        f"for N = 64 B, {m['send_recv_pair_us_32k']:.2f} us for N = 32 KiB",
    ]
