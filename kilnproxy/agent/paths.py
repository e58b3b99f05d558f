"""Which repository paths the agent serves: only those that lie under its base directory.

A path is resolved first (`..` and every symlink followed), so a symlink inside the base that
leads out of it is refused like a path written outside it. So is one where git or hg would look
instead of the path itself: git opens PATH/.git before PATH, and PATH.git/.git and PATH.git when
PATH is no repository; hg opens PATH/.hg. And so is a repository there that names its data
elsewhere: a gitfile (a `.git` file saying `gitdir: DIR`), a shared hg repository's
`.hg/sharedpath`. What lies inside a repository (its hooks, config, alternates) is the
operator's, and trusted as such: the rule is about which repository a proxy may ask for. The
agent checks off its loop (`PathChecks`), that the directory is there too: the check reads the
disk.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from kilnproxy.backends.local import absent
from kilnproxy.backends.threads import CHECK_WITHIN, STUCK_AT_MOST, DiskChecks, StuckDisk
from kilnproxy.errors import KilnproxyError


class Refused(KilnproxyError):
    """A request the agent will not run; the message goes back to the proxy and to the log."""


def confine(base: Path, requested: str) -> Path:
    """The resolved repository path of `requested`, which must lie strictly under `base`."""
    path = Path(requested)
    if not path.is_absolute():
        raise Refused(f"path {requested!r} is not absolute")
    root = base.resolve()
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError, ValueError) as exc:  # a symlink loop, a NUL byte
        raise Refused(f"path {requested!r} cannot be resolved: {exc}") from None
    if resolved == root or not resolved.is_relative_to(root):
        raise Refused(f"path {requested!r} is outside the agent's base {root}")
    sibling = resolved.with_name(resolved.name + ".git")
    for opened in (resolved / ".git", resolved / ".hg", sibling, sibling / ".git"):
        if not os.path.lexists(opened):
            continue
        try:
            targets = [opened.resolve()]
            pointer = _pointer(opened)
            if pointer is not None:
                targets.append(pointer)
        except (OSError, RuntimeError, ValueError) as exc:
            raise Refused(f"path {requested!r}: {opened} cannot be resolved: {exc}") from None
        if not all(target.is_relative_to(root) for target in targets):
            raise Refused(f"path {requested!r}: {opened} leads outside the agent's base {root}")
    return resolved


def served(base: Path, requested: str) -> Path:
    """`confine`d, and a directory there to run a command in (the local backend's rule)."""
    path = confine(base, requested)
    missing = absent(path)
    if missing is not None:
        raise Refused(missing)
    return path


def _pointer(opened: Path) -> Path | None:
    """Where a repository found at `opened` says its data is, resolved: a gitfile's `gitdir:`
    (a `.git` that is a file), or a shared hg repository's `.hg/sharedpath`."""
    if opened.name == ".hg":
        shared = opened / "sharedpath"
        if not shared.is_file():
            return None
        return (opened / _first_line(shared)).resolve()
    if not opened.is_file():
        return None
    line = _first_line(opened)
    if not line.startswith("gitdir:"):
        return None  # not a repository: git does not take it
    return (opened.parent / line.removeprefix("gitdir:").strip()).resolve()


def _first_line(path: Path) -> str:
    with path.open("rb") as file:
        return file.read(4096).decode(errors="replace").split("\n", 1)[0].strip()


class PathChecks:
    """`served` off the agent's loop (`DiskChecks`: the check reads the disk, a stat of every
    component and a gitfile), a request refused if its disk does not answer."""

    def __init__(self, within: float = CHECK_WITHIN, stuck: int = STUCK_AT_MOST) -> None:
        self.disk = DiskChecks(within, stuck)

    async def served(self, base: Path, requested: str) -> Path:
        try:
            return await self.disk.run(functools.partial(served, base, requested))
        except StuckDisk as exc:
            raise Refused(f"path {requested!r}: {exc}") from None
