"""The cost of a directory lookup: SQLite against PostgreSQL, from TCP connect to authenticated.

Owns one run: a throwaway PostgreSQL cluster (tests/postgres.py) and two one-worker kilnproxy
servers with the same account, user and key, one on its default SQLite directory and one on
that cluster (the schema is installed on first use). For each it measures, alternating the two
round by round so that the machine's noise hits both alike, the client-side time of sequential
connections from before the TCP connect to authentication complete (p50, p99), new connections
per second opened 10 at a time, and the worker's own mean key-lookup time from its
`kilnproxy_auth_lookup_seconds` histogram, so that the pure lookup shows next to the end to end.
It never touches the machine's own PostgreSQL cluster and leaves no server behind.

    python bench/lookup.py [--connections N]    # prints a table, writes bench/results/lookup.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from clients import connect, hold
from harness import Kiln, keygen
from postgres import Cluster, find_bindir

from kilnproxy.policy.access import Role
from kilnproxy.ssh.keys import parse_public_key

RESULTS = Path(__file__).resolve().parent / "results"
DIRECTORIES = ("sqlite", "postgres")
ROUNDS = 5
BATCH = 10  # connections opened at a time for the throughput, as run.py's connection_cost
WARM_UP = 10  # first-use costs (imports, the pool's first connections) are not measured
ACCOUNT, USER = "bench", "alice"
HEARTBEAT = 1.2  # a little over a worker's heartbeat: how stale /metrics can be


def enroll(kiln: Kiln, key: Path) -> None:
    """The bench account, its user and `key` in the server's directory."""
    with kiln.directory() as directory:
        directory.add_account(ACCOUNT)
        directory.add_user(ACCOUNT, USER, Role.READ)
        public = parse_public_key(key.with_suffix(".pub").read_text())
        directory.add_key(ACCOUNT, USER, "bench key", public)


def lookup_totals(kiln: Kiln) -> tuple[float, float]:
    """The worker's key lookups so far, as /metrics reports them: (count, seconds)."""
    url = f"http://127.0.0.1:{kiln.http_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        body = response.read().decode()
    values = {
        sample.name: sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
    }
    name = "kilnproxy_auth_lookup_seconds"
    return values.get(f"{name}_count", 0.0), values.get(f"{name}_sum", 0.0)


def settled_totals(kiln: Kiln, at_least: float, timeout: float = 15.0) -> tuple[float, float]:
    """The lookup totals once they count `at_least` lookups and a heartbeat adds no more."""
    deadline = time.monotonic() + timeout
    last = lookup_totals(kiln)
    while time.monotonic() < deadline:
        time.sleep(HEARTBEAT)
        now = lookup_totals(kiln)
        if now[0] >= at_least and now[0] == last[0]:
            return now
        last = now
    raise AssertionError(f"/metrics counts {last[0]:.0f} key lookups, not {at_least:.0f}")


async def sequential(kiln: Kiln, key: Path, count: int) -> list[float]:
    """Seconds from before the TCP connect to authenticated, one connection after another."""
    seconds = []
    for _ in range(count):
        started = time.perf_counter()
        conn = await connect(kiln, key)
        seconds.append(time.perf_counter() - started)
        conn.close()
        await conn.wait_closed()
    return seconds


async def batched(kiln: Kiln, key: Path, count: int) -> float:
    """Wall seconds to open and close `count` connections, BATCH at a time."""
    started = time.perf_counter()
    for _ in range(count // BATCH):
        connections = await hold(kiln, key, BATCH)
        for conn in connections:
            conn.close()
        await asyncio.gather(*(conn.wait_closed() for conn in connections))
    return time.perf_counter() - started


def percentile(samples: list[float], p: int) -> float:
    return statistics.quantiles(samples, n=100, method="inclusive")[p - 1]


async def alternate(servers: dict[str, Kiln], key: Path, per_round: int) -> dict[str, float]:
    """The rounds, A/B/A/B, and the figures of each directory from their pooled samples."""
    samples: dict[str, list[float]] = {name: [] for name in servers}
    wall = dict.fromkeys(servers, 0.0)
    for _ in range(ROUNDS):
        for name, kiln in servers.items():
            samples[name] += await sequential(kiln, key, per_round)
            wall[name] += await batched(kiln, key, per_round)
    figures: dict[str, float] = {}
    for name in servers:
        figures[f"auth_p50_ms_{name}"] = 1000 * percentile(samples[name], 50)
        figures[f"auth_p99_ms_{name}"] = 1000 * percentile(samples[name], 99)
        figures[f"conn_per_s_{name}"] = ROUNDS * per_round / wall[name]
    return figures


def measure_servers(servers: dict[str, Kiln], key: Path, connections: int) -> dict[str, float]:
    """Warm each server up, then measure them alternately; adds each worker's mean lookup."""
    per_round = max(BATCH, connections // ROUNDS // BATCH * BATCH)
    asyncio.run(sequential_all(servers, key, WARM_UP))
    before = {name: settled_totals(kiln, WARM_UP) for name, kiln in servers.items()}
    figures = asyncio.run(alternate(servers, key, per_round))
    for name, kiln in servers.items():
        # Each connection is one lookup, in the sequential and in the batched connections.
        count, total = settled_totals(kiln, before[name][0] + 2 * ROUNDS * per_round)
        lookups = count - before[name][0]
        figures[f"lookup_ms_{name}"] = 1000 * (total - before[name][1]) / lookups
    return figures


async def sequential_all(servers: dict[str, Kiln], key: Path, count: int) -> None:
    for kiln in servers.values():
        await sequential(kiln, key, count)


def measure_lookups(root: Path, connections: int) -> dict[str, float]:
    """Both directories' figures (keys `auth_p50_ms_*`, `auth_p99_ms_*`, `conn_per_s_*`,
    `lookup_ms_*` for sqlite and postgres), with about `connections` of each kind per server."""
    # Not under `root`: a TemporaryDirectory is mode 0700, closed to the postgres user.
    cluster = Cluster(Path(tempfile.mkdtemp(prefix="kilnproxy-bench-pg-")), find_bindir())
    servers: dict[str, Kiln] = {}
    try:
        cluster.init()
        cluster.start()
        cluster.create_role()
        url = cluster.url(cluster.create_database())
        key = keygen(root / "bench_key")
        for name in DIRECTORIES:
            settings = {"directory": {"url": url}} if name == "postgres" else {}
            servers[name] = Kiln(root / name, settings)
            enroll(servers[name], key)
            servers[name].start()
        figures = measure_servers(servers, key, connections)
    finally:
        for kiln in servers.values():
            if kiln.proc is not None and kiln.proc.poll() is None:
                kiln.stop()
        cluster.destroy()
    return {name: figures[name] for name in sorted(figures)}


def table(f: dict[str, float]) -> str:
    lines = ["| directory | p50 ms | p99 ms | lookup ms | connections/s |",
             "| --- | --- | --- | --- | --- |"]  # fmt: skip
    for name in DIRECTORIES:
        lines.append(
            f"| {name} | {f[f'auth_p50_ms_{name}']:.2f} | {f[f'auth_p99_ms_{name}']:.2f} | "
            f"{f[f'lookup_ms_{name}']:.3f} | {f[f'conn_per_s_{name}']:.0f} |"
        )
    difference = f["auth_p99_ms_postgres"] - f["auth_p99_ms_sqlite"]
    lines.append(f"\np99 PostgreSQL - SQLite: {difference:.2f} ms (target <= 2 ms)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    help_text = "connections per server, for each of latency and throughput (default 200)"
    parser.add_argument("--connections", type=int, default=200, help=help_text)
    args = parser.parse_args()
    if args.connections < BATCH * ROUNDS:
        parser.error(f"--connections is at least {BATCH * ROUNDS}")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            figures = measure_lookups(Path(tmp), args.connections)
    except pytest.fail.Exception as exc:  # find_bindir: PostgreSQL is not installed
        sys.exit(f"lookup.py: {exc.msg}")
    RESULTS.mkdir(exist_ok=True)
    record = {**figures, "connections": args.connections,
              "date": datetime.now(UTC).isoformat(timespec="seconds")}  # fmt: skip
    (RESULTS / "lookup.json").write_text(json.dumps(record, indent=2) + "\n")
    print(table(figures))


if __name__ == "__main__":
    main()
