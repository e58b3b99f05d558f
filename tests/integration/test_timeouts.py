"""Check 4: login grace, idle and max-session timeouts, each with its own message and log line."""

from __future__ import annotations

import asyncio
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import World, make_world
from harness import hold_tcp

SESSION = r"\(session [0-9a-f]{8}\)"


@pytest.fixture(scope="module")
def short(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    timeouts = {"login_grace": "1s", "idle": "1500ms", "max_session": "3s"}
    w = make_world(tmp_path_factory.mktemp("short"), {"timeouts": timeouts})
    yield w
    w.kiln.stop()


def test_silent_tcp_client_is_cut_at_login_grace(short: World) -> None:
    lasted = asyncio.run(hold_tcp(short.kiln.port, 10))
    assert 0.9 <= lasted < 4, lasted
    short.kiln.wait_for_log(r"cut: login grace time expired before authentication \(1s\)")
    short.kiln.wait_for_log(r"access .*outcome=timeout")


def test_idle_session_is_cut(short: World) -> None:
    with short.kiln.ssh_popen(short.alice, "git-upload-pack 'aviato/website.git'") as client:
        started = time.monotonic()
        client.wait(timeout=15)  # stdin stays open and silent (communicate() would close it)
        lasted = time.monotonic() - started
        assert client.stdout is not None and client.stderr is not None
        stdout, stderr = client.stdout.read(), client.stderr.read()
    assert client.returncode == 1
    assert b"refs/heads/main" in stdout  # the advertisement came, then nothing
    assert re.match(rf"^kilnproxy: session idle for too long {SESSION}$", stderr.decode().strip())
    assert 1.4 <= lasted < 6, lasted
    short.kiln.wait_for_log(r"cut: session idle for too long \(1500ms\)")
    short.kiln.wait_for_log(r"access .*verb=git-upload-pack.*exit=1 outcome=timeout")


def test_a_connection_cut_before_any_command_is_told_why_with_its_session(short: World) -> None:
    """With no channel to write a line to (`ssh -N`), the cut's line is the disconnect's text."""
    kiln = short.kiln
    argv = [*kiln.ssh_argv(short.alice, log_level="INFO"), "-N", "-p", str(kiln.port),
            "git@127.0.0.1"]  # fmt: skip
    done = subprocess.run(argv, env=kiln.client_env(short.alice), stdin=subprocess.DEVNULL,
                          capture_output=True, timeout=20, check=False)  # fmt: skip
    assert re.search(rf": kilnproxy: session idle for too long {SESSION}\r?$", done.stderr.decode(),
                     re.MULTILINE), done.stderr  # fmt: skip


def test_busy_session_is_cut_at_max_session(short: World) -> None:
    with short.kiln.ssh_popen(short.alice, "hg -R aviato/designs serve --stdio") as client:
        lasted, stdout, stderr = chatter_until_cut(client)
    assert client.returncode == 1
    assert b"capabilities:" in stdout
    assert re.search(rf"kilnproxy: session reached its maximum duration {SESSION}", stderr)
    assert 2.8 <= lasted < 8, lasted
    short.kiln.wait_for_log(r"cut: session reached its maximum duration \(3s\)")


def chatter_until_cut(client: subprocess.Popen[bytes]) -> tuple[float, bytes, str]:
    """Say hello to hg every 0.3 s, so idle never fires, until the server ends the session."""
    stop = threading.Event()

    def chatter() -> None:
        assert client.stdin is not None
        try:
            while not stop.is_set():
                client.stdin.write(b"hello\n")
                time.sleep(0.3)
        except (BrokenPipeError, ValueError):
            pass

    writer = threading.Thread(target=chatter, daemon=True)
    started = time.monotonic()
    writer.start()
    try:
        client.wait(timeout=15)
    finally:
        stop.set()
        writer.join(5)
    assert client.stderr is not None and client.stdout is not None
    return time.monotonic() - started, client.stdout.read(), client.stderr.read().decode()


def test_timeouts_do_not_touch_quick_sessions(short: World, tmp_path: Path) -> None:
    short.kiln.git(
        short.alice, "clone", "-q", short.kiln.url("aviato/website"), str(tmp_path / "w")
    )
    assert (tmp_path / "w" / "README.md").exists()
