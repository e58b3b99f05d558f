"""Clients that stop where a test says: for faults that must land mid-way, on a known worker.

- `row_of`: the connection-table row of an ssh client's session, found by its address;
- `bystanders`: one upload-pack conversation held open on each worker;
- `stalled_clone`: a `git clone` suspended once its pack has begun to arrive;
- `RawPush`: git-receive-pack spoken by hand, so that a test decides where a push stops.

They drive real OpenSSH clients through a `Kiln` (harness.py), and they leave nothing behind:
each one kills its client and closes its pipes however the test ends.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from harness import (
    Kiln,
    finish_upload_pack,
    only_worker,
    pack_bytes_received,
    ssh_client_of,
    wait_until,
)


def row_of(kiln: Kiln, ssh_pid: int, timeout: float = 10) -> dict[str, Any]:
    """The connection-table row of an ssh client's session, found by the client's address
    (rows come with the workers' heartbeats, up to a second late)."""
    (sock,) = psutil.Process(ssh_pid).net_connections("tcp")
    address = f"{sock.laddr.ip}:{sock.laddr.port}"
    found: list[dict[str, Any]] = []

    def arrived() -> bool:
        found[:] = [r for r in kiln.connections() if r["remote_addr"] == address]
        return bool(found)

    wait_until(arrived, timeout, f"the session from {address}")
    return found[0]


def release(client: subprocess.Popen[bytes]) -> bytes:
    """Close an ended client's pipes; return what it wrote on stderr."""
    assert client.stdin is not None and client.stdout is not None and client.stderr is not None
    with contextlib.suppress(BrokenPipeError):
        client.stdin.close()
    client.stdout.close()
    with client.stderr:
        return client.stderr.read()


def end(client: subprocess.Popen[bytes]) -> bytes:
    """Whatever state a client is in: kill it if need be, close its pipes; its stderr."""
    if client.poll() is None:
        client.kill()
        client.wait(10)
    if client.stdout is None or client.stdout.closed:
        return b""
    return release(client)


# -- sessions held on every worker ---------------------------------------------------------------


@dataclass
class Bystander:
    """An upload-pack conversation held open on one worker while something else happens."""

    client: subprocess.Popen[bytes]
    worker: int

    def finish(self) -> None:
        """It was untouched: it ends as it would have."""
        assert finish_upload_pack(self.client) == 0
        assert release(self.client) == b""

    def lost(self) -> tuple[int, str]:
        """It was on a worker that died, or it was cut: it ended, with a failure."""
        status = self.client.wait(timeout=10)
        stderr = release(self.client).decode(errors="replace")
        assert status != 0
        return status, stderr


@contextlib.contextmanager
def bystanders(kiln: Kiln, key: Path) -> Iterator[dict[int, Bystander]]:
    """One held session on each worker, by worker index (each begun while only its worker
    accepts)."""
    held: dict[int, Bystander] = {}
    try:
        for index in sorted({int(row["index"]) for row in kiln.workers()}):
            with only_worker(kiln, index):
                client = kiln.ssh_popen(key, "git-upload-pack 'aviato/website.git'")
                held[index] = Bystander(client, index)
                assert client.stdout is not None
                assert b" HEAD\x00" in client.stdout.read(200)  # the advertisement has begun
        for index, bystander in held.items():
            assert int(row_of(kiln, bystander.client.pid)["worker"]) == index
        yield dict(held)
    finally:
        for bystander in held.values():
            end(bystander.client)


# -- a clone held mid-transfer -------------------------------------------------------------------


class StalledClone:
    """A `git clone` stopped mid-pack: its ssh client is suspended once `midway` bytes of the
    pack have arrived, so that a fault surely hits a transfer in progress."""

    def __init__(self, kiln: Kiln, key: Path, repo: str, target: Path, midway: int) -> None:
        self.git = subprocess.Popen(
            ["git", "clone", "-q", kiln.url(repo), str(target)],
            env=kiln.client_env(key), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        self.ssh = ssh_client_of(self.git)
        wait_until(
            lambda: pack_bytes_received(target) >= midway or self.git.poll() is not None,
            30, "the pack to arrive",
        )  # fmt: skip
        self.ssh.suspend()
        assert self.git.poll() is None, "the clone ended before it could be stalled"
        self.worker = int(row_of(kiln, self.ssh.pid)["worker"])

    def resume(self, timeout: float = 30) -> tuple[int, str]:
        """Let it go on; its exit status and stderr once it has ended."""
        with contextlib.suppress(psutil.NoSuchProcess):
            self.ssh.resume()
        _, stderr = self.git.communicate(timeout=timeout)
        return self.git.returncode, stderr.decode(errors="replace")

    def close(self) -> None:
        if self.git.poll() is None:
            self.git.kill()
            with contextlib.suppress(psutil.NoSuchProcess):
                self.ssh.resume()
        self.git.communicate(timeout=10)


@contextlib.contextmanager
def stalled_clone(
    kiln: Kiln, key: Path, repo: str, target: Path, midway: int = 1024 * 1024
) -> Iterator[StalledClone]:
    clone = StalledClone(kiln, key, repo, target, midway)
    try:
        yield clone
    finally:
        clone.close()


# -- a push spoken by hand -----------------------------------------------------------------------


def pkt_line(data: bytes) -> bytes:
    return b"%04x" % (len(data) + 4) + data


class RawPush:
    """git-receive-pack spoken by hand (protocol v0, report-status), one ref."""

    def __init__(self, kiln: Kiln, key: Path, repo: str) -> None:
        self.kiln = kiln
        self.sent = 0  # bytes written to the client's stdin
        self._worker: int | None = None
        self.client = kiln.ssh_popen(key, f"git-receive-pack '{repo}.git'")
        assert self.client.stdin is not None and self.client.stdout is not None
        self.stdin, self.stdout = self.client.stdin, self.client.stdout
        self.advertised = self.read_until_flush()

    def read_exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.stdout.read(n - len(data))
            assert chunk, f"the push ended early after {data!r}"
            data += chunk
        return data

    def read_until_flush(self) -> list[bytes]:
        lines = []
        while size := int(self.read_exact(4), 16):
            lines.append(self.read_exact(size - 4))
        return lines

    def send(self, data: bytes) -> None:
        self.sent += len(data)
        view = memoryview(data)
        while view:
            written = self.stdin.write(view)  # unbuffered: it may take part of it
            assert written is not None
            view = view[written:]

    def update(self, ref: str, old: str, new: str) -> None:
        self.send(pkt_line(f"{old} {new} {ref}\0report-status\n".encode()) + b"0000")

    def relayed(self) -> int:
        """How many of its bytes kilnproxy has passed on, as of the last heartbeat."""
        return int(row_of(self.kiln, self.client.pid)["bytes_in"])

    def worker(self) -> int:
        """The worker serving it (asked once: a push may end before the next heartbeat
        shows its row)."""
        if self._worker is None:
            self._worker = int(row_of(self.kiln, self.client.pid)["worker"])
        return self._worker

    def close(self) -> bytes:
        return end(self.client)
