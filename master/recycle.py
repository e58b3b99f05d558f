"""When a worker is to be recycled for its memory (`[workers] recycle_rss_factor`, SPEC 6).

A flood of connections can leave a worker's RSS far above what it holds: CPython keeps a
256 KiB arena (and glibc a heap page) mapped while any one object in it lives, so a few
survivors scattered over a flood's memory pin most of it. That memory is reused, not leaked,
but it is never given back. uwsgi's `reload-on-rss` and gunicorn's `max_requests` answer this
by replacing the worker; so does kilnproxy, with one step of the rolling restart (the
supervisor starts the replacement, waits until it is READY, then drains the old worker).

Rule: this module only decides, from plain numbers: it never signals or messages a worker. The
supervisor keeps one `MemoryWatch` per worker, feeds it every heartbeat (`observe`), and asks
`due` whether to recycle now.

A worker is due when its RSS has stayed above `factor` times its baseline (its RSS at its first
heartbeat once READY: what a worker serving nothing holds) for `QUIET_FOR` seconds, all of them
while the host was quiet: at most `QUIET_STARTUPS` unauthenticated connections per serving
worker, OpenSSH's MaxStartups start. Under a pre-auth flood a new worker would only be filled
again, and its old one would have to drain the flood's connections.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

QUIET_FOR = 10.0  # seconds over the limit, host quiet throughout, before a recycle
QUIET_STARTUPS = 10  # unauthenticated connections per serving worker: more is a flood


@dataclass(frozen=True)
class MemoryWatch:
    """One worker's memory as the supervisor has seen it."""

    baseline: int = 0  # bytes of RSS at its first heartbeat once READY; 0 until then
    over_since: float | None = None  # since when it has been over the limit with the host quiet

    def limit(self, factor: float) -> int:
        return int(self.baseline * factor)


def host_quiet(unauthenticated: int, serving: int) -> bool:
    """No pre-auth flood in progress: at most `QUIET_STARTUPS` per serving worker."""
    return unauthenticated <= QUIET_STARTUPS * max(1, serving)


def observe(
    watch: MemoryWatch, rss: int, ready: bool, quiet: bool, now: float, factor: float
) -> MemoryWatch:
    """The watch after one heartbeat of `rss` bytes, at monotonic time `now`."""
    if not ready or factor <= 0:
        return watch
    if not watch.baseline:
        return MemoryWatch(baseline=rss)
    if rss <= watch.limit(factor) or not quiet:
        return replace(watch, over_since=None)  # the quiet time over the limit starts again
    if watch.over_since is None:
        return replace(watch, over_since=now)
    return watch


def due(watch: MemoryWatch, now: float) -> bool:
    """Whether the worker is to be recycled now (whether another recycle runs is the
    supervisor's to check: one at a time)."""
    return watch.over_since is not None and now - watch.over_since >= QUIET_FOR
