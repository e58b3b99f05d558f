"""The build-time version stamp (SPEC 9). Never computed at run time."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BuildInfo:
    version: str
    commit: str
    commit_count: int
    build_date: str


def build_info() -> BuildInfo:
    try:
        from kilnproxy import _stamp
    except ImportError:  # a source tree that was never built or installed
        return BuildInfo("1.0.0.0000000.unstamped", "0000000", 0, "unstamped")
    return BuildInfo(_stamp.VERSION, _stamp.COMMIT, _stamp.COMMIT_COUNT, _stamp.BUILD_DATE)
