"""Check 2: real Mercurial clone, pull and push through the same server."""

from __future__ import annotations

from pathlib import Path

from conftest import World
from harness import run


def tip(repo: Path) -> str:
    return run(["hg", "-R", str(repo), "log", "-r", "tip", "-T", "{node}"]).stdout.decode()


def test_clone_pull_push(world: World, tmp_path: Path) -> None:
    kiln, key = world.kiln, world.alice
    clone = tmp_path / "designs"
    kiln.hg(key, "clone", kiln.url("aviato/designs"), str(clone))
    assert (clone / "logo.svg").read_bytes() == b"<svg/>\n"
    assert tip(clone) == tip(world.designs)

    (clone / "banner.svg").write_bytes(b"<svg>banner</svg>\n")
    kiln.hg(key, "add", str(clone / "banner.svg"), cwd=clone)
    kiln.hg(key, "commit", "-m", "banner", cwd=clone)
    pushed = kiln.hg(key, "push", cwd=clone)
    assert b"added 1 changesets" in pushed.stdout + pushed.stderr
    assert tip(world.designs) == tip(clone)

    other = tmp_path / "other"
    kiln.hg(key, "clone", "-q", "-r", "0", kiln.url("aviato/designs"), str(other))
    pulled = kiln.hg(key, "pull", "-u", cwd=other)
    assert b"added 1 changesets" in pulled.stdout
    assert (other / "banner.svg").read_bytes() == b"<svg>banner</svg>\n"


def test_absolute_and_home_relative_paths(world: World, tmp_path: Path) -> None:
    kiln = world.kiln
    url = f"ssh://git@127.0.0.1:{kiln.port}//aviato/designs"
    kiln.hg(world.bob, "clone", "-q", url, str(tmp_path / "abs"))
    url = f"ssh://git@127.0.0.1:{kiln.port}/~/aviato/designs"
    kiln.hg(world.bob, "clone", "-q", url, str(tmp_path / "home"))
    assert (tmp_path / "home" / "logo.svg").exists()
