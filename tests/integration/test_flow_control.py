"""Check 7: a client that stops reading mid-clone does not make the worker buffer the clone."""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from pathlib import Path

from conftest import World
from harness import pack_bytes_received, run, seed_git, ssh_client_of

SIZE = 100 * 1024 * 1024
RSS_BOUND = 16 * 1024 * 1024


def bytes_out(world: World) -> int:
    rows = world.kiln.connections()
    return sum(int(r["bytes_out"]) for r in rows if r["repo"] == "aviato/big")


def test_stalled_client_does_not_grow_the_worker(world: World, tmp_path: Path) -> None:
    kiln = world.kiln
    big = kiln.add_repo("aviato/big", "git")
    payload = os.urandom(SIZE)  # incompressible: the pack is as large as the file
    seed_git(big, tmp_path / "seed", {"big.bin": payload})
    run(["git", "--git-dir", str(big), "repack", "-adq"])

    rss_before = kiln.worker()["rss"]
    clone = tmp_path / "clone"
    git = subprocess.Popen(
        ["git", "clone", "-q", kiln.url("aviato/big.git"), str(clone)],
        env=kiln.client_env(world.alice), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    ssh = ssh_client_of(git)
    deadline = time.monotonic() + 60
    while pack_bytes_received(clone) < 8 * 1024 * 1024:  # the client's count: heartbeats lag
        assert time.monotonic() < deadline, "the clone never started receiving"
        time.sleep(0.01)
    ssh.suspend()  # the client stops reading: its socket and the SSH window fill up
    try:
        time.sleep(2.5)  # buffers fill, and two heartbeats bring the worker's counts up to date
        stalled_at = bytes_out(world)
        peak = rss_before
        for _ in range(25):
            peak = max(peak, kiln.worker()["rss"])
            time.sleep(0.1)
        assert bytes_out(world) - stalled_at < 4 * 1024 * 1024, "the relay kept reading"
        assert stalled_at < SIZE // 2, "the clone was not stalled mid-transfer"
    finally:
        ssh.resume()
    assert git.wait(timeout=300) == 0, git.stderr.read() if git.stderr else b""
    if git.stderr:
        git.stderr.close()
    assert peak - rss_before < RSS_BOUND, f"worker RSS grew by {(peak - rss_before) >> 20} MiB"
    digest = hashlib.sha256((clone / "big.bin").read_bytes()).hexdigest()
    assert digest == hashlib.sha256(payload).hexdigest()
    kiln.wait_for_log(r"access .*repo=aviato/big .*exit=0 outcome=ok")
