"""Check 5: a session whose handling raises ends alone; 20 concurrent clones all succeed."""

from __future__ import annotations

import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import World, make_world

FAULT_INJECTION = Path(__file__).parents[1] / "fault_injection"


@pytest.fixture(scope="module")
def faulty(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = make_world(tmp_path_factory.mktemp("faulty"))
    w.kiln.add_repo("aviato/boom", "git")
    w.kiln.stop()
    w.kiln.start(env={"PYTHONPATH": str(FAULT_INJECTION)})
    yield w
    w.kiln.stop()


def test_fault_ends_one_session_while_twenty_clones_succeed(faulty: World, tmp_path: Path) -> None:
    kiln = faulty.kiln

    def clone(i: int) -> bytes:
        target = tmp_path / f"clone{i}"
        kiln.git(faulty.alice, "clone", "-q", kiln.url("aviato/website.git"), str(target))
        return (target / "README.md").read_bytes()

    with ThreadPoolExecutor(max_workers=21) as pool:
        clones = [pool.submit(clone, i) for i in range(20)]
        boom = pool.submit(kiln.ssh, faulty.alice, "git-upload-pack 'aviato/boom.git'")
        assert [c.result(timeout=120) for c in clones] == [b"# website\n"] * 20
        broken = boom.result(timeout=60)
    assert broken.returncode == 1
    line = broken.stderr.decode().strip()
    match = re.match(r"^kilnproxy: internal error \(session ([0-9a-f]{8})\)$", line)
    assert match, line
    session = match.group(1)
    # The traceback is in the log under that session's id, and the worker still serves.
    kiln.wait_for_log(rf"ERROR kilnproxy.session \[{session}\] internal error while opening")
    assert "RuntimeError: injected fault for the isolation test" in kiln.log()
    kiln.wait_for_log(rf"\[{session}\] access .*outcome=internal-error")
    assert kiln.proc is not None and kiln.proc.poll() is None
    assert clone(99) == b"# website\n"
