"""Small-clone latency through kilnproxy to an ssh:// backend, against a direct clone.

One run, alternating: A direct `git clone` from the storage sshd; C kilnproxy with a warm
pooled backend connection; C-cold the same right after the pool has closed its connection.
Reports medians and ratios (machines here are shared and noisy: ratios, not absolute times).
Run: `.venv/bin/python bench/ssh_backend.py [ROUNDS]`; writes bench/results/ssh_backend.json.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from harness import KILNPROXY, Kiln, run, seed_git
from sshd import Sshd

from kilnproxy.access import Role

POOL_IDLE = 1.0
RESULTS = Path(__file__).resolve().parent / "results"


def small_repo(path: Path, work: Path) -> None:
    """About 1.5 MB: 60 commits over 40 text files."""
    run(["git", "init", "-q", "--bare", "--initial-branch=main", str(path)])
    files = {f"src/module{i}.txt": os.urandom(12_000).hex().encode() for i in range(40)}
    seed_git(path, work, files)
    env = {**os.environ, "HOME": str(work.parent), "GIT_CONFIG_NOSYSTEM": "1"}
    ident = ["-c", "user.name=Bench", "-c", "user.email=bench@example.com"]
    for i in range(60):
        (work / f"src/module{i % 40}.txt").write_bytes(os.urandom(2_000).hex().encode())
        run(["git", *ident, "commit", "-qam", f"change {i}"], env=env, cwd=work)
    run(["git", "push", "-q", "origin", "HEAD:main"], env=env, cwd=work)


def timed(argv: list[str], env: dict[str, str], target: Path) -> float:
    shutil.rmtree(target, ignore_errors=True)
    started = time.perf_counter()
    subprocess.run(argv, env=env, check=True, capture_output=True, timeout=120)
    return time.perf_counter() - started


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 15
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        kiln = Kiln(root / "kiln", {"backend_ssh": {"pool_idle": f"{int(POOL_IDLE * 1000)}ms"}})
        key = kiln.add_user("bench", "dev", Role.READ)
        kiln.start()
        storage = Sshd(root / "storage")
        public = run([*KILNPROXY, "backends", "key", "--config", str(kiln.config_path)],
                     env=kiln.server_env()).stdout.decode().splitlines()[-1]  # fmt: skip
        storage.authorize(public)
        storage.start()
        try:
            admin = [*KILNPROXY, "--config", str(kiln.config_path)]
            run([*admin, "backends", "add", "storage", storage.url], env=kiln.server_env())
            run([*admin, "backends", "trust", "storage"], env=kiln.server_env())
            repo = storage.base / "bench" / "small.git"
            small_repo(repo, root / "seed")
            run([*admin, "repos", "add", "bench/small", "--vcs", "git", "--backend", "storage"],
                env=kiln.server_env())  # fmt: skip
            results = measure(kiln, key, storage, repo, root, rounds)
        finally:
            kiln.stop()
            storage.stop()
    report(results, rounds)


def measure(
    kiln: Kiln, key: Path, storage: Sshd, repo: Path, root: Path, rounds: int
) -> dict[str, list[float]]:
    direct_env = kiln.client_env(key)
    direct_env["GIT_SSH_COMMAND"] = (
        f"ssh -F /dev/null -i {kiln.home / 'backend_id_ed25519'} -o IdentitiesOnly=yes "
        f"-o UserKnownHostsFile={kiln.home / 'backend_known_hosts'} -o BatchMode=yes"
    )
    direct = ["git", "clone", "-q", f"ssh://root@127.0.0.1:{storage.port}{repo}", str(root / "a")]
    proxied = ["git", "clone", "-q", kiln.url("bench/small"), str(root / "c")]
    proxy_env = kiln.client_env(key)
    timed(proxied, proxy_env, root / "c")  # warm the file cache and the pool once
    times: dict[str, list[float]] = {"A_direct": [], "C_warm": [], "C_cold": []}
    for _ in range(rounds):
        times["A_direct"].append(timed(direct, direct_env, root / "a"))
        times["C_warm"].append(timed(proxied, proxy_env, root / "c"))
        time.sleep(POOL_IDLE + 0.5)  # the pooled connection closes: the next clone dials
        times["C_cold"].append(timed(proxied, proxy_env, root / "c"))
    return times


def report(times: dict[str, list[float]], rounds: int) -> None:
    med = {name: statistics.median(values) for name, values in times.items()}
    figures = {
        "rounds": rounds,
        "median_seconds": med,
        "small_clone_ratio_ssh": med["C_warm"] / med["A_direct"],
        "small_clone_ratio_ssh_cold": med["C_cold"] / med["A_direct"],
        "cold_over_warm": med["C_cold"] / med["C_warm"],
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ssh_backend.json").write_text(json.dumps(figures, indent=2) + "\n")
    for name, value in med.items():
        print(f"{name:>10}: median {value * 1000:7.1f} ms over {rounds} runs")
    print(f"warm pool / direct: {figures['small_clone_ratio_ssh']:.2f}")
    print(f"cold pool / direct: {figures['small_clone_ratio_ssh_cold']:.2f}")
    print(f"cold / warm:        {figures['cold_over_warm']:.2f}")


if __name__ == "__main__":
    main()
