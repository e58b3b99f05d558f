"""Parts of the supervisor without a running master (the whole master is in test_master)."""

from __future__ import annotations

from pathlib import Path

from kilnproxy.config import from_mapping
from master.board import StatusBoard
from master.supervisor import Supervisor


class Told:
    def __init__(self) -> None:
        self.said: list[str] = []

    def ready(self) -> None:
        self.said.append("READY=1")

    def reloading(self) -> None:
        self.said.append("RELOADING=1")


def test_a_refused_hup_says_ready_only_after_the_start_did(tmp_path: Path) -> None:
    """SPEC 6: RELOADING=1, then READY=1 once the reload is over or refused; and nothing while
    the start is under way, whose READY=1 waits for every worker."""
    path = tmp_path / "kilnproxy.toml"
    path.write_text('[timeouts]\nidle = "forever"\n')  # what a HUP refuses
    told = Told()
    config = from_mapping({}, tmp_path)
    supervisor = Supervisor(config, path, StatusBoard(), told)  # type: ignore[arg-type]
    supervisor.handle_sighup()  # workers are still booting: systemd waits for the start
    assert told.said == []
    supervisor._ready_announced = True  # every worker was ready, and READY=1 said so
    supervisor.handle_sighup()
    assert told.said == ["RELOADING=1", "READY=1"]
