"""Fixtures: a seeded kilnproxy server per test module, and helpers to make more."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from harness import Kiln, keygen, seed_git, seed_hg
from postgres import pg_cluster, pg_url  # noqa: F401 (fixtures for any test)

from kilnproxy.policy.access import Access, Role


@dataclass
class World:
    """A running server with two accounts, users of each role, a git and an hg repository."""

    kiln: Kiln
    alice: Path  # aviato, write
    bob: Path  # aviato, read
    carol: Path  # hooli, write (another account)
    dave: Path  # hooli, granted write on aviato/website only
    stranger: Path  # a key nobody registered
    website: Path  # aviato/website.git on disk
    designs: Path  # aviato/designs (hg) on disk
    website_head: str
    designs_tip: str


def make_world(
    root: Path, settings: dict[str, dict[str, Any]] | None = None, env: dict[str, str] | None = None
) -> World:
    kiln = Kiln(root, settings or {})
    alice = kiln.add_user("aviato", "alice", Role.WRITE)
    bob = kiln.add_user("aviato", "bob", Role.READ)
    carol = kiln.add_user("hooli", "carol", Role.WRITE)
    dave = kiln.add_user("hooli", "dave", Role.READ)
    stranger = keygen(kiln.keys / "stranger")
    website = kiln.add_repo("aviato/website", "git")
    designs = kiln.add_repo("aviato/designs", "hg")
    with kiln.directory() as directory:
        directory.grant("hooli", "dave", "aviato/website", Access.WRITE)
    head = seed_git(
        website, root / "seed-website", {"README.md": b"# website\n", "src/a.txt": b"a\n"}
    )
    tip = seed_hg(designs, {"logo.svg": b"<svg/>\n"})
    kiln.start(env=env)
    return World(kiln, alice, bob, carol, dave, stranger, website, designs, head, tip)


@pytest.fixture
def new_world(tmp_path: Path) -> Iterator[Callable[..., World]]:
    """Make worlds for a test that signals its server itself; whatever is left is killed."""
    made: list[World] = []

    def make(
        settings: dict[str, dict[str, Any]] | None = None, env: dict[str, str] | None = None
    ) -> World:
        made.append(make_world(tmp_path / f"world{len(made)}", settings, env))
        return made[-1]

    yield make
    for w in made:
        proc = w.kiln.proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = make_world(tmp_path_factory.mktemp("world"))
    yield w
    w.kiln.stop()
