"""The command grammar of SPEC 3: what a client may ask to run, and the repository it names.

Pure functions over strings: no I/O, no directory. A command that does not parse is a BadCommand
(exit 128); the client's path is only ever turned into a repository *name*. It never reaches a
backend: the backend gets the directory's path for that name.
"""

from __future__ import annotations

import enum
import re
import shlex
from dataclasses import dataclass

from kilnproxy.errors import BadCommand

MAX_COMMAND_BYTES = 4096
MAX_PATH_BYTES = 255
_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_GIT_PROTOCOL = re.compile(r"[A-Za-z0-9=:._-]{1,256}")


class Vcs(enum.Enum):
    GIT = "git"
    HG = "hg"


class Verb(enum.Enum):
    UPLOAD_PACK = "git-upload-pack"
    RECEIVE_PACK = "git-receive-pack"
    UPLOAD_ARCHIVE = "git-upload-archive"
    HG_SERVE = "hg-serve"

    @property
    def vcs(self) -> Vcs:
        return Vcs.HG if self is Verb.HG_SERVE else Vcs.GIT

    @property
    def writes(self) -> bool:
        """Whether the verb needs write access up front (hg checks pushes later, in a hook)."""
        return self is Verb.RECEIVE_PACK


_GIT_VERBS = {verb.value: verb for verb in Verb if verb.vcs is Vcs.GIT}


@dataclass(frozen=True)
class Command:
    verb: Verb
    repo: str  # ACCOUNT/NAME, normalised


def parse_command(line: str) -> Command:
    """Parse what the client asked to exec; raise BadCommand for anything not in SPEC 3."""
    if len(line.encode("utf-8", "surrogateescape")) > MAX_COMMAND_BYTES:
        raise BadCommand("command too long")
    try:
        words = shlex.split(line, posix=True)
    except ValueError:
        raise BadCommand("malformed command") from None
    if len(words) == 3 and words[0] == "git" and f"git-{words[1]}" in _GIT_VERBS:
        words = [f"git-{words[1]}", words[2]]  # Git for Windows sends `git upload-pack PATH`
    if len(words) == 2 and words[0] in _GIT_VERBS:
        return Command(_GIT_VERBS[words[0]], repo_name(words[1], Vcs.GIT))
    if len(words) == 5 and words[0:2] == ["hg", "-R"] and words[3:] == ["serve", "--stdio"]:
        return Command(Verb.HG_SERVE, repo_name(words[2], Vcs.HG))
    raise BadCommand("unknown command; only git and hg transport commands are served")


def repo_name(path: str, vcs: Vcs) -> str:
    """Normalise a client's path to ACCOUNT/NAME, or raise BadCommand."""
    name = path
    if name.startswith("~/"):
        name = name[2:]
    elif name.startswith("/"):
        name = name[1:]
    name = name.removesuffix("/")
    if vcs is Vcs.GIT:
        name = name.removesuffix(".git")
    segments = name.split("/")
    if len(name.encode("utf-8", "surrogateescape")) > MAX_PATH_BYTES:
        raise BadCommand("repository path too long")
    if len(segments) < 2 or not all(_valid_segment(s) for s in segments):
        raise BadCommand(f"invalid repository path {path!r}")
    return name


def _valid_segment(segment: str) -> bool:
    return bool(_SEGMENT.fullmatch(segment)) and ".." not in segment


def git_protocol(value: str | bytes | None) -> str | None:
    """The GIT_PROTOCOL value to pass on, or None if absent or not a plausible value."""
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if value is None or not _GIT_PROTOCOL.fullmatch(value):
        return None
    return value
