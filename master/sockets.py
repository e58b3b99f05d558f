"""The listening sockets: bound from the configuration, or adopted from systemd.

Socket activation (LISTEN_FDS / LISTEN_PID, sd_listen_fds(3)) hands the sockets over as fds
3, 4, ...; they are checked to be listening stream sockets, and the variables are unset so that
no child mistakes them for its own.
"""

from __future__ import annotations

import os
import socket

from kilnproxy.config import Address
from kilnproxy.errors import OperatorError

SD_LISTEN_FDS_START = 3


def activated(environ: dict[str, str] | None = None) -> list[socket.socket]:
    env = os.environ if environ is None else environ
    if env.get("LISTEN_PID") != str(os.getpid()):
        return []
    try:
        count = int(env.get("LISTEN_FDS", "0"))
    except ValueError:
        raise OperatorError(f"LISTEN_FDS={env.get('LISTEN_FDS')!r} is not a number") from None
    sockets = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count):
        sock = socket.socket(fileno=fd)
        if sock.type != socket.SOCK_STREAM or not sock.getsockopt(
            socket.SOL_SOCKET, socket.SO_ACCEPTCONN
        ):
            raise OperatorError(f"socket-activated fd {fd} is not a listening stream socket")
        sockets.append(sock)
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(name, None)
    return sockets


def bind(address: Address, backlog: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    try:
        return socket.create_server(
            (address.host, address.port), family=family, backlog=backlog, reuse_port=False
        )
    except OSError as exc:
        raise OperatorError(f"cannot listen on {address}: {exc.strerror}") from None


def listeners(addresses: tuple[Address, ...], backlog: int) -> list[socket.socket]:
    """systemd's sockets if we were socket-activated, else the configured addresses."""
    sockets = activated()
    if sockets:
        return sockets
    return [bind(address, backlog) for address in addresses]
