"""Check 1: real git over real OpenSSH through `kilnproxy serve`, protocol v0 and v2."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
from conftest import World
from harness import run


def tree_of(git_dir_or_work: Path, rev: str = "HEAD") -> str:
    return run(["git", "-C", str(git_dir_or_work), "ls-tree", "-r", rev]).stdout.decode()


def backend_rev(world: World, ref: str) -> str:
    argv = ["git", "--git-dir", str(world.website), "rev-parse", ref]
    return run(argv).stdout.decode().strip()


@pytest.mark.parametrize("protocol", ["0", "2"])
def test_clone_fetch_push_archive(world: World, tmp_path: Path, protocol: str) -> None:
    kiln, key = world.kiln, world.alice
    proto = ["-c", f"protocol.version={protocol}"]
    clone = tmp_path / "website"
    kiln.git(key, *proto, "clone", kiln.url("aviato/website.git"), str(clone))
    assert tree_of(clone) == tree_of(world.website, "main")
    assert (clone / "README.md").read_bytes() == b"# website\n"

    # Push a new branch with a 20 MB file, and a tag.
    kiln.git(key, "checkout", "-q", "-b", f"feature-v{protocol}", cwd=clone)
    (clone / "big.bin").write_bytes(os.urandom(20 * 1024 * 1024))
    kiln.git(key, "add", "big.bin", cwd=clone)
    kiln.git(key, "commit", "-qm", "a big file", cwd=clone)
    kiln.git(key, "tag", f"v{protocol}.0", cwd=clone)
    kiln.git(
        key, *proto, "push", "-q", "origin", f"feature-v{protocol}", f"v{protocol}.0", cwd=clone
    )
    local_head = run(["git", "-C", str(clone), "rev-parse", "HEAD"]).stdout.decode().strip()
    assert backend_rev(world, f"refs/heads/feature-v{protocol}") == local_head
    assert backend_rev(world, f"refs/tags/v{protocol}.0") == local_head
    blob = run(["git", "--git-dir", str(world.website), "cat-file", "-s", f"{local_head}:big.bin"])
    assert int(blob.stdout) == 20 * 1024 * 1024

    # A second clone fetches what was pushed; the trees are equal.
    other = tmp_path / "other"
    kiln.git(key, *proto, "clone", "-q", kiln.url("aviato/website"), str(other))
    kiln.git(key, *proto, "fetch", "-q", "origin", f"feature-v{protocol}", cwd=other)
    assert tree_of(other, "FETCH_HEAD") == tree_of(clone)
    assert (other / "README.md").exists()

    # git archive --remote goes through git-upload-archive.
    archive = kiln.git(
        key, *proto, "archive", f"--remote={kiln.url('aviato/website.git')}", "main", "README.md"
    )
    listing = subprocess.run(["tar", "t"], input=archive.stdout, capture_output=True, check=True)
    assert listing.stdout.decode().split() == ["README.md"]


def test_protocol_v2_reaches_the_backend(world: World) -> None:
    """GIT_PROTOCOL is passed on: upload-pack answers a v2 capability advertisement."""
    kiln = world.kiln
    out = kiln.git(
        world.alice, "-c", "protocol.version=2", "ls-remote", kiln.url("aviato/website")
    ).stdout.decode()
    assert re.search(r"^[0-9a-f]{40}\trefs/heads/main$", out, re.M)
    reply = kiln.ssh(world.alice, "-o", "SetEnv=GIT_PROTOCOL=version=2",
                     "git-upload-pack 'aviato/website.git'", input=b"0000")  # fmt: skip
    assert reply.returncode == 0, reply.stderr
    assert reply.stdout.startswith(b"000eversion 2\n")


def test_windows_style_two_word_command(world: World) -> None:
    reply = world.kiln.ssh(world.alice, "git upload-pack '/aviato/website.git'", input=b"0000")
    assert reply.returncode == 0, reply.stderr
    assert b"refs/heads/main" in reply.stdout


def test_grant_gives_another_account_write(world: World, tmp_path: Path) -> None:
    kiln = world.kiln
    clone = kiln.clone_with_commit(world.dave, "aviato/website", tmp_path / "dave", "dave.txt")
    kiln.git(world.dave, "push", "-q", "origin", "HEAD:refs/heads/dave", cwd=clone)
    head = run(["git", "-C", str(clone), "rev-parse", "HEAD"]).stdout.decode().strip()
    assert backend_rev(world, "refs/heads/dave") == head
