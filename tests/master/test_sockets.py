"""The listening sockets systemd hands over (master.sockets.activated)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

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
