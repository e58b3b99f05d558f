"""The soak (issue 12): `make soak`, SOAK_MINUTES long (default 30), not part of `make test`.

kilnproxy with 2 workers in front of a real storage sshd (its ssh:// backend, built by
bench/fixtures.py), a small git and a small hg repository, and 50 client threads each looping
git clone, git fetch, git push (to its own branch of the one git repository), hg clone, hg pull,
hg push (each client its own hg repository: Mercurial answers concurrent pushes to one repository
with its own "remote repository changed while pushing - please try again", a race between
clients, not a fault of the proxy; the 3-minute run in bench/results/soak-3min.json had 2) until
the end. Meanwhile the master gets a SIGHUP every 2 minutes and one worker a SIGKILL
every 5 minutes (both scaled down in shorter runs, so each happens several times).

Which operations a kill cut is proved, not guessed from timing. kilnproxy logs JSON lines here,
each with the pid of the process that wrote it, and each client connects from its own loopback
address (`ssh -b`, for git and hg alike): so the log names, for every operation, the session its
connection opened, the worker pid that accepted it, and how it ended (its access line). An
operation counts apart ("killed") only if one of its sessions was accepted by a worker pid that
was then SIGKILLed and never wrote its access line. Any other failure is a failure, kept with its
stderr, sessions, pid and worker. Per kill, the results also give the sessions the master's
connection table gave that slot just before the kill (the table is fed by heartbeats: a session
younger than a beat is not in it yet, so the log is the proof, the table a cross-check).

Every minute (at least 10 samples a run) it records each worker's RSS, fds, asyncio tasks and
sessions, and writes bench/results/NAME.json and NAME.png (NAME is `soak` unless given).

    python bench/soak.py [--minutes N] [--clients N] [--name NAME] [--log FILE]

It never runs as part of the tests and never touches anything outside its temporary directory,
bench/results and the --log file it is given.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fixtures import Paths, build, git_repo, hg_repo, register
from harness import run
from run import versions
from soak_report import growth, log_digest, log_records, plot, sessions

from kilnproxy.cli.admin import add_repo
from kilnproxy.errors import OperatorError

RESULTS = Path(__file__).resolve().parent / "results"
KINDS = ("git clone", "git fetch", "git push", "hg clone", "hg pull", "hg push")
CLOCK_SLACK = 0.5  # seconds: a connection logged this close to an operation's ends is its
OP_TIMEOUT = 300.0
KEPT_FAILURES = 20


@dataclass
class Op:
    kind: str
    client: int
    started: float
    ended: float
    ok: bool
    stderr: str = ""
    returncode: int | None = None
    # The same moments by the wall clock, to find its connection in kilnproxy's log.
    wall_started: float = 0.0
    wall_ended: float = 0.0


@dataclass
class Kill:
    at: float
    index: int
    pid: int
    # The sessions the master's connection table gave to that slot just before the kill, with
    # the client's address (a slot's older, draining worker may have some: the log tells).
    sessions: dict[str, str]


@dataclass
class Ledger:
    """What every thread reports, under one lock."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    ops: list[Op] = field(default_factory=list)
    kills: list[Kill] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    # Every worker process seen, by pid: its slot, when first seen and the most sessions it was
    # seen to have served (noted at each sample, HUP and kill: most live less than a minute).
    seen: dict[int, dict[str, Any]] = field(default_factory=dict)
    # Set when kilnproxy went away before the end (something else stopped it): clients stop.
    aborted: threading.Event = field(default_factory=threading.Event)

    def note(self, workers: list[dict[str, Any]], t: float) -> None:
        with self.lock:
            for worker in workers:
                if int(worker["pid"]) == 0:
                    continue
                entry = self.seen.setdefault(
                    int(worker["pid"]), {"index": int(worker["index"]), "first": t, "total": 0}
                )
                entry["total"] = max(entry["total"], int(worker["sessions_total"]))

    def add(self, op: Op) -> None:
        with self.lock:
            self.ops.append(op)

    def done(self) -> int:
        with self.lock:
            return len(self.ops)


def address(client: int) -> str:
    """Client N's own loopback source address."""
    return f"127.0.{1 + client // 250}.{1 + client % 250}"


class Client(threading.Thread):
    """One user: a git work clone and an hg work clone, looping the six operations."""

    def __init__(self, n: int, paths: Paths, ledger: Ledger, deadline: float) -> None:
        super().__init__(name=f"client-{n}", daemon=True)
        self.n, self.paths, self.ledger, self.deadline = n, paths, ledger, deadline
        self.dir = paths.root / "clients" / str(n)
        self.ssh = " ".join([*paths.kiln.ssh_argv(paths.client_key), "-b", address(n)])
        self.env = paths.kiln.client_env(paths.client_key) | {"GIT_SSH_COMMAND": self.ssh}
        self.branch = f"c{n}"
        self.round = 0

    def run(self) -> None:
        time.sleep(random.Random(self.n).uniform(0, 3))  # not all 50 in the same instant
        while time.monotonic() < self.deadline and not self.ledger.aborted.is_set():
            self.round += 1
            for kind in KINDS:
                if time.monotonic() >= self.deadline or self.ledger.aborted.is_set():
                    return
                self.step(kind)

    def step(self, kind: str) -> None:
        if kind in ("git fetch", "git push") and not (self.dir / "git" / ".git").exists():
            return  # its work clone was cut (by a kill): the next round clones it again
        if kind in ("hg pull", "hg push") and not (self.dir / "hg" / ".hg").exists():
            return
        started, wall = time.monotonic(), time.time()
        try:
            done = self.operation(kind)
            code: int | None = done.returncode
            ok, err = code == 0, (done.stdout + done.stderr).decode(errors="replace")
        except subprocess.TimeoutExpired:
            code, ok, err = None, False, f"timed out after {OP_TIMEOUT:.0f} s"
        self.ledger.add(Op(kind, self.n, started, time.monotonic(), ok, err[-600:], code,
                           wall, time.time()))  # fmt: skip

    def operation(self, kind: str) -> subprocess.CompletedProcess[bytes]:
        git_work, hg_work = self.dir / "git", self.dir / "hg"
        scratch = self.dir / "scratch"
        shutil.rmtree(scratch, ignore_errors=True)
        if kind == "git clone":  # the work clone first, then fresh bare ones
            target = git_work if not (git_work / ".git").exists() else scratch
            bare = ["--bare"] if target == scratch else []
            return self.git(self.dir, "clone", "-q", *bare, self.url("git"), str(target))
        if kind == "git fetch":
            return self.git(git_work, "fetch", "-q", "origin")
        if kind == "git push":
            (git_work / f"{self.branch}.txt").write_text(f"round {self.round}\n")
            self.git(git_work, "add", f"{self.branch}.txt")
            self.git(git_work, "commit", "-qm", f"{self.branch} round {self.round}")
            return self.git(git_work, "push", "-q", "origin", f"HEAD:refs/heads/{self.branch}")
        if kind == "hg clone":
            target = hg_work if not (hg_work / ".hg").exists() else scratch
            return self.hg(self.dir, "clone", "-q", *(["-U"] if target == scratch else []),
                           self.url("hg"), str(target))  # fmt: skip
        if kind == "hg pull":
            return self.hg(hg_work, "pull", "-q")
        named = hg_work / ".hg" / "branch"  # absent while on the default branch
        if not named.exists() or named.read_text().strip() != self.branch:
            self.hg(hg_work, "branch", "-f", "-q", self.branch)
        (hg_work / f"{self.branch}.txt").write_text(f"round {self.round}\n")
        self.hg(hg_work, "commit", "-q", "-A", "-m", f"{self.branch} round {self.round}")
        return self.hg(hg_work, "push", "-q", "--new-branch", "-r", ".")

    def url(self, vcs: str) -> str:
        return self.paths.kiln.url("bench/soak-git" if vcs == "git" else f"bench/soak-hg-{self.n}")

    def git(self, cwd: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
        cwd.mkdir(parents=True, exist_ok=True)
        return subprocess.run(["git", *args], cwd=cwd, env=self.env, capture_output=True,
                              timeout=OP_TIMEOUT, check=False)  # fmt: skip

    def hg(self, cwd: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
        cwd.mkdir(parents=True, exist_ok=True)
        argv = ["hg", "--config", f"ui.ssh={self.ssh}", *args]
        return subprocess.run(argv, cwd=cwd, env=self.env, capture_output=True,
                              timeout=OP_TIMEOUT, check=False)  # fmt: skip


@dataclass(frozen=True)
class Schedule:
    minutes: float
    hup_every: float  # seconds
    kill_every: float
    sample_every: float

    @classmethod
    def of(cls, minutes: float) -> Schedule:
        """2 min / 5 min / 1 min, each scaled down so a short run has several HUPs, several
        KILLs and at least 10 samples."""
        seconds = minutes * 60
        return cls(minutes, min(120.0, seconds / 15), min(300.0, seconds / 6),
                   min(60.0, seconds / 10))  # fmt: skip


def remote_ip(remote: str) -> str:
    match = re.search(r"\d+\.\d+\.\d+\.\d+", remote)
    return match.group(0) if match else remote


def kill_one(paths: Paths, ledger: Ledger, t0: float, count: int) -> None:
    """SIGKILL one serving worker (the slots in turn), noting whom it was serving."""
    workers = paths.kiln.workers()
    newest = max((int(w["generation"]) for w in workers), default=0)
    ready = sorted((w for w in workers if w["state"] == "ready" and w["generation"] == newest),
                   key=lambda w: int(w["index"]))  # fmt: skip
    if not ready:
        return
    victim = ready[count % len(ready)]
    rows = [row for row in paths.kiln.connections() if row["worker"] == victim["index"]]
    sessions = {str(row["session"]): remote_ip(str(row["remote_addr"])) for row in rows}
    now = time.monotonic()
    os.kill(int(victim["pid"]), signal.SIGKILL)
    ledger.note(workers, round(now - t0, 1))
    with ledger.lock:
        ledger.kills.append(Kill(now, int(victim["index"]), int(victim["pid"]), sessions))
        ledger.events.append({"kind": "kill", "t": round(now - t0, 1),
                              "index": victim["index"], "pid": victim["pid"]})  # fmt: skip


def supervise(paths: Paths, ledger: Ledger, schedule: Schedule, t0: float, end: float) -> None:
    """The SIGHUPs to the master and SIGKILLs of a worker, on their schedule, until the end."""
    try:
        scheduled(paths, ledger, schedule, t0, end)
    except OperatorError:  # kilnproxy was stopped under us: the sampler says so
        ledger.aborted.set()


def scheduled(paths: Paths, ledger: Ledger, schedule: Schedule, t0: float, end: float) -> None:
    next_hup, next_kill, kills = t0 + schedule.hup_every, t0 + schedule.kill_every, 0
    while not ledger.aborted.is_set():
        wake = min(next_hup, next_kill)
        if wake >= end - 5:  # nothing in the last seconds: its failures would not be judged
            return
        time.sleep(max(0.0, wake - time.monotonic()))
        if wake == next_kill:
            kill_one(paths, ledger, t0, kills)
            kills, next_kill = kills + 1, next_kill + schedule.kill_every
        else:
            # A HUP retires these workers: what they served, before it is out of sight.
            ledger.note(paths.kiln.workers(), round(time.monotonic() - t0, 1))
            paths.kiln.send(signal.SIGHUP)
            with ledger.lock:
                ledger.events.append({"kind": "hup", "t": round(time.monotonic() - t0, 1)})
            next_hup += schedule.hup_every


def sample(paths: Paths, ledger: Ledger, t0: float) -> dict[str, Any]:
    keys = ("index", "pid", "generation", "state", "rss", "fds", "tasks", "sessions",
            "sessions_total")  # fmt: skip
    workers = [{k: w[k] for k in keys} for w in paths.kiln.workers()]
    t = round(time.monotonic() - t0, 1)
    ledger.note(workers, t)
    return {"t": t, "operations_done": ledger.done(),
            "workers": workers}  # fmt: skip


def by_address(logged: dict[str, dict[str, Any]]) -> dict[str, list[tuple[float, str]]]:
    """The logged sessions of each client address, (opened, id) in the order they opened."""
    out: dict[str, list[tuple[float, str]]] = {}
    for sid, session in logged.items():
        out.setdefault(session["ip"], []).append((session["opened"], sid))
    for rows in out.values():
        rows.sort()
    return out


def its_sessions(op: Op, index: dict[str, list[tuple[float, str]]]) -> list[str]:
    """The sessions kilnproxy's log shows the operation's client opening while it ran (its
    client is one thread with its own address, so only this operation's connection)."""
    rows = index.get(address(op.client), [])
    low = bisect.bisect_left(rows, (op.wall_started - CLOCK_SLACK, ""))
    high = bisect.bisect_right(rows, (op.wall_ended + CLOCK_SLACK, "~"))
    return [sid for _, sid in rows[low:high]]


def cut_by_kill(session: dict[str, Any], kills: list[Kill]) -> Kill | None:
    """The kill that cut a session: it was accepted by the killed worker's pid and never wrote
    its access line (its worker died first)."""
    if session["outcome"] is not None:
        return None
    return next((kill for kill in kills if kill.pid == session["pid"]), None)


def tally(ledger: Ledger, t0: float, logged: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Each operation ok, killed or failed. Killed only with proof from kilnproxy's log: one of
    its sessions was accepted by a worker pid that was SIGKILLed and never ended (no access
    line). Every other failure is a failure, kept with its stderr and its sessions."""
    counts = {kind: {"ok": 0, "failed": 0, "killed": 0} for kind in KINDS}
    failures: list[dict[str, Any]] = []
    killed: list[dict[str, Any]] = []
    slots = {pid: entry["index"] for pid, entry in ledger.seen.items()}
    index = by_address(logged)
    verdicts: dict[str, str] = {}  # session id -> the verdict on the operation it served
    for op in ledger.ops:
        mine = its_sessions(op, index)
        cuts = [(sid, kill) for sid in mine if (kill := cut_by_kill(logged[sid], ledger.kills))]
        verdict = "ok" if op.ok else "killed" if cuts else "failed"
        counts[op.kind][verdict] += 1
        verdicts |= dict.fromkeys(mine, verdict)
        if verdict == "ok":
            continue
        entry = {"kind": op.kind, "client": op.client, "address": address(op.client),
                 "exit": op.returncode, "started": round(op.started - t0, 1),
                 "ended": round(op.ended - t0, 1),
                 "sessions": [{"session": sid, "pid": logged[sid]["pid"],
                               "worker": slots.get(logged[sid]["pid"]),
                               "outcome": logged[sid]["outcome"], "exit": logged[sid]["exit"],
                               "in_kill_table": any(sid in k.sessions for k in ledger.kills)}
                              for sid in mine]}  # fmt: skip
        if verdict == "killed":
            kill = cuts[0][1]
            killed.append(entry | {"kill_t": round(kill.at - t0, 1), "kill_pid": kill.pid})
        elif len(failures) < KEPT_FAILURES:
            failures.append(entry | {"stderr": op.stderr[-400:]})
    totals = {v: sum(c[v] for c in counts.values()) for v in ("ok", "failed", "killed")}
    evidence = kill_evidence(ledger, t0, logged, verdicts)
    return {"operations": counts, "totals": totals, "failures": failures,
            "killed_operations": killed, "kill_evidence": evidence}  # fmt: skip


def kill_evidence(ledger: Ledger, t0: float, logged: dict[str, dict[str, Any]],
                  verdicts: dict[str, str]) -> list[Any]:  # fmt: skip
    """Per kill: the sessions the connection table gave the victim's slot just before it, those
    of them the log shows on the victim's pid, every session the log shows that pid accepting
    and never ending (cut by the kill), and the verdicts on the operations those served (an hg
    operation may have had all it needed when cut: it ignores ssh's exit status)."""
    out = []
    for kill in ledger.kills:
        cut = sorted(sid for sid, s in logged.items() if cut_by_kill(s, [kill]))
        table_on_pid = sorted(
            sid for sid in kill.sessions if logged.get(sid, {}).get("pid") == kill.pid
        )
        served = Counter(verdicts.get(sid, "no operation") for sid in cut)
        out.append({"t": round(kill.at - t0, 1), "index": kill.index, "pid": kill.pid,
                    "table_sessions_on_slot": len(kill.sessions),
                    "table_sessions_on_pid": len(table_on_pid),
                    "cut_sessions": len(cut),
                    "cut_not_in_table": sorted(set(cut) - set(table_on_pid)),
                    "cut_operations": dict(served),
                    "cut_addresses": sorted({logged[sid]["ip"] for sid in cut})})  # fmt: skip
    return out


def soak(paths: Paths, minutes: float, clients: int) -> tuple[dict[str, Any], Ledger, float]:
    """The run; its figures, less the verdicts (they need kilnproxy's log, complete once it
    has stopped), its ledger and its start."""
    schedule = Schedule.of(minutes)
    ledger = Ledger()
    t0 = time.monotonic()
    end = t0 + minutes * 60
    threads = [Client(n, paths, ledger, end) for n in range(clients)]
    for thread in threads:
        thread.start()
    boss = threading.Thread(target=supervise, args=(paths, ledger, schedule, t0, end), daemon=True)
    boss.start()
    samples = [sample(paths, ledger, t0)]
    aborted = None
    while time.monotonic() < end:
        time.sleep(max(0.0, min(schedule.sample_every, end - time.monotonic())))
        try:
            samples.append(sample(paths, ledger, t0))
        except OperatorError as exc:  # its status socket is gone: kilnproxy was stopped
            aborted = f"at {(time.monotonic() - t0) / 60:.1f} min: {exc}"
            ledger.aborted.set()
            break
        print(f"  {samples[-1]['t'] / 60:5.1f} min: {ledger.done()} operations", flush=True)
    boss.join(OP_TIMEOUT)
    for client in threads:
        client.join(OP_TIMEOUT + 30)
    if aborted is None:
        samples.append(sample(paths, ledger, t0))
    return {"minutes": minutes, "clients": clients, "schedule": vars(schedule),
            "samples": samples, "events": ledger.events,
            "kills": [{"t": round(k.at - t0, 1), "index": k.index, "pid": k.pid,
                       "clients_on_it": len(set(k.sessions.values()))} for k in ledger.kills],
            "growth": growth(samples, ledger.seen),
            "worker_processes": len(ledger.seen), "aborted": aborted}, ledger, t0  # fmt: skip


def prepare(root: Path, clients: int) -> Paths:
    """kilnproxy (2 workers, no source penalised: every client has its own loopback address)
    in front of the storage sshd, with bench/soak-git (~250 KB) and bench/soak-hg-N for each
    client (copies of one 200-changeset repository)."""
    settings: dict[str, dict[str, Any]] = {
        "workers": {"count": 2},
        "limits": {"penalty_exempt": ["127.0.0.0/8"]},
        "log": {"format": "json"},  # each record with its pid: which worker served a session
    }
    paths = build(root, settings)
    base = paths.storage.base / "bench"
    base.mkdir(parents=True, exist_ok=True)
    git_repo(base / "soak-git.git", 30, 10, 8_000)
    register(paths, "soak-git", "git")
    hg_repo(base / "soak-hg", 200)
    with paths.kiln.directory() as directory:
        for n in range(clients):
            run(["hg", "clone", "-q", "-U", str(base / "soak-hg"), str(base / f"soak-hg-{n}")])
            add_repo(directory, f"bench/soak-hg-{n}", "hg", "storage", None, init=False)
    return paths


def summary(f: dict[str, Any]) -> str:
    t = f["totals"]
    lines = [f"soak: {f['minutes']} min, {f['clients']} clients, {len(f['kills'])} kills, "
             f"{sum(e['kind'] == 'hup' for e in f['events'])} HUPs: {t['ok']} ok, "
             f"{t['failed']} failed, {t['killed']} on a killed worker"]  # fmt: skip
    for kind, c in f["operations"].items():
        lines.append(f"  {kind:9} ok {c['ok']:5}  failed {c['failed']:3}  killed {c['killed']:3}")
    for slot, g in f["growth"].items():
        lines.append(f"  slot {slot}: RSS {g['rss_first_mib']} -> {g['rss_last_mib']} MiB, "
                     f"{g['kib_per_1000_sessions']} KiB per 1000 sessions "
                     f"({g['sessions_served']} served), {g['kib_per_minute']} KiB/min")  # fmt: skip
    log = f["server_log"]
    lines.append(f"  server log: {log['levels']}, {log['tracebacks']} tracebacks, "
                 f"access outcomes {log['access_outcomes']}")  # fmt: skip
    for kill in f["kill_evidence"]:
        lines.append(f"  kill at {kill['t']} s of worker {kill['index']} (pid {kill['pid']}): "
                     f"{kill['cut_sessions']} sessions cut (their operations: "
                     f"{kill['cut_operations']}), {kill['table_sessions_on_pid']} of them in "
                     f"the connection table just before")  # fmt: skip
    for failure in f["failures"][:5]:
        where = ", ".join(f"{s['session']} on pid {s['pid']} ({s['outcome']})"
                          for s in failure["sessions"]) or "no session in the log"  # fmt: skip
        lines.append(f"  failed {failure['kind']} (client {failure['client']}, {where}): "
                     f"{failure['stderr'].strip()[-200:]}")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = float(os.environ.get("SOAK_MINUTES") or 30)
    parser.add_argument("--minutes", type=float, default=default, help="length (SOAK_MINUTES)")
    parser.add_argument("--clients", type=int, default=50, help="concurrent clients (50)")
    parser.add_argument("--name", default="soak", help="results file name (default: soak)")
    parser.add_argument("--log", type=Path, help="also keep kilnproxy's log (JSON lines) here")
    args = parser.parse_args()
    if args.minutes <= 0 or args.clients <= 0:
        parser.error("--minutes and --clients must be positive")
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        paths = prepare(Path(tmp), args.clients)
        try:
            figures, ledger, t0 = soak(paths, args.minutes, args.clients)
        finally:
            with contextlib.suppress(AssertionError):  # it had exited (it says so below)
                paths.stop()
        text = paths.kiln.log()
        if args.log:
            args.log.write_text(text)
    figures |= tally(ledger, t0, sessions(log_records(text)))
    figures["server_log"] = log_digest(text)
    figures |= {"date": datetime.now(UTC).isoformat(timespec="seconds"),
                "seconds": round(time.time() - started), "versions": versions()}  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(figures, indent=1) + "\n")
    plot(figures, RESULTS / f"{args.name}.png")
    print(summary(figures))
    if figures["aborted"]:
        sys.exit(f"soak: cut short {figures['aborted']} (kilnproxy stopped by something else)")


if __name__ == "__main__":
    main()
