"""Every client-facing error and every cut says one line, its own way, and ends with one status."""

from __future__ import annotations

import pytest

from kilnproxy.errors import (
    BackendError,
    BadCommand,
    ClientError,
    ClientFacing,
    CutReason,
    NoShell,
    NotFound,
    ReadOnly,
)

SESSION = "3f9c2a1b"


@pytest.mark.parametrize(
    ("error", "line", "status"),
    [
        (BadCommand("malformed command"), "kilnproxy: malformed command (session 3f9c2a1b)", 128),
        (
            NotFound("aviato/website"),
            "kilnproxy: repository 'aviato/website' not found or access denied (session 3f9c2a1b)",
            1,
        ),
        (
            ReadOnly("aviato/website"),
            "kilnproxy: you have read-only access to 'aviato/website' (session 3f9c2a1b)",
            1,
        ),
        (ClientError("internal error"), "kilnproxy: internal error (session 3f9c2a1b)", 1),
        (
            BackendError("aviato/website", "dial timed out after 10s"),
            "kilnproxy: storage for aviato/website is unavailable, try again later"
            " (session 3f9c2a1b)",
            1,
        ),
        (
            NoShell("bob", "aviato"),
            "Hi bob (aviato)! You have authenticated, but kilnproxy does not provide shell access.",
            1,
        ),
    ],
)
def test_each_error_knows_its_line_and_status(error: ClientFacing, line: str, status: int) -> None:
    assert error.client_line(SESSION) == line + "\n"
    assert error.exit_status == status


def test_only_the_greeting_goes_without_prefix_whatever_a_message_says() -> None:
    # Each error's line is its own, never guessed from the words of its message.
    line = ClientError("Hi there").client_line(SESSION)
    assert line == f"kilnproxy: Hi there (session {SESSION})\n"


def test_the_storage_detail_stays_in_our_log() -> None:
    error = BackendError("aviato/website", "host key mismatch for 10.0.0.5")
    assert "10.0.0.5" not in error.client_line(SESSION)
    assert error.detail == "host key mismatch for 10.0.0.5"


@pytest.mark.parametrize("reason", list(CutReason))
def test_every_cut_is_one_line_and_exit_1(reason: CutReason) -> None:
    assert reason.client_line(SESSION) == f"kilnproxy: {reason.value} (session {SESSION})\n"
    assert reason.exit_status == 1
    assert "exit_status" not in CutReason.__members__  # a property, not one more reason
