"""What a soak run's samples say: per worker slot, the growth of RSS against sessions served and
against time, and the picture of the run.

Pure functions over the samples bench/soak.py records (plus the plot, which only writes the
file it is given); it never talks to the servers.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

KEPT_LOG_LINES = 30


def slope(points: list[tuple[float, float]]) -> float | None:
    """The least-squares slope of y against x; None with fewer than two distinct x."""
    if len({x for x, _ in points}) < 2:
        return None
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    sxx = sum((x - mean_x) ** 2 for x, _ in points)
    sxy = sum((x - mean_x) * (y - mean_y) for x, y in points)
    return sxy / sxx


def slot_rows(samples: list[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    """Per worker slot, one row a sample: that slot's serving worker of the newest generation
    (a worker still draining after a HUP is left out: its slot has a successor already)."""
    slots: dict[int, list[dict[str, Any]]] = {}
    for sample in samples:
        newest: dict[int, dict[str, Any]] = {}
        for worker in sample["workers"]:
            if worker["state"] != "ready":
                continue
            held = newest.get(worker["index"])
            if held is None or worker["generation"] > held["generation"]:
                newest[worker["index"]] = worker
        for index, worker in newest.items():
            slots.setdefault(index, []).append(worker | {"t": sample["t"]})
    return slots


def served(rows: list[dict[str, Any]], seen: dict[int, dict[str, Any]]) -> list[int]:
    """Sessions a slot has served by each row: the totals of its processes first seen before
    that row (the older ones have stopped taking sessions by then: retired by a HUP or killed)
    plus the current one's."""
    out = []
    for row in rows:
        earlier = sum(
            entry["total"]
            for pid, entry in seen.items()
            if entry["index"] == row["index"] and pid != row["pid"] and entry["first"] <= row["t"]
        )
        out.append(earlier + int(row["sessions_total"]))
    return out


def growth(
    samples: list[dict[str, Any]], seen: dict[int, dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """Per slot: RSS KiB per 1000 sessions served, RSS KiB per minute, first and last RSS."""
    out: dict[str, dict[str, Any]] = {}
    for index, rows in sorted(slot_rows(samples).items()):
        kib = [int(row["rss"]) / 1024 for row in rows]
        by_sessions = slope(list(zip(map(float, served(rows, seen)), kib, strict=True)))
        by_time = slope([(float(row["t"]) / 60, k) for row, k in zip(rows, kib, strict=True)])
        out[str(index)] = {
            "kib_per_1000_sessions": None if by_sessions is None else round(1000 * by_sessions, 1),
            "kib_per_minute": None if by_time is None else round(by_time, 1),
            "rss_first_mib": round(kib[0] / 1024, 1),
            "rss_last_mib": round(kib[-1] / 1024, 1),
            "sessions_served": served(rows, seen)[-1],
        }
    return out


def log_records(text: str) -> list[dict[str, Any]]:
    """The records of a kilnproxy log written with `[log] format = "json"` (one object a line;
    a line that is not one, such as a worker's fault output, is left out)."""
    records = []
    for line in text.splitlines():
        if not line.startswith("{"):
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def epoch(stamp: str) -> float:
    """A log record's `time` (`2026-11-29T17:28:53.968Z`) as seconds since the epoch."""
    return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()


def sessions(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every session the log names, by id: the pid of the worker that accepted it, the client's
    address and port, when it connected, and how it ended (its access line's outcome and exit,
    None if it has none: a session whose worker was killed never writes one)."""
    out: dict[str, dict[str, Any]] = {}
    for record in records:
        session = record.get("session")
        if not isinstance(session, str):
            continue
        message = str(record.get("message", ""))
        if message.startswith("connection from "):
            ip, _, port = message.removeprefix("connection from ").rpartition(":")
            out[session] = {"pid": record.get("pid"), "ip": ip, "port": port,
                            "opened": epoch(str(record["time"])), "outcome": None,
                            "exit": None, "verbs": []}  # fmt: skip
        elif message.startswith("access ") and session in out:
            out[session]["outcome"] = record.get("outcome")
            out[session]["exit"] = record.get("exit")
            if record.get("verb"):
                out[session]["verbs"].append(record["verb"])
    return out


def log_digest(text: str) -> dict[str, Any]:
    """What kilnproxy's own (JSON) log says about the run: access lines by outcome, lines by
    level, tracebacks (in records, or plain text such as a worker's fault output), and each kind
    of warning and error (to explain a failed operation)."""
    records = log_records(text)
    plain = "\n".join(line for line in text.splitlines() if not line.startswith("{"))
    outcomes: Counter[str] = Counter(
        str(r.get("outcome")) for r in records if str(r.get("message", "")).startswith("access ")
    )
    levels: Counter[str] = Counter(str(r.get("level", "?")).upper() for r in records)
    # Warnings and errors by kind (numbers masked): how many of each, and the first of each.
    kinds: dict[str, dict[str, Any]] = {}
    for r in records:
        if str(r.get("level")) in ("warning", "error", "critical"):
            line = f"{r.get('time')} {str(r.get('level')).upper()} {r.get('logger')} " + str(
                r.get("message")
            )
            kind = re.sub(r"\d+", "N", line.split(" ", 1)[1])
            kinds.setdefault(kind, {"count": 0, "first": line})["count"] += 1
    return {"access_outcomes": dict(outcomes), "levels": dict(levels),
            "tracebacks": sum("traceback" in r for r in records)
            + plain.count("Traceback (most recent call last)"),
            "warnings_and_errors": list(kinds.values())[:KEPT_LOG_LINES]}  # fmt: skip


def plot(figures: dict[str, Any], target: Path) -> None:
    """RSS of each slot's serving worker over time, and sessions open, with HUPs and KILLs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
    for index, rows in sorted(slot_rows(figures["samples"]).items()):
        minutes = [row["t"] / 60 for row in rows]
        top.plot(minutes, [row["rss"] / 2**20 for row in rows], marker="o", label=f"slot {index}")
        bottom.plot(minutes, [row["sessions"] for row in rows], marker="o", label=f"slot {index}")
    for ax in (top, bottom):
        for event in figures["events"]:
            style = ("#9ca3af", ":") if event["kind"] == "hup" else ("#dc2626", "--")
            ax.axvline(event["t"] / 60, color=style[0], linestyle=style[1], linewidth=1)
        ax.legend(loc="upper left")
    top.set_ylabel("worker RSS (MiB)")
    bottom.set_ylabel("sessions open")
    bottom.set_xlabel("minutes (grey dotted: SIGHUP, red dashed: SIGKILL of a worker)")
    counts = figures["totals"]
    fig.suptitle(
        f"kilnproxy soak, {figures['minutes']} min, {figures['clients']} clients: "
        f"{counts['ok']} ok, {counts['failed']} failed, {counts['killed']} on a killed worker"
    )
    fig.tight_layout()
    fig.savefig(target, dpi=100)
