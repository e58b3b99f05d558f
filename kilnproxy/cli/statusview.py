"""Plain-text rendering of status socket replies for `kilnproxy status` and `connections`."""

from __future__ import annotations

from typing import Any


def _mib(value: object) -> str:
    return f"{int(value) / 1048576:.1f} MiB" if isinstance(value, int | float) else "?"


def render(command: str, reply: dict[str, Any]) -> list[str]:
    if command == "status":
        lines = [
            f"kilnproxy {reply.get('version')}, up {reply.get('uptime')}, "
            f"fast path {reply.get('fast_path')}",
            f"unauthenticated connections: {reply.get('unauthenticated')}, "
            f"penalised sources: {reply.get('penalised_sources')}",
        ]
        lines.append(
            f"{'WORKER':>6} {'PID':>8} {'SESSIONS':>8} {'TOTAL':>8} {'RSS':>10}  FAST PATH"
        )
        for w in reply.get("workers", []):
            lines.append(
                f"{w.get('index'):>6} {w.get('pid'):>8} {w.get('sessions'):>8} "
                f"{w.get('sessions_total'):>8} {_mib(w.get('rss')):>10}  {w.get('fast_path')}"
            )
        return lines
    if command == "connections":
        rows = reply.get("connections", [])
        lines = [f"{len(rows)} session(s)"]
        for r in rows:
            who = f"{r.get('account') or '-'}/{r.get('user') or '-'}"
            lines.append(
                f"{r.get('session')}  worker {r.get('worker')}  {r.get('remote_addr')}  {who}  "
                f"key {r.get('key_name') or '-'!r}  {r.get('verb') or '-'} {r.get('repo') or '-'}  "
                f"{float(r.get('duration', 0)):.0f}s  "
                f"in {r.get('bytes_in')} out {r.get('bytes_out')}"
            )
        return lines
    if command == "kill":
        return [f"ended session {reply.get('killed')}"]
    return [str(reply)]
