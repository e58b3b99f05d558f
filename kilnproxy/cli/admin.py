"""The admin commands of SPEC 2: each writes to the directory and says what it did.

Functions here take parsed arguments and return the lines to print; bad input raises
OperatorError (one line, exit status 2). Repository creation for `--init` lives here too.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from kilnproxy.directory import DirectoryStore
from kilnproxy.directory.model import (
    PublicKey,
    check_name,
    check_repo_path,
    parse_backend_url,
)
from kilnproxy.errors import BadCommand, OperatorError
from kilnproxy.policy.access import Access, Role
from kilnproxy.policy.commands import Vcs, repo_name

INIT_TIMEOUT = 60


def split_owner(text: str) -> tuple[str, str]:
    account, sep, user = text.partition("/")
    if not sep or not account or not user:
        raise OperatorError(f"{text!r} is not ACCOUNT/USER")
    return check_name("account", account), check_name("user", user)


def check_repo(text: str, vcs: Vcs | None = None) -> str:
    """`ACCOUNT/NAME` exactly as clients will normalise it."""
    try:
        name = repo_name(text, vcs or Vcs.HG)
    except BadCommand:
        name = ""
    if name != text:
        raise OperatorError(f"{text!r} is not a repository name like ACCOUNT/NAME")
    return name


def add_account(directory: DirectoryStore, account: str) -> list[str]:
    directory.add_account(account)
    return [f"added account {account}"]


def add_user(directory: DirectoryStore, account: str, user: str, role: str) -> list[str]:
    directory.add_user(account, user, Role(role))
    return [f"added user {account}/{user} with role {role}"]


MAX_KEY_TEXT = 64 << 10  # an RSA key of 16384 bits, OpenSSH's largest, is under 3 KiB


def read_public_key(source: str | None) -> PublicKey:
    """The key of `keys add`, from a file or standard input (`-`). Read before the directory
    is opened: a key pasted by hand takes its time, which is not the directory's."""
    if source is None or source == "-":
        if sys.stdin is None:  # started with standard input closed
            raise OperatorError("standard input is closed: give the key with --file")
        try:
            text = sys.stdin.read(MAX_KEY_TEXT + 1)
        except (OSError, UnicodeDecodeError) as exc:
            raise OperatorError(f"cannot read standard input: {exc}") from None
    else:
        try:
            with Path(source).open("rb") as file:
                text = file.read(MAX_KEY_TEXT + 1).decode()
        except (OSError, UnicodeDecodeError) as exc:
            raise OperatorError(f"cannot read {source}: {exc}") from None
    if len(text) > MAX_KEY_TEXT:
        raise OperatorError(f"{source or 'standard input'}: over {MAX_KEY_TEXT >> 10} KiB, "
                            "which is no public key")  # fmt: skip
    # Here, not at the top: asyncssh takes longer to import (0.15 s) than most commands run.
    from kilnproxy.ssh.keys import parse_public_key

    return parse_public_key(text)


def add_key(directory: DirectoryStore, owner: str, name: str, key: PublicKey) -> list[str]:
    account, user = split_owner(owner)
    directory.add_key(account, user, name, key)
    return [f"added key {name!r} for {account}/{user}", key.fingerprint]


def list_keys(directory: DirectoryStore, owner: str | None) -> list[str]:
    account = user = None
    if owner:
        account, _, user_part = owner.partition("/")
        check_name("account", account)
        user = check_name("user", user_part) if user_part else None
    rows = directory.list_keys(account, user)
    return [f"{r.fingerprint}  {r.account}/{r.user}  {r.algorithm}  {r.name}" for r in rows]


def remove_key(directory: DirectoryStore, fingerprint: str) -> list[str]:
    row = directory.remove_key(fingerprint)
    return [f"removed key {row.name!r} ({row.fingerprint}) of {row.account}/{row.user}"]


def add_backend(directory: DirectoryStore, name: str, url: str) -> list[str]:
    directory.add_backend(name, url)
    return [f"added backend {name} at {url}"]


def list_backends(directory: DirectoryStore) -> list[str]:
    return [f"{name}  {url}" for name, url in directory.list_backends()]


def add_repo(
    directory: DirectoryStore, repo: str, vcs: str, backend: str, path: str | None, init: bool
) -> list[str]:
    kind = Vcs(vcs)
    check_repo(repo, kind)
    path = check_repo_path(path)
    url = parse_backend_url(directory.backend_url(backend))
    if any(row.repo == repo for row in directory.list_repos(repo.split("/", maxsplit=1)[0])):
        raise OperatorError(f"repository {repo} already exists")
    if not init:
        row = directory.add_repo(repo, kind, backend, path)
        return [f"added repository {row.repo} ({vcs}) on backend {row.backend} at {row.path}"]
    if url.scheme != "local":
        raise OperatorError("--init creates repositories on local backends only")
    row_path = Path(directory.check_place(repo, kind, backend, path))  # before anything is made
    with new_repository(row_path, kind):  # in place, then its row; gone if the row fails
        row = directory.add_repo(repo, kind, backend, path)
    return [
        f"added repository {row.repo} ({vcs}) on backend {row.backend} at {row.path}",
        f"created empty {vcs} repository at {row_path}",
    ]


def list_repos(directory: DirectoryStore, account: str | None) -> list[str]:
    return [
        f"{r.repo}  {r.vcs.value}  {r.backend}  {r.path}" for r in directory.list_repos(account)
    ]


def grant(directory: DirectoryStore, owner: str, repo: str, access: str) -> list[str]:
    account, user = split_owner(owner)
    directory.grant(account, user, check_repo(repo), Access[access.upper()])
    return [f"granted {access} on {repo} to {account}/{user}"]


def replace_file(path: Path, text: str, mode: int = 0o644) -> None:
    """`path` holds `text`: written beside it, then renamed over it, so that a reader (a worker
    verifying a backend's host key) finds the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.",
                                     delete=False) as out:  # fmt: skip
        try:
            out.write(text)
            os.fchmod(out.fileno(), mode)
        except BaseException:
            os.unlink(out.name)
            raise
    try:
        os.replace(out.name, path)
    except BaseException:  # `path` is a directory, say: the copy is not left beside it
        os.unlink(out.name)
        raise


@contextlib.contextmanager
def new_repository(path: Path, vcs: Vcs) -> Iterator[None]:
    """An empty repository at `path` while the body (which writes its directory row) runs; if
    anything fails (`git init`, the rename, the body), nothing is left on disk, so the same
    command can simply be run again. It is made beside `path` and renamed into place before the
    body, so that no row is ever written for a repository that is not there."""
    if os.path.lexists(path):  # a symlink too, dangling or not
        raise OperatorError(f"{path} already exists")
    made = next((p for p in reversed(path.parents) if not os.path.lexists(p)), None)  # ours
    scratch = path.with_name(f".{path.name}.{secrets.token_hex(4)}")  # made by `init`, umask's mode
    in_place = False
    try:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            init_repository(scratch, vcs)
            scratch.rename(path)
        except OSError as exc:
            raise OperatorError(f"cannot create {path}: {exc.strerror or exc}") from None
        in_place = True
        yield
    except BaseException:
        shutil.rmtree(made or (path if in_place else scratch), ignore_errors=True)
        raise


def init_repository(path: Path, vcs: Vcs) -> None:
    """An empty repository in `path` (an empty directory, or none)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if vcs is Vcs.GIT:
        argv = ["git", "init", "--quiet", "--bare", "--initial-branch=main", str(path)]
    else:
        argv = ["hg", "init", str(path)]
    run_tool(argv)


def run_tool(
    argv: list[str], stdin: bytes | None = None, env: dict[str, str] | None = None
) -> bytes:
    """Run git or hg for an admin command; a failure is one clear line."""
    full_env = {**os.environ, **env} if env else None
    try:
        done = subprocess.run(
            argv, input=stdin, env=full_env, capture_output=True, timeout=INIT_TIMEOUT, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise OperatorError(f"{argv[0]} failed: {exc}") from None
    if done.returncode != 0:
        detail = done.stderr.decode(errors="replace").strip().splitlines()
        raise OperatorError(f"{' '.join(argv[:2])} failed: {detail[-1] if detail else '?'}")
    return done.stdout
