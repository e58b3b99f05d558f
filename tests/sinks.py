"""A relay's side of a backend stream for tests of backends without a relay: it records what it
is told (`spoke` is set once stdout has come), and a `broken` one raises on stderr, as a relay
whose client had closed its channel did before `Relay._write_stderr` (the failure a backend must
keep to that one session)."""

from __future__ import annotations

import asyncio

from kilnproxy.errors import BackendError


class RecordingSink:
    def __init__(self, broken: bool = False) -> None:
        self.broken = broken
        self.stdout = b""
        self.spoke = asyncio.Event()  # some stdout came
        self.ended: list[str] = []  # "exit N", or the detail of the loss

    def backend_stdout(self, data: bytes) -> None:
        self.stdout += data
        self.spoke.set()

    def backend_stderr(self, data: bytes) -> None:
        if self.broken:
            raise BrokenPipeError("Channel not open for sending")

    def backend_pause_input(self) -> None: ...

    def backend_resume_input(self) -> None: ...

    def backend_finished(self, exit_status: int) -> None:
        self.ended.append(f"exit {exit_status}")

    def backend_lost(self, error: BackendError) -> None:
        self.ended.append(error.detail)
