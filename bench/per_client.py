"""Proxy CPU per GB relayed for each SSH client family, through path C (kilnproxy with the
ssh:// backend): a bare clone of the large repository by git over the family's own client with
its defaults (set up as tests/client_families.py does for the tests), ROUNDS times.

Each row: the family, its version line and the cipher it negotiated (from kilnproxy's access
line for that connection), the median wall seconds, and kilnproxy's CPU seconds (master and
worker) per GB cloned. A family whose client is not installed gets a row saying why, and so does
one whose clone fails: the other rows still count.
"""

from __future__ import annotations

import statistics
import subprocess
import time
from typing import Any

from client_families import FAMILIES, authenticated, unavailable
from fixtures import Paths, server_cpu
from measure import clone


def client_rows(paths: Paths, rounds: int, repo: str = "large") -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for name in FAMILIES:
        reason = unavailable(name)
        if reason is None:
            try:
                rows.append(client_row(paths, name, rounds, repo))
                continue
            # harness.run (the setups) fails with AssertionError, measure.clone RuntimeError.
            except (AssertionError, RuntimeError, subprocess.SubprocessError) as error:
                reason = f"failed: {str(error).splitlines()[0][:200]}"
        rows.append({"client": name, "cipher": None, "proxy_cpu_s_per_gb": None,
                     "unavailable": reason})  # fmt: skip
    return rows


def client_row(paths: Paths, name: str, rounds: int, repo: str) -> dict[str, Any]:
    work = paths.root / "clients" / name
    work.mkdir(parents=True)
    env = FAMILIES[name].setup(paths.kiln, paths.client_key, work)
    argv = ["git", "clone", "-q", "--bare", paths.url("C", repo)]
    seen: list[tuple[str, str]] = []
    runs: list[dict[str, float]] = []
    for _ in range(rounds):
        logged = len(paths.kiln.log())
        before = server_cpu(paths.kiln)
        seconds = clone(argv, env, work / "clone")
        time.sleep(0.3)  # as bench/run.py's clones: let the session end and be counted
        cpu = server_cpu(paths.kiln) - before
        size = sum(f.stat().st_size for f in (work / "clone").rglob("*") if f.is_file())
        runs.append({"seconds": seconds, "cpu_per_gb": cpu / (size / 1e9)})
        seen += authenticated(paths.kiln.log()[logged:])
    versions, ciphers = {v for v, _ in seen}, {c for _, c in seen}
    return {
        "client": name,
        "version": ", ".join(sorted(versions)) or "unknown",
        # One value unless the connections negotiated differently (which would be news).
        "cipher": ", ".join(sorted(ciphers)) or "unknown",
        "seconds": statistics.median(run["seconds"] for run in runs),
        "proxy_cpu_s_per_gb": statistics.median(run["cpu_per_gb"] for run in runs),
    }


def client_table(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown lines: one table row per family."""
    lines = ["| client | version | cipher negotiated | clone s | proxy CPU s per GB |",
             "| --- | --- | --- | --- | --- |"]  # fmt: skip
    for row in rows:
        if row["proxy_cpu_s_per_gb"] is None:
            lines.append(f"| {row['client']} | unavailable: {row['unavailable']} | | | |")
        else:
            lines.append(f"| {row['client']} | {row['version']} | {row['cipher']} | "
                         f"{row['seconds']:.2f} | {row['proxy_cpu_s_per_gb']:.2f} |")  # fmt: skip
    return lines
