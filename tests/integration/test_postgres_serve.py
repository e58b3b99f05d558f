"""`kilnproxy serve` on a PostgreSQL directory (SPEC 2): real git over real OpenSSH, two proxy
hosts sharing one database, and a database that goes away and comes back."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import World
from harness import KILNPROXY, Kiln, run
from postgres import Cluster

Factory = Callable[..., World]


@pytest.fixture
def world(new_world: Factory, pg_url: str) -> World:
    return new_world({"directory": {"url": pg_url}})


@pytest.fixture
def second_host(tmp_path: Path, pg_url: str) -> Iterator[Kiln]:
    """Another proxy host: its own home, host key and port, the same directory."""
    kiln = Kiln(tmp_path / "host-b", {"directory": {"url": pg_url}})
    yield kiln
    if kiln.proc is not None and kiln.proc.poll() is None:
        kiln.stop()


def test_clone_through_serve_on_postgresql(world: World, tmp_path: Path) -> None:
    kiln = world.kiln
    clone = tmp_path / "website"
    kiln.git(world.alice, "clone", "-q", kiln.url("aviato/website.git"), str(clone))
    assert (clone / "README.md").read_bytes() == b"# website\n"
    head = run(["git", "-C", str(clone), "rev-parse", "HEAD"]).stdout.decode().strip()
    assert head == world.website_head
    denied = kiln.git(world.bob, "push", "-q", "origin", "HEAD:refs/heads/x", cwd=clone,
                      check=False)  # fmt: skip
    assert denied.returncode != 0 and b"read-only access" in denied.stderr


def test_a_key_removed_on_one_host_is_refused_on_the_other_at_once(
    world: World, second_host: Kiln, tmp_path: Path
) -> None:
    second_host.start()
    for host in (world.kiln, second_host):
        out = host.git(world.alice, "ls-remote", host.url("aviato/website")).stdout.decode()
        assert out.split()[0] == world.website_head
    listed = run([*KILNPROXY, "keys", "list", "aviato/alice", "--config",
                  str(second_host.config_path)], env=second_host.server_env())  # fmt: skip
    fingerprint = listed.stdout.decode().split()[0]
    removed = run([*KILNPROXY, "keys", "remove", fingerprint, "--config",
                   str(second_host.config_path)], env=second_host.server_env())  # fmt: skip
    assert removed.stdout.decode().startswith("removed key")
    refused = world.kiln.git(world.alice, "ls-remote", world.kiln.url("aviato/website"),
                             check=False)  # fmt: skip
    assert refused.returncode != 0 and b"Permission denied (publickey)" in refused.stderr


def test_serve_outlives_a_directory_outage(
    world: World, pg_cluster: Cluster, tmp_path: Path
) -> None:
    """The database stops: new sessions fail at once (no hang), the server stays up; it
    starts again: the next clone works, with no restart of kilnproxy."""
    kiln = world.kiln
    url = kiln.url("aviato/website")
    assert kiln.git(world.alice, "ls-remote", url).returncode == 0
    pg_cluster.stop()
    try:
        started = time.monotonic()
        failed = kiln.git(world.alice, "ls-remote", url, check=False)
        assert failed.returncode != 0 and time.monotonic() - started < 10
        assert kiln.proc is not None and kiln.proc.poll() is None
        kiln.wait_for_log(r"directory postgresql://kilnproxy:\*\*\*@\S+ is unavailable: ")
    finally:
        pg_cluster.start()
    clone = tmp_path / "after"
    kiln.git(world.alice, "clone", "-q", url, str(clone))
    assert (clone / "README.md").exists()
    kiln.wait_for_log(r"directory \S+ is back after \d+s, \d+ lookups refused")
    assert pg_cluster.password not in kiln.log()


def test_serve_starts_while_the_directory_is_down_and_serves_once_it_is_back(
    world: World, pg_cluster: Cluster, tmp_path: Path
) -> None:
    """A host that boots during a database outage must not need an operator afterwards (under
    systemd, a start that fails five times in a row is never retried)."""
    kiln = world.kiln
    assert kiln.stop() == 0
    pg_cluster.stop()
    try:
        kiln.start()
        assert re.search(
            r"^kilnproxy: warning: cannot reach directory postgresql://kilnproxy:\*\*\*@\S+: "
            r".*; starting anyway$",
            kiln.log(),
            re.M,
        ), kiln.log()
        failed = kiln.git(world.alice, "ls-remote", kiln.url("aviato/website"), check=False)
        assert failed.returncode != 0
    finally:
        pg_cluster.start()
    out = kiln.git(world.alice, "ls-remote", kiln.url("aviato/website")).stdout.decode()
    assert out.split()[0] == world.website_head
    assert pg_cluster.password not in kiln.log()
