"""Work that may wait a few passes of the event loop, done at most `per_pass` items a pass.

It exists for a measured reason (issue 12): 10,000 idle connections dropped at once (an
attacker, a load balancer's restart) all end in one pass of the worker's loop, because the loop
runs every callback that was ready when the pass began. Their access lines alone (two JSON
lines each) held the loop for a second or more, with nothing accepted and no heartbeat sent
meanwhile. Spread over passes, the same lines leave the loop free between batches.

Rule 1: only what may wait goes here (log lines and the counters that go with them), never what
the next accept or the next heartbeat depends on (admission counts, the live table, timers).
Rule 2: nothing is dropped: `run_all` does what is left, before the worker exits. An item that
raises (a bug) is logged, and the others are done all the same.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable

log = logging.getLogger("kilnproxy.session")


class Spread:
    __slots__ = ("_per_pass", "_queue", "_scheduled")

    def __init__(self, per_pass: int) -> None:
        self._per_pass = per_pass
        self._queue: deque[Callable[[], None]] = deque()
        self._scheduled = False

    def __len__(self) -> int:
        return len(self._queue)

    def add(self, work: Callable[[], None]) -> None:
        """Do `work` in a later pass of the running loop, after what was added before it."""
        self._queue.append(work)
        self._schedule()

    def run_all(self) -> None:
        """Do what is left now."""
        while self._queue:
            _do(self._queue.popleft())

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._run_some)

    def _run_some(self) -> None:
        self._scheduled = False
        for _ in range(min(self._per_pass, len(self._queue))):
            _do(self._queue.popleft())
        if self._queue:  # what is left waits for the next pass
            self._schedule()


def _do(work: Callable[[], None]) -> None:
    try:
        work()
    except Exception:
        log.exception("failed to finish a closed connection's work (its access line?)")
