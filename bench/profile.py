"""Where a relaying worker's CPU goes: py-spy on kilnproxy's worker during a raw relay.

Sets up the benchmark's paths (bench/fixtures.py, bench/relay.py), relays SIZE MiB through
path B, C or E (the agent:// backend) once to warm up, then once more under `py-spy record`, and
writes the functions that take the most samples, by their own time and with what they call, to
bench/results/profile-PATH.txt (profile-PATH-asyncssh-patch.txt with the patch), with the
worker's write and read syscalls per MB (for E, the agent's own CPU too) and the machine's
figures (bench/machine.py; path A is relayed once for its raw throughput).

    python bench/profile.py [--path C] [--mib 512] [--asyncssh-patch] [--ciphers LIST]
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import machine
from fixtures import build, kiln_settings, stop_all
from relay import add_raw_relay
from run import ASYNCSSH_PATCH, RESULTS, patched_asyncssh

RATE = 1000  # samples per second
TOP = 30
_FRAME = re.compile(r"(?P<function>.*) \((?P<file>[^:()]*)(:\d+)?\)$")


def frame_name(frame: str) -> str:
    """`function (path/to/file.py:123)` as `function (file.py)`."""
    match = _FRAME.match(frame)
    if match is None:
        return frame
    return f"{match['function']} ({match['file'].rsplit('/', 1)[-1]})"


def aggregate(raw: str) -> tuple[int, collections.Counter[str], collections.Counter[str]]:
    """Samples in all, by function's own time, and by time in it or what it calls, from
    py-spy's `raw` format (one `frame;frame;... count` line per distinct stack)."""
    total = 0
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        samples = int(count)
        total += samples
        frames = [frame_name(f) for f in stack.split(";")]
        own[frames[-1]] += samples
        for name in set(frames):
            inclusive[name] += samples
    return total, own, inclusive


def table(title: str, counts: collections.Counter[str], total: int) -> list[str]:
    return [title, *(f"{100 * n / total:5.1f}%  {name}" for name, n in counts.most_common(TOP))]


def agent_line(run: dict[str, float]) -> list[str]:
    """For path E: what the agent itself (on the storage server) spent on the profiled run."""
    if "agent_cpu" not in run:
        return []
    return [f"The agent's own process (not the proxy; not its command): {run['agent_cpu']:.2f} "
            "CPU s."]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", choices=("B", "C", "E"), default="C")
    parser.add_argument("--mib", type=int, default=512, help="MiB relayed per run")
    parser.add_argument("--ciphers", help="kilnproxy's [ssh] encryption_algs, comma-separated")
    parser.add_argument("--asyncssh-patch", action="store_true")
    args = parser.parse_args()
    settings = kiln_settings(args.ciphers, None)
    with tempfile.TemporaryDirectory() as tmp:
        if args.asyncssh_patch:
            os.environ["PYTHONPATH"] = str(patched_asyncssh(Path(tmp) / "patched"))
        paths = build(Path(tmp), settings)
        raw = add_raw_relay(paths, args.mib << 20, settings)
        try:
            direct = raw.once("A")  # the machine's raw relay throughput, for its figures
            raw.once(args.path)
            kiln = raw.local if args.path == "B" else paths.kiln
            worker = int(kiln.workers()[0]["pid"])
            output = Path(tmp) / "profile.raw"
            py_spy = Path(sys.executable).parent / "py-spy"
            spy = subprocess.Popen(
                [str(py_spy), "record", "--pid", str(worker), "--rate", str(RATE),
                 "--format", "raw", "--output", str(output), "--nonblocking"],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            )  # fmt: skip
            time.sleep(1.0)  # py-spy attaches
            run = raw.once(args.path)
            spy.send_signal(signal.SIGINT)  # py-spy writes its output on ^C
            _, errors = spy.communicate(timeout=30)
            if not output.exists():
                raise RuntimeError(f"py-spy wrote nothing: {errors.decode()[-500:]}")
            total, own, inclusive = aggregate(output.read_text())
        finally:
            stop_all((paths, raw))
    figures = machine.machine_figures(raw.size / 1e6 / direct["seconds"])
    variant = f"ciphers {args.ciphers or 'default'}, asyncssh " + (
        f"with {ASYNCSSH_PATCH.name}" if args.asyncssh_patch else "as released"
    )
    megabytes = raw.size / 1e6
    lines = [
        f"py-spy, {RATE} Hz, on the worker of path {args.path} relaying {args.mib} MiB "
        f"({run['seconds']:.2f} s, {run['cpu']:.2f} CPU s in the proxy); {variant}.",
        f"{total} samples; uvloop's own C code (epoll, socket reads) counts as Runner.run.",
        f"The worker's write and read syscalls per MB relayed: {run['writes'] / megabytes:.1f}, "
        f"{run['reads'] / megabytes:.1f} (bench/measure.py io_calls).",
        *agent_line(run),
        *machine.describe(figures),
        "",
        *table("-- own time", own, total),
        "",
        *table("-- with what it calls", inclusive, total),
    ]
    suffix = "-asyncssh-patch" if args.asyncssh_patch else ""
    target = RESULTS / f"profile-{args.path}{suffix}.txt"
    target.write_text("\n".join(lines) + "\n")
    print(target.read_text())


if __name__ == "__main__":
    main()
