"""The one exception root of kilnproxy, split by whose fault an error is.

- ClientError: the client asked for something it may not have (bad command, denied).
- BackendError: the storage behind us failed (unreachable, timed out).
- DirectoryUnavailable: the directory behind us failed; nobody can be let in until it is back.
- OperatorError: the configuration or an admin command is wrong.

Every client-facing error, and every reason for cutting a session, knows the one line the
client sees on stderr and the one exit status it ends with (SPEC 3): `ClientFacing` is that
shape. Anything that is not a KilnproxyError is a bug of ours and is reported to the client as
an internal error. This module must import nothing of ours: everything else imports it.
"""

from __future__ import annotations

import enum
import os
import socket
from typing import Protocol


class ClientFacing(Protocol):
    """What ends a client's command early: one line on its stderr, then one exit status."""

    @property
    def exit_status(self) -> int: ...

    def client_line(self, session_id: str) -> str:
        """The line, newline included, exactly as the client's stderr gets it."""
        ...


def client_line(message: str, session_id: str) -> str:
    """The one shape of a client's error line (SPEC 3): our name, the message, the session."""
    return f"kilnproxy: {message} (session {session_id})\n"


class KilnproxyError(Exception):
    """Root of every error kilnproxy raises on purpose."""


class OperatorError(KilnproxyError):
    """Bad configuration or bad admin input: one line to the operator, exit status 2."""


class ClientError(KilnproxyError):
    """The client's fault. `message` goes to the client's stderr."""

    exit_status = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def client_line(self, session_id: str) -> str:
        return client_line(self.message, session_id)


class BadCommand(ClientError):
    """Unknown or malformed command (SPEC 3: exit 128)."""

    exit_status = 128


class NotFound(ClientError):
    """Repository missing or not readable; one message for both so existence does not leak."""

    def __init__(self, repo: str) -> None:
        super().__init__(f"repository '{repo}' not found or access denied")


class ReadOnly(ClientError):
    """The user may read the repository but this command writes to it."""

    def __init__(self, repo: str) -> None:
        super().__init__(f"you have read-only access to '{repo}'")


class NoShell(ClientError):
    """A shell request: a greeting, and exit status 1."""

    def __init__(self, user: str, account: str) -> None:
        super().__init__(
            f"Hi {user} ({account})! You have authenticated, "
            "but kilnproxy does not provide shell access."
        )

    def client_line(self, session_id: str) -> str:
        # A greeting, not an error: SPEC 3's words alone, without our prefix or the session id.
        return f"{self.message}\n"


class BackendError(KilnproxyError):
    """The storage server failed us; the client is told to try again later, and exits 1.

    `detail` says what failed, for our log; the client is told only which storage.
    """

    exit_status = 1

    def __init__(self, repo: str, detail: str) -> None:
        super().__init__(detail)
        self.repo = repo
        self.detail = detail

    @property
    def message(self) -> str:
        return f"storage for {self.repo} is unavailable, try again later"

    def client_line(self, session_id: str) -> str:
        return client_line(self.message, session_id)


class DirectoryUnavailable(KilnproxyError):
    """The directory cannot be asked (down, unreachable, too slow): the client is told to come
    back later, and no access is decided, neither granted nor denied (SPEC 2)."""

    exit_status = 1
    message = "service temporarily unavailable, try again later"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail

    def client_line(self, session_id: str) -> str:
        return client_line(self.message, session_id)


class CutReason(enum.Enum):
    """Why kilnproxy ended a session that was otherwise going fine."""

    LOGIN_GRACE = "login grace time expired before authentication"
    IDLE = "session idle for too long"
    MAX_SESSION = "session reached its maximum duration"
    DRAIN = "server is restarting and the drain timeout expired"
    # The master is gone: its workers drain on their own, and nothing replaces them.
    DRAIN_STOP = "server is shutting down and the drain timeout expired"
    SHUTDOWN = "server is shutting down"
    ADMIN = "session ended by an administrator"

    @property
    def exit_status(self) -> int:
        return 1  # a property: a class attribute of an Enum would be one more member

    def client_line(self, session_id: str) -> str:
        return client_line(self.value, session_id)


def os_reason(exc: OSError) -> str:
    """What went wrong, in the system's words: a resolver's (a gaierror's errno is negative,
    and has none of os.strerror's), an errno's (asyncio rewords a bind's: "error while
    attempting to bind on address ..."), else the message."""
    if isinstance(exc, socket.gaierror):
        return str(exc.strerror)
    if exc.errno and exc.errno > 0:
        return os.strerror(exc.errno)
    return exc.strerror or str(exc)
