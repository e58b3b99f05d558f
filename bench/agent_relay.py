"""Proxy CPU per GB relayed through path E (the agent:// backend) alone, and C beside it.

A quick, narrow figure for work on the agent leg: sets up the benchmark's paths once
(bench/fixtures.py, bench/relay.py), relays SIZE MiB through E (and C, for comparison) a few
times, alternating, and prints the medians of the worker's CPU per GB (and, for E, the agent's
own CPU per GB). `bench/run.py` remains the reference; this takes a minute, not five.

    python bench/agent_relay.py [--mib 256] [--runs 3] [--paths EC]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fixtures import build, kiln_settings, stop_all
from relay import add_raw_relay


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256, help="MiB relayed per run")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--paths", default="EC", help="paths relayed, of B, C and E")
    args = parser.parse_args()
    settings = kiln_settings(None, None)
    with tempfile.TemporaryDirectory() as tmp:
        paths = build(Path(tmp), settings)
        raw = add_raw_relay(paths, args.mib << 20, settings)
        figures: dict[str, list[dict[str, float]]] = {p: [] for p in args.paths}
        try:
            for path in args.paths:
                raw.once(path)  # warm up
            for _ in range(args.runs):
                for path in args.paths:
                    figures[path].append(raw.once(path))
        finally:
            stop_all((paths, raw))
    gigabytes = raw.size / 1e9
    for path, runs in figures.items():
        cpu = statistics.median(r["cpu"] for r in runs) / gigabytes
        line = f"{path}: proxy CPU {cpu:.2f} s/GB"
        each = ", ".join(f"{r['cpu'] / gigabytes:.2f}" for r in runs)
        line += f" (runs {each})"
        line += f", {statistics.median(r['writes'] for r in runs) / raw.size * 1e6:.1f} writes/MB"
        line += f", {statistics.median(r['reads'] for r in runs) / raw.size * 1e6:.1f} reads/MB"
        if path == "E":
            agent = statistics.median(r["agent_cpu"] for r in runs) / gigabytes
            line += f"; agent CPU {agent:.2f} s/GB"
        print(line)


if __name__ == "__main__":
    main()
