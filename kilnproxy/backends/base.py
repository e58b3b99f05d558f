"""What a backend is: something that runs a repository command and streams it back.

A backend's stream and the relay talk through two small interfaces with flow control both ways:
the relay writes the client's bytes into the `BackendStream`, and the backend reports output,
back-pressure and the final exit status to a `BackendSink`. No buffering happens here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

from kilnproxy.directory.model import Identity, Route
from kilnproxy.errors import BackendError
from kilnproxy.policy.access import Access
from kilnproxy.policy.commands import Verb

log = logging.getLogger("kilnproxy.backend")

# Every variable a backend command gets from kilnproxy (SPEC 5); an agent passes on no other.
BACKEND_VARIABLES = frozenset(
    {"KILNPROXY_SESSION", "KILNPROXY_ACCOUNT", "KILNPROXY_USER", "KILNPROXY_ACCESS",
     "KILNPROXY_REPO", "GIT_PROTOCOL"}
)  # fmt: skip


@dataclass(frozen=True)
class BackendRequest:
    session_id: str
    verb: Verb
    route: Route
    identity: Identity
    git_protocol: str | None

    def environment(self) -> dict[str, str]:
        """The variables the backend gets (SPEC 5): process env or SSH `env` requests."""
        env = {
            "KILNPROXY_SESSION": self.session_id,
            "KILNPROXY_ACCOUNT": self.identity.account,
            "KILNPROXY_USER": self.identity.user,
            "KILNPROXY_ACCESS": Access(self.route.access).label,
            "KILNPROXY_REPO": self.route.repo,
        }
        if self.git_protocol:
            env["GIT_PROTOCOL"] = self.git_protocol
        return env


class BackendSink(Protocol):
    """Where a backend stream delivers; implemented by the relay."""

    def backend_stdout(self, data: bytes) -> None: ...

    def backend_stderr(self, data: bytes) -> None: ...

    def backend_pause_input(self) -> None: ...

    def backend_resume_input(self) -> None: ...

    def backend_finished(self, exit_status: int) -> None:
        """Called once, after every byte of output was delivered."""

    def backend_lost(self, error: BackendError) -> None:
        """Called instead of backend_finished when the storage went away mid-command."""


class StdinBackPressure:
    """How every backend reports its stdin filling up: the client must wait. A mixin for the
    transport protocol a backend speaks (it comes first, so that it is the one called); the
    protocol's `sink` is None once the relay no longer listens."""

    sink: BackendSink | None

    def pause_writing(self) -> None:
        if self.sink is not None:
            self.sink.backend_pause_input()

    def resume_writing(self) -> None:
        if self.sink is not None:
            self.sink.backend_resume_input()


def sink_failed(sink: BackendSink | None, repo: str, backend: str, session: str) -> None:
    """A sink (a relay) raised on what its backend delivered, and the stream was aborted: a bug
    of that session's, which must end it alone, where it would otherwise end a connection other
    sessions share. The caller logged it; the relay is told the backend is lost, if it can
    still be told."""
    if sink is None:
        return
    try:
        sink.backend_lost(BackendError(repo, "internal error"))
    except Exception:
        log.exception("backend %s: failed again, on being told so", backend,
                      extra={"session": session})  # fmt: skip


class BackendStream(Protocol):
    """One running repository command."""

    def write(self, data: bytes) -> None: ...

    def write_eof(self) -> None: ...

    def pause_output(self) -> None: ...

    def resume_output(self) -> None: ...

    def abort(self) -> None:
        """Stop the command now; no sink callback follows."""


class Backend(Protocol):
    name: str

    async def open(self, request: BackendRequest, sink: BackendSink) -> BackendStream:
        """Start the command; raise BackendError if the storage cannot be reached."""
        ...

    async def close(self) -> None: ...
