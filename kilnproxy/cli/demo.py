"""The demo of `make run` (SPEC 10): account `demo`, a user with keys, two repositories.

Idempotent: running it again keeps what exists. Returns the lines to print, which include clone
commands that work exactly as printed from another shell.
"""

from __future__ import annotations

import contextlib
import shlex
from pathlib import Path

import asyncssh

from kilnproxy.cli.admin import init_repository, replace_file, run_tool
from kilnproxy.config import Config
from kilnproxy.directory import DirectoryStore, directory_for
from kilnproxy.directory.model import default_repo_path, parse_backend_url
from kilnproxy.errors import OperatorError
from kilnproxy.policy.access import Role
from kilnproxy.policy.commands import Vcs
from kilnproxy.ssh.keys import parse_public_key, write_new_key
from kilnproxy.ssh.server import ensure_host_keys, serving_options

ACCOUNT = "demo"
USER = "demo"
README = b"# Hello from kilnproxy\n\nThis repository was seeded by `make run`.\n"
AUTHOR = "kilnproxy demo <demo@example.com>"


def seed(config: Config) -> list[str]:
    ensure_host_keys(config.ssh.host_keys)
    serving_options(config)  # what no worker could serve with is said before anything is seeded
    directory = directory_for(config)
    try:
        _ensure_user(directory)
        key_path = _ensure_keys(directory, config.home)
        for repo, vcs in ((f"{ACCOUNT}/hello", Vcs.GIT), (f"{ACCOUNT}/hello-hg", Vcs.HG)):
            _ensure_repo(directory, repo, vcs)
    finally:
        directory.close()
    known_hosts = _write_known_hosts(config)
    return _instructions(config, key_path, known_hosts)


def _ensure_user(directory: DirectoryStore) -> None:
    """Add the demo account and user unless a previous run did."""
    with contextlib.suppress(OperatorError):  # already there
        directory.add_account(ACCOUNT)
    with contextlib.suppress(OperatorError):
        directory.add_user(ACCOUNT, USER, Role.ADMIN)


def _ensure_keys(directory: DirectoryStore, home: Path) -> Path:
    """The user's own ~/.ssh keys, and a generated key that the printed commands use."""
    key_path = home / "demo_id_ed25519"
    if not key_path.exists():
        write_new_key(key_path, "kilnproxy demo")
    candidates = [(key_path.with_name(key_path.name + ".pub"), "demo key")]
    ssh_dir = Path.home() / ".ssh"
    candidates += [(p, f"{p.name} from ~/.ssh") for p in sorted(ssh_dir.glob("id_*.pub"))]
    known = {k.fingerprint for k in directory.list_keys()}
    for pub, name in candidates:
        try:
            public = parse_public_key(pub.read_text())
        except (OperatorError, OSError, UnicodeDecodeError):
            continue  # e.g. a dsa key in ~/.ssh: not accepted, and not the demo's business
        if public.fingerprint not in known:
            directory.add_key(ACCOUNT, USER, name, public)
    return key_path


def _ensure_repo(directory: DirectoryStore, repo: str, vcs: Vcs) -> None:
    if any(r.repo == repo for r in directory.list_repos(ACCOUNT)):
        return
    base = parse_backend_url(directory.backend_url("local")).base
    path = Path(default_repo_path(base, repo, vcs))
    if not path.exists():
        init_repository(path, vcs)
        _first_commit(path, vcs)
    directory.add_repo(repo, vcs, "local", None)


def _first_commit(path: Path, vcs: Vcs) -> None:
    if vcs is Vcs.HG:
        (path / "README.md").write_bytes(README)
        run_tool(["hg", "-R", str(path), "add", str(path / "README.md")])
        run_tool(["hg", "-R", str(path), "commit", "-u", AUTHOR, "-m", "First commit"])
        return
    git = ["git", "--git-dir", str(path)]
    name, _, email = AUTHOR.partition(" <")
    identity = {"GIT_AUTHOR_NAME": name, "GIT_AUTHOR_EMAIL": email.rstrip(">")}
    identity |= {"GIT_COMMITTER_NAME": name, "GIT_COMMITTER_EMAIL": email.rstrip(">")}
    blob = run_tool([*git, "hash-object", "-w", "--stdin"], stdin=README).decode().strip()
    tree = run_tool([*git, "mktree"], stdin=f"100644 blob {blob}\tREADME.md\n".encode())
    commit = run_tool(
        [*git, "commit-tree", tree.decode().strip(), "-m", "First commit"], env=identity
    )
    run_tool([*git, "update-ref", "refs/heads/main", commit.decode().strip()])


def _write_known_hosts(config: Config) -> Path:
    path = config.home / "demo_known_hosts"
    lines = []
    for host_key in config.ssh.host_keys:
        public = asyncssh.read_private_key(host_key).export_public_key().decode().split()
        for address in config.ssh.listen:
            lines.append(f"[{address.host}]:{address.port} {public[0]} {public[1]}\n")
    replace_file(path, "".join(lines), 0o600)
    return path


def _instructions(config: Config, key_path: Path, known_hosts: Path) -> list[str]:
    address = config.ssh.listen[0]
    host = f"[{address.host}]" if ":" in address.host else address.host
    ssh = (
        f"ssh -i {shlex.quote(str(key_path))} -o IdentitiesOnly=yes "
        f"-o UserKnownHostsFile={shlex.quote(str(known_hosts))}"
    )
    base = f"ssh://git@{host}:{address.port}"
    return [
        "Demo ready: account demo, user demo, repositories demo/hello (git), demo/hello-hg (hg).",
        "Clone them from another shell:",
        f"  GIT_SSH_COMMAND={shlex.quote(ssh)} git clone {base}/demo/hello.git",
        f"  hg clone -e {shlex.quote(ssh)} {base}/demo/hello-hg",
        f"Dashboard: http://{config.status.http}/ (also: kilnproxy status, kilnproxy connections)",
    ]
