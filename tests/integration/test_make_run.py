"""Check 8: `make run` on a fresh copy seeds the demo; its printed clone commands work."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

from harness import free_port, run

REPO = Path(__file__).resolve().parents[2]


def fresh_copy(target: Path) -> None:
    """What a new clone holds: the files git tracks or would track, nothing ignored."""
    listed = run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO).stdout
    for name in filter(None, listed.decode().split("\0")):
        source = REPO / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)


def test_make_run_prints_commands_that_work(tmp_path: Path) -> None:
    checkout, home, elsewhere = tmp_path / "kilnproxy", tmp_path / "home", tmp_path / "shell2"
    for path in (checkout, home, elsewhere):
        path.mkdir()
    fresh_copy(checkout)
    port = free_port()
    (checkout / "var").mkdir()
    (checkout / "var" / "kilnproxy.toml").write_text(
        f'[ssh]\nlisten = ["127.0.0.1:{port}"]\n[status]\nhttp = "127.0.0.1:{free_port()}"\n'
        "[workers]\ncount = 1\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KILNPROXY_", "VIRTUAL_ENV"))}
    env |= {"HOME": str(home), "MAKEFLAGS": ""}
    output = tmp_path / "make-run.log"
    with output.open("wb") as log:
        make = subprocess.Popen(
            ["make", "run"], cwd=checkout, env=env, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while "workers ready" not in output.read_text(errors="replace"):
            assert make.poll() is None, output.read_text(errors="replace")
            assert time.monotonic() < deadline, output.read_text(errors="replace")
            time.sleep(0.2)
        printed = output.read_text()
        git_clone = re.search(r"^\s+(GIT_SSH_COMMAND=.* git clone \S+)$", printed, re.M)
        hg_clone = re.search(r"^\s+(hg clone .*)$", printed, re.M)
        assert git_clone and hg_clone, printed
        shell_env = {k: v for k, v in env.items() if not k.startswith("GIT_")}
        for command in (git_clone.group(1), hg_clone.group(1)):
            done = subprocess.run(
                ["bash", "-c", command], cwd=elsewhere, env=shell_env,
                capture_output=True, timeout=120, check=False,
            )  # fmt: skip
            assert done.returncode == 0, (command, done.stderr)
        assert (elsewhere / "hello" / "README.md").read_text().startswith("# Hello from kilnproxy")
        assert (elsewhere / "hello-hg" / "README.md").exists()
    finally:
        os.killpg(make.pid, signal.SIGTERM)
        make.wait(30)
