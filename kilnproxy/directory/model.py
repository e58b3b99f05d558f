"""What the directory knows: plain, immutable records. Shared by every store."""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass
from pathlib import PurePosixPath
from urllib.parse import SplitResult, urlsplit

from kilnproxy.errors import OperatorError
from kilnproxy.policy.access import Access, Role
from kilnproxy.policy.commands import Vcs

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def check_name(kind: str, name: str) -> str:
    """Account, user and backend names: one path segment, no `..`."""
    if not _NAME.fullmatch(name) or ".." in name:
        raise OperatorError(f"invalid {kind} name {name!r} (letters, digits, . _ -; max 64)")
    return name


class DirectoryUnreachable(OperatorError):
    """The admin side could not connect to the directory's database, or lost it (the server
    shut down, ran out of connections). An admin command stops
    (one line, exit 2); `serve` starts anyway, so that a host booted during a database outage
    serves as soon as the database is back, without an operator."""


@dataclass(frozen=True)
class DirectoryStats:
    """A snapshot of one process's directory handle (its pool, lookups, failures, outage)."""

    store: str  # "sqlite" or "postgresql"
    pool_size: int  # connections this process may hold (1 for SQLite)
    connections: int  # open now
    in_use: int  # running a lookup now
    lookups: int  # since start
    failures: int  # lookups that raised DirectoryUnavailable
    down_since: float | None  # epoch seconds of the first failure of the current outage


@dataclass(frozen=True)
class Identity:
    """Who a verified public key belongs to."""

    account: str
    user: str
    role: Role
    key_name: str
    fingerprint: str


@dataclass(frozen=True)
class PublicKey:
    """An OpenSSH public key as the directory stores it (parsed by `ssh.keys`)."""

    algorithm: str
    fingerprint: str  # SHA256:...
    openssh: str  # "ALGORITHM BASE64", without comment


@dataclass(frozen=True)
class BackendUrl:
    scheme: str  # "local", "ssh" or "agent"
    base: PurePosixPath
    user: str = ""
    host: str = ""
    port: int = 0


def check_new_backend_url(url: str) -> BackendUrl:
    """A URL for `backends add`: what parse_backend_url reads, written plainly, so that what is
    stored is what is used (urlsplit drops tabs and newlines, ignores a query and a fragment,
    and reads port 0 as none), with no password (stored and listed, never used)."""
    if any(c.isspace() or not c.isprintable() for c in url):
        raise OperatorError(f"{url!r}: a backend URL has no spaces or control characters")
    parts = _split(url)
    if parts.query or parts.fragment or "?" in url or "#" in url:
        raise OperatorError(f"{url!r}: a backend URL has no query (?) or fragment (#)")
    if parts.password is not None:
        raise OperatorError(f"{parts.scheme}://...: a backend URL has no password (keys only)")
    parsed = parse_backend_url(url)
    if parsed.scheme != "local" and parts.port == 0:
        raise OperatorError(f"{url!r}: port 0 is no port")
    return parsed


def _split(url: str) -> SplitResult:
    try:
        return urlsplit(url)
    except ValueError as exc:  # an unclosed [ of an IPv6 address
        raise OperatorError(f"{url!r}: not a URL ({exc})") from None


def parse_backend_url(url: str) -> BackendUrl:
    parts = _split(url)
    if parts.scheme == "local":
        if parts.netloc or not parts.path.startswith("/"):
            raise OperatorError(f"{url!r}: a local backend is local:///ABSOLUTE/PATH")
        return BackendUrl("local", PurePosixPath(parts.path))
    if parts.scheme == "ssh":
        try:
            port = parts.port or 22
        except ValueError:
            raise OperatorError(f"{url!r}: the port is not a number") from None
        if not parts.hostname or not parts.username or not parts.path.startswith("/"):
            raise OperatorError(f"{url!r}: an ssh backend is ssh://USER@HOST:PORT/ABSOLUTE/PATH")
        base = PurePosixPath(parts.path)
        return BackendUrl("ssh", base, parts.username, parts.hostname, port)
    if parts.scheme == "agent":
        try:
            agent_port = parts.port
        except ValueError:
            raise OperatorError(f"{url!r}: the port is not a number") from None
        if not parts.hostname or not agent_port or parts.username or not parts.path.startswith("/"):
            raise OperatorError(f"{url!r}: an agent backend is agent://HOST:PORT/ABSOLUTE/PATH")
        return BackendUrl("agent", PurePosixPath(parts.path), "", parts.hostname, agent_port)
    raise OperatorError(
        f"{url!r}: a backend URL is local:///PATH, ssh://USER@HOST:PORT/PATH "
        "or agent://HOST:PORT/PATH"
    )


@dataclass(frozen=True)
class Route:
    """Where one repository lives, and what the asking user may do with it."""

    repo: str  # ACCOUNT/NAME
    vcs: Vcs
    backend: str
    backend_url: str
    path: str  # on the backend
    access: Access


def check_repo_path(path: str | None) -> str | None:
    """A repository's own path (`--path`), which must be absolute on its backend, as it is
    kept: written one way only (`canonical_path`)."""
    if path is None:
        return None
    if any(ord(c) < 32 or c == "\x7f" for c in path):  # a row that lists as two lines
        raise OperatorError(f"--path {path!r} must not hold control characters")
    if canonical_path(path) == "/":
        raise OperatorError("--path / is the whole disk, not a repository")
    if not PurePosixPath(path).is_absolute():
        raise OperatorError(f"--path {path!r} must be absolute on the backend")
    if ".." in PurePosixPath(path).parts:
        raise OperatorError(f"--path {path!r} must not go up (..)")
    return canonical_path(path)


def storage_of(url: BackendUrl) -> tuple[str, str, int]:
    """The disk a backend's paths are on, as far as its URL tells: this machine's for every
    local backend; for ssh:// and agent://, the server at the URL's host and port (another
    port may be another machine behind one address, or a container of its own)."""
    return ("local", "", 0) if url.scheme == "local" else (url.scheme, url.host.lower(), url.port)


def paths_overlap(one: str, other: str) -> bool:
    """Whether two canonical paths are one place, or one lies inside the other."""
    a, b = PurePosixPath(one), PurePosixPath(other)
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


def canonical_path(path: str) -> str:
    """One way to write an absolute path: no `.`, no `//`, no trailing `/` (two rows with
    `/srv/a.git` and `//srv/a.git/` name one repository)."""
    return "/" + posixpath.normpath(path).lstrip("/")


def default_repo_path(base: PurePosixPath, repo: str, vcs: Vcs) -> str:
    return str(base / (f"{repo}.git" if vcs is Vcs.GIT else repo))
