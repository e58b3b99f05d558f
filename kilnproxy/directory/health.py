"""How a process tells the log that its directory is down, and that it is back.

Owns the outage state of one directory handle: when the current outage began, how many lookups
it refused, when the log last heard of it. Rule: during an outage every lookup fails, possibly
hundreds a second, so the log gets the first failure, then one line per `interval` at most,
then one line when a lookup works again. Never a line per lookup.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from kilnproxy.config import format_duration

log = logging.getLogger("kilnproxy.directory")

REPORT_INTERVAL = 10.0


class Outage:
    def __init__(
        self,
        where: str,
        interval: float = REPORT_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.where = where  # the directory's URL without its password
        self.interval = interval
        self._clock = clock
        self._wall = wall
        self.down_since: float | None = None  # wall clock, for statistics
        self._began = 0.0
        self._reported = 0.0
        self._refused = 0

    def failed(self, detail: str) -> None:
        now = self._clock()
        self._refused += 1
        if self.down_since is None:
            self.down_since, self._began, self._reported = self._wall(), now, now
            log.error("directory %s is unavailable: %s", self.where, detail)
        elif now - self._reported >= self.interval:
            self._reported = now
            log.error(
                "directory %s still unavailable after %s, %d lookups refused: %s",
                self.where,
                format_duration(max(1, round(now - self._began))),
                self._refused,
                detail,
            )

    def succeeded(self) -> None:
        if self.down_since is None:
            return
        log.warning(
            "directory %s is back after %s, %d lookups refused",
            self.where,
            format_duration(max(1, round(self._clock() - self._began))),
            self._refused,
        )
        self.down_since = None
        self._refused = 0
