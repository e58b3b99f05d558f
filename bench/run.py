"""kilnproxy against OpenSSH, side by side, in one run: `make bench` or `make bench-quick`.

Paths (bench/fixtures.py): A direct sshd, B kilnproxy local backend, C kilnproxy ssh backend,
D an OpenSSH ForceCommand proxy, E kilnproxy agent:// backend (C's kilnproxy and worker, with a
`kilnproxy agent` as a second storage server on this machine). Measures, each path once a round
in a shuffled order, medians and ratios to A (each clone ratio with its quartiles over the
rounds): small-clone latency, large-clone wall time (a blob-heavy repository, and a
history-heavy one: bench/history.py), raw relay throughput and the proxy's CPU per GB relayed
(bench/relay.py) with the worker's write and read syscalls per MB (and, apart, E's agent's own
CPU per GB: it runs on the storage server, not the proxy), server CPU per new authenticated
connection (kilnproxy's one worker against sshd), memory per idle connection and per active
session, hg clone, the proxy CPU per GB cloned by each SSH client family through C
(bench/per_client.py), and the cost of a directory lookup (bench/lookup.py: TCP connect to
authenticated, SQLite against PostgreSQL). Every results file carries the machine's own figures
(bench/machine.py: CPU model, A's raw relay throughput, a socket send+recv pair's time), so that
runs on different machines can be read together. Writes bench/results/NAME.{json,md,png} (NAME
is `latest` unless given).

    python bench/run.py [--quick] [--ciphers LIST] [--window SIZE] [--asyncssh-patch] [--name NAME]

--ciphers sets kilnproxy's offered ciphers (`[ssh] encryption_algs`) and --window its backend
window (`[backend_ssh] window`), to measure a setting; --asyncssh-patch runs kilnproxy on a
scratch copy of asyncssh with bench/asyncssh-hotpath.patch applied, to measure that proposed
upstream change. Neither touches the installed packages.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncssh
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import machine
from clients import hold
from fixtures import (
    Paths,
    add_repositories,
    build,
    kiln_pids,
    kiln_settings,
    plain_sshd,
    server_cpu,
    stop_all,
)
from harness import Kiln, finish_upload_pack, hold_upload_pack
from lookup import measure_lookups
from measure import clone, cpu_seconds, rss, uss
from per_client import client_rows, client_table
from relay import RawRelay, add_raw_relay
from sshd import Sshd

from kilnproxy.version import build_info

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
ASYNCSSH_PATCH = BENCH / "asyncssh-hotpath.patch"
PATHS = ("A", "B", "C", "D", "E")
PROFILES: dict[str, dict[str, int]] = {
    "quick": {"small_rounds": 5, "large_rounds": 2, "large_commits": 600, "large_blob": 70_000,
              "history_commits": 3000, "hg_commits": 300, "hg_rounds": 3, "connections": 100,
              "idle": 300,
              "sshd_idle": 50, "active": 20, "relay_bytes": 256 << 20, "relay_rounds": 2,
              "lookups": 200, "client_rounds": 1},
    "full": {"small_rounds": 15, "large_rounds": 15, "large_commits": 3000, "large_blob": 70_000,
             "history_commits": 20_000, "hg_commits": 1000, "hg_rounds": 5, "connections": 300,
             "idle": 2000,
             "sshd_idle": 200, "active": 50, "relay_bytes": 1 << 30, "relay_rounds": 3,
             "lookups": 1000, "client_rounds": 3},
}  # fmt: skip


def proxy_cpu(paths: Paths, path: str) -> float:
    return server_cpu(paths.front if path == "D" else paths.kiln)


def agent_cpu(paths: Paths) -> float:
    """CPU seconds of E's agent process itself (not the git and hg it runs, as A's sshd's are
    not counted either): what the storage server pays for the agent."""
    assert paths.agent.proc is not None
    return cpu_seconds([paths.agent.proc.pid])


def clones(paths: Paths, name: str, vcs: str, rounds: int) -> dict[str, list[dict[str, float]]]:
    """Clone through each of A to E once per round, `rounds` times; time, proxy CPU and bytes
    of each, and for E the agent's CPU. The order within a round is shuffled (seeded by the
    repository's name, so a rerun clones in the same order): in a fixed order, whatever the
    clone before leaves behind (page cache, a busy sshd reaping) falls on the same path each
    round. A first round, not counted, clones through each path once, so that no path's
    figures hold the run's first clone of a repository (with these seeds it fell on E for the
    large and history repositories; in two of the five full runs committed before this round
    was added, it was E's slowest large clone or nearly)."""
    runs: dict[str, list[dict[str, float]]] = {p: [] for p in PATHS}
    for path in PATHS:  # the round not counted
        clone(paths.clone_argv(path, name, vcs), paths.env(path), paths.root / f"clone-{path}")
    order = random.Random(name)
    for _ in range(rounds):
        for path in order.sample(PATHS, len(PATHS)):
            target = paths.root / f"clone-{path}"
            before, agent_before = proxy_cpu(paths, path), agent_cpu(paths)
            seconds = clone(paths.clone_argv(path, name, vcs), paths.env(path), target)
            time.sleep(0.3)  # let per-connection processes exit and be counted
            size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
            runs[path].append({"seconds": seconds, "cpu": proxy_cpu(paths, path) - before,
                               "agent_cpu": agent_cpu(paths) - agent_before,
                               "bytes": size})  # fmt: skip
    return runs


def median(runs: list[dict[str, float]], key: str) -> float:
    return statistics.median(run[key] for run in runs)


def round_ratios(runs: dict[str, list[dict[str, float]]], path: str) -> list[float]:
    """The first, second and third quartile of `path`'s seconds over A's, round by round: how
    far one round's ratio strays, which a ratio of medians does not show."""
    pairs = zip(runs[path], runs["A"], strict=True)
    ratios = [run["seconds"] / direct["seconds"] for run, direct in pairs]
    if len(ratios) < 2:
        return ratios * 3
    return statistics.quantiles(ratios, n=4, method="inclusive")


async def connection_cost(paths: Paths, plain: Sshd, count: int) -> dict[str, float]:
    """Server CPU per new authenticated connection: kilnproxy's one worker against sshd."""
    out: dict[str, float] = {}
    for server in ("kilnproxy", "sshd"):
        measured = paths.kiln if server == "kilnproxy" else plain
        before = server_cpu(measured)
        started = time.perf_counter()
        for _ in range(count // 10):
            connections = await (hold(paths.kiln, paths.client_key, 10) if server == "kilnproxy"
                                 else hold_sshd(paths, plain, 10))  # fmt: skip
            for conn in connections:
                conn.close()
            await asyncio.gather(*(conn.wait_closed() for conn in connections))
        wall = time.perf_counter() - started
        await asyncio.sleep(1.0)
        cpu = server_cpu(measured) - before
        out[f"{server}_cpu_ms_per_conn"] = 1000 * cpu / count
        out[f"{server}_conn_per_s"] = count / wall
    return out


async def hold_sshd(paths: Paths, plain: Sshd, count: int) -> list[asyncssh.SSHClientConnection]:
    return list(await asyncio.gather(*(
        asyncssh.connect("127.0.0.1", plain.port, username="root",
                         client_keys=[str(paths.backend_key)], agent_path=None, config=None,
                         known_hosts=str(paths.root / "plain_known_hosts"))
        for _ in range(count)
    )))  # fmt: skip


def settle(kiln: Kiln, timeout: float = 30.0) -> None:
    """Wait until kilnproxy has let every session go (closing is asynchronous: memory measured
    while connections are still being torn down would shrink under the measurement)."""
    deadline = time.monotonic() + timeout
    while sum(int(w["sessions"]) for w in kiln.workers()) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)  # the next heartbeat


async def idle_memory(
    paths: Paths, plain: Sshd, kiln_count: int, sshd_count: int
) -> dict[str, float]:
    worker = kiln_pids(paths.kiln)[1:]
    before = rss(worker)
    held = await hold(paths.kiln, paths.client_key, kiln_count)
    await asyncio.sleep(2.0)
    kiln_kb = (rss(worker) - before) / kiln_count / 1024
    for conn in held:
        conn.close()
    await asyncio.gather(*(conn.wait_closed() for conn in held))
    assert plain.proc is not None
    listener = plain.proc.pid
    held = []
    for _ in range(sshd_count // 10):
        held += await hold_sshd(paths, plain, 10)
    await asyncio.sleep(1.0)
    children = [c.pid for c in psutil.Process(listener).children(recursive=True)]
    sshd_kb = uss(children) / sshd_count / 1024
    for conn in held:
        conn.close()
    return {"idle_conn_kb": kiln_kb, "sshd_idle_conn_kb": sshd_kb}


def active_memory(paths: Paths, count: int) -> float:
    """Worker RSS per held upload-pack session through the ssh backend (both legs open)."""
    with hold_upload_pack(paths.kiln, paths.client_key, "bench/small") as warm_up:
        finish_upload_pack(warm_up)  # first-use costs (imports, the first backend dial) not counted
    settle(paths.kiln)
    worker = kiln_pids(paths.kiln)[1:]
    before = rss(worker)
    with contextlib.ExitStack() as stack:
        clients = [
            stack.enter_context(hold_upload_pack(paths.kiln, paths.client_key, "bench/small"))
            for _ in range(count)
        ]
        time.sleep(2.0)
        grown = rss(worker) - before
        for client in clients:
            finish_upload_pack(client)
    return grown / count / 1024


def versions() -> dict[str, str]:
    def first_line(argv: list[str]) -> str:
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        return (done.stdout or done.stderr).strip().splitlines()[0]

    return {
        "kilnproxy": build_info().version,
        "python": platform.python_version(),
        "openssh": first_line(["ssh", "-V"]),
        "git": first_line(["git", "--version"]),
        "hg": first_line(["hg", "--version"]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.release()}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller repositories, fewer runs")
    parser.add_argument("--ciphers", help="kilnproxy's [ssh] encryption_algs, comma-separated")
    parser.add_argument("--window", help="kilnproxy's [backend_ssh] window, e.g. 8MiB")
    patch_help = f"run kilnproxy on asyncssh with {ASYNCSSH_PATCH.name} applied"
    parser.add_argument("--asyncssh-patch", action="store_true", help=patch_help)
    parser.add_argument("--name", default="latest", help="results file name (default: latest)")
    args = parser.parse_args()
    profile_name = "quick" if args.quick else "full"
    profile = PROFILES[profile_name]
    settings = kiln_settings(args.ciphers, args.window)
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        variant = {"ciphers": args.ciphers or "default", "window": args.window or "default",
                   "asyncssh": "as released"}  # fmt: skip
        if args.asyncssh_patch:
            # The servers are our children: they import the patched copy first.
            os.environ["PYTHONPATH"] = str(patched_asyncssh(Path(tmp) / "patched"))
            variant["asyncssh"] = f"with {ASYNCSSH_PATCH.name}"
        paths = build(Path(tmp), settings)
        plain: Sshd | None = None
        raw: RawRelay | None = None
        try:
            plain = plain_sshd(paths.root, paths.backend_key)
            sizes = add_repositories(paths, profile["large_commits"], profile["large_blob"],
                                     profile["hg_commits"], profile["history_commits"])  # fmt: skip
            raw = add_raw_relay(paths, profile["relay_bytes"], settings)
            figures = measure_all(paths, plain, raw, profile)
        finally:
            stop_all((paths, plain, raw))
    # Once the servers have stopped: the send+recv pairs are timed on a machine at rest.
    figures["machine"] = machine.machine_figures(figures["relay_mb_per_s"]["A"])
    with tempfile.TemporaryDirectory() as tmp:  # its own servers, once the others have stopped
        figures |= lookups(Path(tmp), profile["lookups"])
    figures |= {"profile": profile_name, "variant": variant, "repository_bytes": sizes,
                "relay_bytes": profile["relay_bytes"],
                "date": datetime.now(UTC).isoformat(timespec="seconds"),
                "seconds": round(time.time() - started), "versions": versions()}  # fmt: skip
    report(figures, args.name)


def patched_asyncssh(target: Path) -> Path:
    """A copy of the installed asyncssh with the proposed patch applied; returns its parent."""
    import asyncssh as installed

    shutil.copytree(Path(installed.__file__).parent, target / "asyncssh",
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    subprocess.run(["patch", "-s", "-p1", "-d", str(target), "-i", str(ASYNCSSH_PATCH)],
                   check=True)  # fmt: skip
    return target


def lookups(root: Path, connections: int) -> dict[str, float]:
    """bench/lookup.py's figures and what the target compares: PostgreSQL's p99 over SQLite's."""
    figures = measure_lookups(root, connections)
    figures["auth_p99_ms_postgres_minus_sqlite"] = (figures["auth_p99_ms_postgres"]
                                                    - figures["auth_p99_ms_sqlite"])  # fmt: skip
    return figures


def relays(raw: RawRelay, rounds: int) -> dict[str, list[dict[str, float]]]:
    """Relay through A to E in turn, `rounds` times."""
    runs: dict[str, list[dict[str, float]]] = {p: [] for p in PATHS}
    for _ in range(rounds):
        for path in PATHS:
            runs[path].append(raw.once(path))
    return runs


def measure_all(
    paths: Paths, plain: Sshd, raw: RawRelay, profile: dict[str, int]
) -> dict[str, Any]:
    # Memory first, on a fresh worker: after clones, freed memory is reused and deltas shrink.
    active_kb = active_memory(paths, profile["active"])
    settle(paths.kiln)
    figures: dict[str, Any] = asyncio.run(
        idle_memory(paths, plain, profile["idle"], profile["sshd_idle"])
    )
    figures["active_session_kb"] = active_kb
    settle(paths.kiln)
    small = clones(paths, "small", "git", profile["small_rounds"])
    large = clones(paths, "large", "git", profile["large_rounds"])
    history = clones(paths, "history", "git", profile["large_rounds"])
    hg = clones(paths, "designs", "hg", profile["hg_rounds"])
    relayed = relays(raw, profile["relay_rounds"])
    for label, runs in (("small_clone", small), ("large_clone", large),
                        ("history_clone", history), ("hg_clone", hg),
                        ("relay", relayed)):  # fmt: skip
        figures[f"{label}_seconds"] = {p: median(runs[p], "seconds") for p in PATHS}
    for label, runs in (("small", small), ("large", large), ("history", history)):
        figures[f"{label}_clone_runs"] = {p: [run["seconds"] for run in runs[p]] for p in PATHS}
        figures[f"{label}_clone_round_ratios"] = {p: round_ratios(runs, p) for p in "BCE"}
    for label in ("large", "history"):
        seconds = figures[f"{label}_clone_seconds"]
        figures[f"{label}_clone_ratio_local"] = seconds["B"] / seconds["A"]
        figures[f"{label}_clone_ratio_ssh"] = seconds["C"] / seconds["A"]
        figures[f"{label}_clone_ratio_agent"] = seconds["E"] / seconds["A"]
    small_seconds = figures["small_clone_seconds"]
    figures["small_clone_ratio_ssh"] = small_seconds["C"] / small_seconds["A"]
    figures["small_clone_ratio_agent"] = small_seconds["E"] / small_seconds["A"]
    gigabytes = raw.size / 1e9
    figures["relay_mb_per_s"] = {p: raw.size / 1e6 / figures["relay_seconds"][p] for p in PATHS}
    cpu_per_gb = {p: median(relayed[p], "cpu") / gigabytes for p in "BCDE"}
    figures["proxy_cpu_seconds_per_gb"] = cpu_per_gb
    figures["relay_cpu_ratio_ssh_vs_forcecommand"] = cpu_per_gb["C"] / cpu_per_gb["D"]
    figures["relay_cpu_ratio_agent_vs_forcecommand"] = cpu_per_gb["E"] / cpu_per_gb["D"]
    megabytes = raw.size / 1e6
    for calls in ("writes", "reads"):
        figures[f"{calls}_per_mb"] = {p: median(relayed[p], calls) / megabytes for p in "BCE"}
    cloned_gb = {p: median(large[p], "bytes") / 1e9 for p in PATHS}
    clone_cpu = {p: median(large[p], "cpu") / cloned_gb[p] for p in "BCDE"}
    figures["clone_cpu_seconds_per_gb"] = clone_cpu
    figures["clone_cpu_ratio_ssh_vs_forcecommand"] = clone_cpu["C"] / clone_cpu["D"]
    figures["clone_cpu_ratio_agent_vs_forcecommand"] = clone_cpu["E"] / clone_cpu["D"]
    # E's agent runs on the storage server: its CPU is not the proxy's, reported apart.
    figures["agent_cpu_seconds_per_gb"] = {
        "relay": median(relayed["E"], "agent_cpu") / gigabytes,
        "large_clone": median(large["E"], "agent_cpu") / cloned_gb["E"],
    }
    figures["clients"] = client_rows(paths, profile["client_rounds"])
    figures |= asyncio.run(connection_cost(paths, plain, profile["connections"]))
    figures["conn_cpu_ratio_vs_sshd"] = (figures["kilnproxy_cpu_ms_per_conn"]
                                         / figures["sshd_cpu_ms_per_conn"])  # fmt: skip
    return figures


def report(figures: dict[str, Any], name: str) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(figures, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown(figures))
    plot(figures, RESULTS / f"{name}.png")
    print(markdown(figures))


TARGETS = [  # the latest issue's for each figure (issues 13 and 14 tightened the first five)
    ("large_clone_ratio_local", "large clone B/A", "<= 1.02", 1.02),
    ("large_clone_ratio_ssh", "large clone C/A", "<= 1.05", 1.05),
    ("small_clone_ratio_ssh", "small clone C/A", "<= 0.6", 0.6),
    ("relay_cpu_ratio_ssh_vs_forcecommand", "proxy CPU per GB relayed, C/D", "<= 0.55", 0.55),
    ("relay_cpu_ratio_agent_vs_forcecommand", "proxy CPU per GB relayed, E/D", "<= 0.5", 0.5),
    ("large_clone_ratio_agent", "large clone E/A", "<= 1.03", 1.03),
    ("small_clone_ratio_agent", "small clone E/A", "<= 0.6", 0.6),
    ("idle_conn_kb", "KiB per idle connection", "<= 24", 24),
    ("active_session_kb", "KiB per active session", "<= 512", 512),
    ("conn_cpu_ratio_vs_sshd", "CPU per new connection / sshd", "<= 0.67", 0.67),
    ("auth_p99_ms_postgres_minus_sqlite", "auth p99 ms, PostgreSQL - SQLite", "<= 2", 2.0),
]


def markdown(f: dict[str, Any]) -> str:
    lines = [f"# kilnproxy benchmark ({f['profile']}), {f['date']}", ""]
    lines += [f"- {k}: {v}" for k, v in f["versions"].items()]
    lines += machine.describe(f["machine"])
    variant = f["variant"]
    lines += [
        f"- kilnproxy ciphers: {variant['ciphers']}; backend window: "
        f"{variant.get('window', 'default')}; asyncssh {variant['asyncssh']}"
    ]
    lines += ["", "| figure | value | target | met | round by round: quartiles |",
              "| --- | --- | --- | --- | --- |"]  # fmt: skip
    for key, label, target, bound in TARGETS:
        value = float(f[key])
        met = "yes" if value <= bound else "no"
        lines.append(f"| {label} | {value:.2f} | {target} | {met} | {spread(f, key)} |")
    lines += ["", "| median seconds | A direct | B local | C ssh | D ForceCommand | E agent |",
              "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for label in ("small_clone", "large_clone", "history_clone", "hg_clone", "relay"):
        row = f[f"{label}_seconds"]
        lines.append(
            f"| {label.replace('_', ' ')} | " + " | ".join(f"{row[p]:.3f}" for p in PATHS) + " |"
        )
    cpu, clone_cpu, rate = (f["proxy_cpu_seconds_per_gb"], f["clone_cpu_seconds_per_gb"],
                            f["relay_mb_per_s"])  # fmt: skip
    relayed = f["relay_bytes"] / 2**20
    sizes = f["repository_bytes"]
    lines += ["", f"History clone (many small objects, a {sizes['history'] / 1e6:.0f} MB pack; "
              f"large: {sizes['large'] / 1e6:.0f} MB of blobs): C/A "
              f"{f['history_clone_ratio_ssh']:.2f}, B/A {f['history_clone_ratio_local']:.2f}, "
              f"E/A {f['history_clone_ratio_agent']:.2f} (large: C/A "
              f"{f['large_clone_ratio_ssh']:.2f}, B/A {f['large_clone_ratio_local']:.2f}, "
              f"E/A {f['large_clone_ratio_agent']:.2f})."]  # fmt: skip
    agent = f["agent_cpu_seconds_per_gb"]
    lines += ["", f"Raw relay ({relayed:.0f} MiB of zeros): " + ", ".join(
                  f"{p} {rate[p]:.0f} MB/s" for p in PATHS) + ".",
              "Proxy CPU seconds per GB, raw relay: " + ", ".join(
                  f"{p} {cpu[p]:.2f}" for p in "BCDE") + " (E/D "
              f"{f['relay_cpu_ratio_agent_vs_forcecommand']:.2f}); during the large clone: "
              + ", ".join(f"{p} {clone_cpu[p]:.2f}" for p in "BCDE") + " (C/D "
              f"{f['clone_cpu_ratio_ssh_vs_forcecommand']:.2f}, E/D "
              f"{f['clone_cpu_ratio_agent_vs_forcecommand']:.2f}).",
              f"E's agent process (on the storage server, not counted in the proxy's CPU; not "
              f"the git it runs): {agent['relay']:.2f} CPU s per GB of the raw relay, "
              f"{agent['large_clone']:.2f} per GB of the large clone.",
              f"Server CPU per new connection: kilnproxy {f['kilnproxy_cpu_ms_per_conn']:.2f} ms "
              f"({f['kilnproxy_conn_per_s']:.0f}/s), sshd {f['sshd_cpu_ms_per_conn']:.2f} ms "
              f"({f['sshd_conn_per_s']:.0f}/s).",
              f"Memory per idle connection: kilnproxy {f['idle_conn_kb']:.1f} KiB, "
              f"sshd {f['sshd_idle_conn_kb']:.1f} KiB (USS of its processes).",
              syscalls_line(f), lookup_line(f)]  # fmt: skip
    lines += [
        "",
        "Proxy CPU per GB cloned through C (the large repository, git over each SSH "
        "client family with its defaults; cipher from kilnproxy's access line):",
        "",
    ]
    lines += [*client_table(f["clients"]), ""]
    return "\n".join(lines)


# The clone ratios in TARGETS, by the clone set and the path they come from.
ROUND_RATIOS = {"large_clone_ratio_local": ("large", "B"), "large_clone_ratio_ssh": ("large", "C"),
                "large_clone_ratio_agent": ("large", "E"), "small_clone_ratio_ssh": ("small", "C"),
                "small_clone_ratio_agent": ("small", "E")}  # fmt: skip


def spread(f: dict[str, Any], key: str) -> str:
    """A clone ratio's quartiles over the rounds, each round's path against that round's A
    ("-" for a figure that is not a clone ratio, or a run from before they were kept)."""
    label, path = ROUND_RATIOS.get(key, ("", ""))
    quartiles = f.get(f"{label}_clone_round_ratios", {}).get(path)
    if not quartiles:
        return "-"
    return " / ".join(f"{q:.2f}" for q in quartiles)


def syscalls_line(f: dict[str, Any]) -> str:
    """The kilnproxy worker's write and read syscalls per MB of the raw relay, and per 32 KiB
    (one full channel data packet): bench/measure.py io_calls."""
    writes, reads, packets = f["writes_per_mb"], f["reads_per_mb"], 1e6 / 32768
    each = [
        f"{p} {writes[p]:.1f} writes, {reads[p]:.1f} reads ({writes[p] / packets:.2f} and "
        f"{reads[p] / packets:.2f} per 32 KiB packet)"
        for p in "BCE"
    ]
    return (
        "Worker syscalls per MB of the raw relay (its own threads' write/writev and read/readv, "
        "from /proc; not the local backend's git, nor send, recv or getrandom): "
        + "; ".join(each)
        + "."
    )


def lookup_line(f: dict[str, Any]) -> str:
    return (
        "Directory lookup: p50/p99 ms from TCP connect to authenticated, SQLite "
        f"{f['auth_p50_ms_sqlite']:.2f}/{f['auth_p99_ms_sqlite']:.2f}, PostgreSQL "
        f"{f['auth_p50_ms_postgres']:.2f}/{f['auth_p99_ms_postgres']:.2f}; the worker's mean key "
        f"lookup SQLite {f['lookup_ms_sqlite']:.3f} ms, PostgreSQL {f['lookup_ms_postgres']:.3f} "
        f"ms; connections/s (10 at a time) SQLite {f['conn_per_s_sqlite']:.0f}, PostgreSQL "
        f"{f['conn_per_s_postgres']:.0f}."
    )


def plot(f: dict[str, Any], target: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 6, figsize=(24, 4))
    colors = ["#6b7785", "#2563eb", "#16a34a", "#dc2626", "#9333ea"]
    labels = ("small_clone", "large_clone", "history_clone", "hg_clone")
    for ax, label in zip(axes[:4], labels, strict=True):
        row = f[f"{label}_seconds"]
        ax.bar(PATHS, [row[p] for p in PATHS], color=colors)
        ax.set_title(label.replace("_", " ") + " (s, median)")
    rate = f["relay_mb_per_s"]
    axes[4].bar(PATHS, [rate[p] for p in PATHS], color=colors)
    axes[4].set_title("raw relay (MB/s)")
    cpu = f["proxy_cpu_seconds_per_gb"]
    axes[5].bar(["B", "C", "D", "E"], [cpu[p] for p in "BCDE"], color=colors[1:])
    # E's agent, on the storage server: beside E's proxy CPU, not part of it.
    axes[5].bar(["E agent"], [f["agent_cpu_seconds_per_gb"]["relay"]], color=colors[4],
                hatch="//", fill=False, edgecolor=colors[4])  # fmt: skip
    axes[5].set_title("proxy CPU s per GB relayed (hatched: E's agent)")
    m = f["machine"]
    fig.suptitle("A direct sshd · B kilnproxy local · C kilnproxy ssh · D sshd ForceCommand · "
                 "E kilnproxy agent\n"
                 f"{m['cpu_model']}: raw relay A {m['raw_relay_a_mb_per_s']:.0f} MB/s, send+recv "
                 f"pair {m['send_recv_pair_us_64b']:.2f} us (64 B)")  # fmt: skip
    fig.tight_layout()
    fig.savefig(target, dpi=100)


if __name__ == "__main__":
    main()
