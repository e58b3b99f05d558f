"""`kilnproxy serve` and signals (SPEC 6): TERM drains, INT is fast, idle connections don't wait."""

from __future__ import annotations

import re
import signal
import subprocess
import time
from collections.abc import Callable

import paramiko
import psutil
from conftest import World
from harness import finish_upload_pack

from kilnproxy.ssh.session import FIRST_COMMAND_GRACE


def test_term_waits_for_a_clone_but_not_for_idle_connections(
    new_world: Callable[..., World],
) -> None:
    w = new_world()
    kiln = w.kiln
    # An authenticated connection that runs no command (ssh -N) has nothing to finish.
    idle = subprocess.Popen(
        [*kiln.ssh_argv(w.alice), "-N", "-p", str(kiln.port), "git@127.0.0.1"],
        env=kiln.client_env(w.alice), stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    # A command in flight: upload-pack waiting for the client's wants.
    with kiln.ssh_popen(w.alice, "git-upload-pack 'aviato/website.git'") as busy:
        assert busy.stdout is not None and busy.stdin is not None
        deadline = time.monotonic() + 10
        while sum(1 for r in kiln.connections() if r["account"]) < 2:
            assert time.monotonic() < deadline, kiln.connections()
            time.sleep(0.05)
        assert kiln.proc is not None
        kiln.proc.send_signal(signal.SIGTERM)
        assert idle.wait(timeout=10) == 255  # hung up at once by the drain
        kiln.wait_for_log(r"closing idle connection for drain")
        time.sleep(0.5)
        assert kiln.proc.poll() is None, "the drain did not wait for the running command"
        assert finish_upload_pack(busy) == 0  # the client finishes its conversation
        assert b"refs/heads/main" in busy.stdout.read()
    assert kiln.proc.wait(timeout=10) == 0
    assert re.search(r"access .*verb=git-upload-pack .*exit=0 outcome=ok", kiln.log())


def test_a_channel_that_never_asks_for_its_command_does_not_hold_a_drain(
    new_world: Callable[..., World],
) -> None:
    """A session channel opened and then left without exec (a library client can do that,
    for as long as `idle` allows): the drain gives it FIRST_COMMAND_GRACE, as a connection
    with no channel yet, then hangs up, and the server exits long before its drain timeout."""
    w = new_world()
    kiln = w.kiln
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
    client.connect("127.0.0.1", kiln.port, "git", key_filename=str(w.alice),
                   look_for_keys=False, allow_agent=False)  # fmt: skip
    try:
        transport = client.get_transport()
        assert transport is not None
        channel = transport.open_session()  # and nothing more (kept: paramiko closes it when
        # it is collected)
        assert kiln.proc is not None
        started = time.monotonic()
        kiln.proc.send_signal(signal.SIGTERM)
        assert kiln.proc.wait(timeout=30) == 0
        assert time.monotonic() - started < FIRST_COMMAND_GRACE + 5
        kiln.wait_for_log(r"closing idle connection for drain")
        assert channel.closed
    finally:
        client.close()


def test_drain_timeout_cuts_with_a_message(new_world: Callable[..., World]) -> None:
    w = new_world({"timeouts": {"drain": "1s"}})
    kiln = w.kiln
    with kiln.ssh_popen(w.alice, "git-upload-pack 'aviato/website.git'") as stuck:
        time.sleep(0.5)
        assert kiln.proc is not None
        kiln.proc.send_signal(signal.SIGTERM)
        assert stuck.wait(timeout=10) == 1
        assert stuck.stderr is not None
        message = stuck.stderr.read().decode()
    assert re.search(r"kilnproxy: server is shutting down and the drain timeout expired", message)
    assert kiln.proc.wait(timeout=10) == 0
    assert re.search(r"access .*outcome=cut", kiln.log())


def test_a_rolling_restart_cuts_no_session_even_past_the_drain_timeout(
    new_world: Callable[..., World],
) -> None:
    """HUP (SPEC 6): no session is cut. A replaced worker waits for its sessions past the drain
    timeout (by `max_session` at the latest); a stop of the server then shortens that wait to
    the drain timeout, and its cut says the server is shutting down."""
    w = new_world({"timeouts": {"drain": "1s"}})
    kiln = w.kiln
    assert kiln.proc is not None
    command = "git-upload-pack 'aviato/website.git'"
    with kiln.ssh_popen(w.alice, command) as finishing, kiln.ssh_popen(w.alice, command) as held:
        deadline = time.monotonic() + 10
        while sum(1 for r in kiln.connections() if r["account"]) < 2:
            assert time.monotonic() < deadline, kiln.connections()
            time.sleep(0.05)
        kiln.proc.send_signal(signal.SIGHUP)
        kiln.wait_for_log(r"rolling restart to generation \d+ complete")
        time.sleep(2)  # the drain timeout, twice over
        assert finishing.poll() is None and held.poll() is None
        assert finish_upload_pack(finishing) == 0
        assert finishing.stdout is not None and b"refs/heads/main" in finishing.stdout.read()
        kiln.proc.send_signal(signal.SIGTERM)
        kiln.wait_for_log(r"server stopping: cutting what is left in 1s")
        assert held.wait(timeout=10) == 1
        assert held.stderr is not None
        told = held.stderr.read().decode()
    assert re.search(r"kilnproxy: server is shutting down and the drain timeout expired", told)
    assert kiln.proc.wait(timeout=10) == 0


def test_int_is_a_fast_shutdown(new_world: Callable[..., World]) -> None:
    w = new_world()
    kiln = w.kiln
    with kiln.ssh_popen(w.alice, "hg -R aviato/designs serve --stdio") as running:
        assert running.stdin is not None and running.stdout is not None
        running.stdin.write(b"hello\n")
        assert running.stdout.readline()
        assert kiln.proc is not None
        started = time.monotonic()
        kiln.proc.send_signal(signal.SIGINT)
        assert kiln.proc.wait(timeout=10) == 0
        assert time.monotonic() - started < 2.5
        assert running.wait(timeout=10) == 1
        assert running.stderr is not None
        assert b"kilnproxy: server is shutting down" in running.stderr.read()


def test_a_fast_shutdown_logs_a_client_that_answers_nothing_too(
    new_world: Callable[..., World],
) -> None:
    """A client that takes nothing more (its ssh stopped) never answers the cut's close: the
    worker hangs up on it before it exits, and its session still has its access line."""
    w = new_world()
    kiln = w.kiln
    with kiln.ssh_popen(w.alice, "git-upload-pack 'aviato/website.git'") as stopped:
        assert stopped.stdout is not None and b" HEAD\x00" in stopped.stdout.read(200)
        client = psutil.Process(stopped.pid)
        client.suspend()
        try:
            assert kiln.proc is not None
            started = time.monotonic()
            kiln.proc.send_signal(signal.SIGINT)
            assert kiln.proc.wait(timeout=10) == 0
            assert time.monotonic() - started < 2.5
        finally:
            client.resume()
            stopped.kill()
    assert re.search(r"hangs up on 1 session\(s\) that a cut did not end", kiln.log())
    assert re.search(r"\] access .*repo=aviato/website .*exit=1 outcome=cut", kiln.log())


def test_second_term_hurries_the_drain(new_world: Callable[..., World]) -> None:
    w = new_world()
    kiln = w.kiln
    with kiln.ssh_popen(w.alice, "git-upload-pack 'aviato/website.git'") as stuck:
        time.sleep(0.5)
        assert kiln.proc is not None
        kiln.proc.send_signal(signal.SIGTERM)
        kiln.wait_for_log(r"worker 0 draining")
        started = time.monotonic()
        kiln.proc.send_signal(signal.SIGTERM)
        assert kiln.proc.wait(timeout=10) == 0
        assert time.monotonic() - started < 2.5
        assert stuck.wait(timeout=10) == 1
