"""The Unix status socket: one JSON request line in, one JSON reply line out.

The server side belongs to whoever supervises the workers; the CLI is the client. Requests are
`{"command": "status" | "connections" | "kill", "session": ID}`, parsed here, once, into a
`StatusRequest`. A reply is a JSON object, or `{"error": "one line"}`: a malformed request, or
a `KilnproxyError` the handler raised. This module must never import asyncssh (the master
serves this socket).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kilnproxy.errors import KilnproxyError, OperatorError, os_reason

log = logging.getLogger("kilnproxy.status")
MAX_REQUEST = 4096
TIMEOUT = 5.0


class Command(enum.Enum):
    STATUS = "status"
    CONNECTIONS = "connections"
    KILL = "kill"


@dataclass(frozen=True)
class StatusRequest:
    command: Command
    session: str = ""  # the session to kill


Handler = Callable[[StatusRequest], Awaitable[dict[str, Any]]]


class UnknownCommand(OperatorError):
    def __init__(self, command: object) -> None:
        super().__init__(f"unknown command {command!r}")


def parse_request(line: bytes) -> StatusRequest:
    """ValueError if the line is not a JSON object; UnknownCommand if it asks for no command."""
    try:
        data = json.loads(line[:MAX_REQUEST])
    except RecursionError:  # "[[[[…": nested past what the parser recurses into
        raise ValueError("nested too deep") from None
    if not isinstance(data, dict):
        raise ValueError("not an object")
    try:
        command = Command(data.get("command"))
    except ValueError:
        raise UnknownCommand(data.get("command")) from None
    return StatusRequest(command, str(data.get("session", "")))


def claim(path: Path) -> None:
    """Make way for our socket at `path`: a stale socket (nobody listens) is removed. Anything
    else there is left as it is, and the server does not start: a socket another kilnproxy
    answers on (its status commands would reach us), or a file that is no socket at all (a
    mistyped setting must not delete the directory database or a host key)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise OperatorError(f"[status] socket {path}: {os_reason(exc)}") from None
    if not stat.S_ISSOCK(mode):
        raise OperatorError(f"[status] socket {path} exists and is not a socket; not replacing it")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except ConnectionRefusedError:  # stale: its server is gone
            path.unlink()
            return
        except (TimeoutError, BlockingIOError):  # a server too busy to accept: in use
            pass
        except OSError as exc:
            raise OperatorError(f"[status] socket {path}: {os_reason(exc)}") from None
    raise OperatorError(f"[status] socket {path} is in use: is another kilnproxy serving?")


@dataclass
class Listening:
    """The status socket being served; `close` removes its file, unless another server has
    put its own there since."""

    server: asyncio.Server
    path: Path
    inode: tuple[int, int]  # st_dev, st_ino of the socket file we made

    def close(self) -> None:
        self.server.close()
        with contextlib.suppress(OSError):
            info = self.path.lstat()
            if (info.st_dev, info.st_ino) == self.inode:
                self.path.unlink()

    async def wait_closed(self) -> None:
        await self.server.wait_closed()


async def serve(path: Path, handler: Handler) -> Listening:
    """Listen on `path` with mode 0600 (`claim` first)."""
    # Start-up only, before any client is served: blocking file calls are fine here.
    claim(path)

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:  # readline's ValueError: a line over the reader's limit
                line = await asyncio.wait_for(reader.readline(), TIMEOUT)
                reply = await handler(parse_request(line))
            except ValueError as exc:
                reply = {"error": f"bad request: {exc}"}
            except KilnproxyError as exc:  # what the handler cannot do, said in one line
                reply = {"error": str(exc)}
            writer.write(json.dumps(reply, default=str).encode() + b"\n")
            await asyncio.wait_for(writer.drain(), TIMEOUT)
        except (TimeoutError, ConnectionError):
            writer.transport.abort()  # a client that reads nothing must not hold its reply
        except Exception:
            log.exception("status socket request failed")
        finally:
            writer.close()

    old_umask = os.umask(0o177)
    try:
        server = await asyncio.start_unix_server(on_client, path)
    except OSError as exc:  # a path too long for a socket's, a directory we may not write
        raise OperatorError(f"cannot listen on [status] socket {path}: {os_reason(exc)}") from None
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    info = os.lstat(path)
    return Listening(server, path, (info.st_dev, info.st_ino))


def request(path: Path, command: str, **args: str) -> dict[str, Any]:
    """Ask the running server; raise OperatorError if it is not there."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(TIMEOUT)
            sock.connect(str(path))
            sock.sendall(json.dumps({"command": command, **args}).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
    except OSError as exc:
        raise OperatorError(f"cannot reach kilnproxy at {path}: {exc.strerror or exc}") from None
    try:
        reply = json.loads(data)
    except ValueError:
        raise OperatorError(f"unreadable reply from {path}") from None
    if not isinstance(reply, dict):
        raise OperatorError(f"unreadable reply from {path}")
    if "error" in reply:
        raise OperatorError(str(reply["error"]))
    return reply
