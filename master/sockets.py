"""The listening sockets: bound from the configuration, or adopted from systemd.

Socket activation (LISTEN_FDS / LISTEN_PID, sd_listen_fds(3)) hands the sockets over as fds
3, 4, ...; they are checked to be listening TCP sockets (a client's address is what admission
and the access log go by: a Unix socket has none), and the variables are unset so that no child
mistakes them for its own. The socket unit's ListenStream= then decides where kilnproxy listens,
not `[ssh] listen`: when the two differ, the master says so once at start, since an operator who
edited one of them expects it to count.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
from collections.abc import Sequence

from kilnproxy.config import Address
from kilnproxy.errors import OperatorError

log = logging.getLogger("kilnproxy.master")

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
        problem = _not_listening_tcp(sock)
        if problem is not None:
            sock.close()
            raise OperatorError(f"socket-activated fd {fd} {problem}")
        sockets.append(sock)
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(name, None)
    return sockets


def _not_listening_tcp(sock: socket.socket) -> str | None:
    if sock.type != socket.SOCK_STREAM or not sock.getsockopt(
        socket.SOL_SOCKET, socket.SO_ACCEPTCONN
    ):
        return "is not a listening stream socket"
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return "is not a TCP socket: give the socket unit ListenStream=PORT or ADDRESS:PORT"
    return None


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
        adopted = [Address(*sock.getsockname()[:2]) for sock in sockets]
        warning = unused_listen(addresses, adopted)
        if warning is not None:
            log.warning("%s", warning)
        return sockets
    return [bind(address, backlog) for address in addresses]


def unused_listen(configured: Sequence[Address], adopted: Sequence[Address]) -> str | None:
    """The warning for `[ssh] listen` naming other addresses than systemd's sockets, else None.

    Order and repeats do not count, and addresses are compared as addresses (`[::0]:22` is
    `[::]:22`). A host name is compared as written, so `localhost:22` is warned about beside
    127.0.0.1:22: looking it up would be a DNS query at every start for an address not used.
    """
    if {_comparable(a) for a in configured} == {_comparable(a) for a in adopted}:
        return None
    return (
        f"[ssh] listen ({_joined(configured)}) is not used: systemd's socket unit hands over "
        f"{_joined(adopted)} (its ListenStream= decides where kilnproxy listens)"
    )


def _comparable(address: Address) -> tuple[str, int]:
    try:
        return str(ipaddress.ip_address(address.host)), address.port
    except ValueError:  # a host name
        return address.host, address.port


def _joined(addresses: Sequence[Address]) -> str:
    return ", ".join(str(address) for address in addresses) or "nothing"
