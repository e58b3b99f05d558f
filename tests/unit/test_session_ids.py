"""Session ids (SPEC 3: 8 random hex characters) are unique among a worker's open sessions: two
that shared one would share the worker's table entry, and the first to close would take the
other out of what a drain waits for and a shutdown cuts."""

from __future__ import annotations

from typing import Any, cast

import pytest

from kilnproxy.ssh.services import Services
from kilnproxy.ssh.session import Session, SessionHost


def test_a_new_id_is_drawn_again_while_an_open_session_has_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    drawn = iter(["3f9c2a1b", "3f9c2a1b", "deadbeef"])
    monkeypatch.setattr("kilnproxy.ssh.session.secrets.token_hex", lambda n: next(drawn))
    host = SessionHost(cast(Any, None), cast(Services, None))
    host.sessions["3f9c2a1b"] = cast(Session, object())
    assert host.fresh_id() == "deadbeef"
