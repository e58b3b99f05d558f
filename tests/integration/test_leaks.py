"""Check 6: after 200 sequential sessions of every kind, tasks and fds are back to baseline."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import World, make_world
from harness import hold_tcp


@pytest.fixture(scope="module")
def leaky(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    timeouts = {"login_grace": "1s", "idle": "1s"}
    w = make_world(tmp_path_factory.mktemp("leaks"), {"timeouts": timeouts})
    yield w
    w.kiln.stop()


def session_kinds(w: World, tmp_path: Path) -> list[Callable[[int], None]]:
    kiln = w.kiln

    def clone(i: int) -> None:
        kiln.git(w.alice, "clone", "-q", kiln.url("aviato/website"), str(tmp_path / f"c{i}"))

    def hg_clone(i: int) -> None:
        kiln.hg(w.bob, "clone", "-q", kiln.url("aviato/designs"), str(tmp_path / f"h{i}"))

    def advertisement(i: int) -> None:
        assert kiln.ssh(w.alice, "git-upload-pack 'aviato/website'", input=b"0000").returncode == 0

    def denied(i: int) -> None:
        assert kiln.ssh(w.carol, "git-upload-pack 'aviato/website'").returncode == 1

    def bad_command(i: int) -> None:
        assert kiln.ssh(w.alice, "rm -rf /").returncode == 128

    def unknown_key(i: int) -> None:
        assert kiln.ssh(w.stranger, "git-upload-pack 'aviato/website'").returncode == 255

    def shell(i: int) -> None:
        assert kiln.ssh(w.alice, "-T").returncode == 1

    def login_grace(i: int) -> None:
        assert asyncio.run(hold_tcp(kiln.port, 10)) < 5

    def idle(i: int) -> None:
        with kiln.ssh_popen(w.alice, "git-upload-pack 'aviato/website'") as client:
            assert client.wait(timeout=15) == 1

    def client_vanishes(i: int) -> None:
        with kiln.ssh_popen(w.alice, "hg -R aviato/designs serve --stdio") as client:
            assert client.stdin is not None and client.stdout is not None
            client.stdin.write(b"hello\n")
            assert client.stdout.readline()  # the backend runs; now the client is killed
            client.kill()

    common = [advertisement, denied, bad_command, unknown_key, shell, client_vanishes]
    rare = [clone, hg_clone, login_grace, idle]
    # 200 sessions: each rare kind 5 times, the rest spread evenly over the common kinds.
    plan: list[Callable[[int], None]] = []
    for i in range(200):
        plan.append(rare[(i // 10) % 4] if i % 10 == 0 else common[i % len(common)])
    return plan


def test_no_leaks_after_200_sessions(leaky: World, tmp_path: Path) -> None:
    before = leaky.kiln.wait_idle()
    plan = session_kinds(leaky, tmp_path)
    assert len(plan) == 200
    for i, session in enumerate(plan):
        session(i)
    after = leaky.kiln.wait_idle()
    assert after["sessions_total"] - before["sessions_total"] >= 200
    assert (after["tasks"], after["fds"]) == (before["tasks"], before["fds"])
    assert "Traceback" not in leaky.kiln.log()
