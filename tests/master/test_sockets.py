"""The listening sockets systemd hands over (master.sockets.activated, listeners)."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import pytest

from kilnproxy.config import Address
from kilnproxy.errors import OperatorError
from master import sockets


def adopt(sock: socket.socket, monkeypatch: pytest.MonkeyPatch) -> list[socket.socket]:
    """`activated` with a copy of `sock` as systemd's first and only socket."""
    monkeypatch.setattr(sockets, "SD_LISTEN_FDS_START", os.dup(sock.fileno()))
    return sockets.activated({"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "1"})


def test_a_tcp_listener_is_adopted(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        (adopted,) = adopt(listener, monkeypatch)
        with adopted:
            assert adopted.getsockname() == listener.getsockname()


def test_a_unix_or_unlistening_socket_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Unix socket has no client address for admission and the access log to go by."""
    with socket.socket(socket.AF_UNIX) as unix:
        unix.bind(str(tmp_path / "ssh.sock"))
        unix.listen()
        with pytest.raises(OperatorError, match=r"is not a TCP socket: give the socket unit"):
            adopt(unix, monkeypatch)
    with socket.socket() as idle, pytest.raises(OperatorError, match="not a listening stream"):
        adopt(idle, monkeypatch)


def test_a_listen_setting_that_systemd_overrides_is_one_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Under socket activation the socket unit's ListenStream= decides; the master says so once
    when `[ssh] listen` names something else, with both."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        configured = (Address("127.0.0.1", port), Address("0.0.0.0", 2222))
        for addresses, warned in ((configured, True), (configured[:1], False)):
            caplog.clear()
            fd = os.dup(listener.fileno())
            monkeypatch.setattr(sockets, "SD_LISTEN_FDS_START", fd)
            monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
            monkeypatch.setenv("LISTEN_FDS", "1")
            with caplog.at_level(logging.WARNING, logger="kilnproxy.master"):
                (adopted,) = sockets.listeners(addresses, backlog=16)
            with adopted:
                assert adopted.fileno() == fd  # systemd's socket, not one bound anew
            lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
            if warned:
                assert lines == [
                    f"[ssh] listen (127.0.0.1:{port}, 0.0.0.0:2222) is not used: systemd's "
                    f"socket unit hands over 127.0.0.1:{port} (its ListenStream= decides where "
                    "kilnproxy listens)"
                ]
            else:
                assert lines == []


def test_listen_addresses_are_compared_as_addresses() -> None:
    v6_any = [Address("::", 22)]
    assert sockets.unused_listen([Address("::0", 22)], v6_any) is None
    both = [Address("10.0.0.1", 22), Address("::1", 22)]
    assert sockets.unused_listen([*reversed(both), both[0]], both) is None
    assert sockets.unused_listen([Address("0.0.0.0", 22)], v6_any) == (
        "[ssh] listen (0.0.0.0:22) is not used: systemd's socket unit hands over [::]:22 "
        "(its ListenStream= decides where kilnproxy listens)"
    )
    assert sockets.unused_listen([Address("localhost", 22)], [Address("127.0.0.1", 22)])
