"""Small-clone latency through kilnproxy to an ssh:// backend, against a direct clone.

One run, alternating: A direct `git clone` from the storage sshd; C kilnproxy with a warm
pooled backend connection; C-cold the same right after the pool has closed its connection.
Reports medians and ratios (machines here are shared and noisy: ratios, not absolute times).
Run: `.venv/bin/python bench/ssh_backend.py [ROUNDS]`; writes bench/results/ssh_backend.json.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fixtures import Paths, add_small, build
from measure import clone

POOL_IDLE = 1.0
RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 15
    with tempfile.TemporaryDirectory() as tmp:
        paths = build(Path(tmp), {"backend_ssh": {"pool_idle": f"{int(POOL_IDLE * 1000)}ms"}})
        try:
            add_small(paths)
            results = measure(paths, rounds)
        finally:
            paths.stop()
    report(results, rounds)


def measure(paths: Paths, rounds: int) -> dict[str, list[float]]:
    def timed(path: str) -> float:
        return clone(paths.clone_argv(path, "small", "git"), paths.env(path), paths.root / path)

    timed("C")  # warm the file cache and the pool once
    times: dict[str, list[float]] = {"A_direct": [], "C_warm": [], "C_cold": []}
    for _ in range(rounds):
        times["A_direct"].append(timed("A"))
        times["C_warm"].append(timed("C"))
        time.sleep(POOL_IDLE + 0.5)  # the pooled connection closes: the next clone dials
        times["C_cold"].append(timed("C"))
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
