"""What the benchmarks compare, set up from scratch on 127.0.0.1 every time.

A: a storage server (OpenSSH sshd) cloned from directly, the physical limit.
B: kilnproxy with the local backend serving the same repository directory.
C: kilnproxy with that sshd as its ssh:// backend.
D: the proxy an operator would build instead: an sshd whose ForceCommand runs
   `ssh storage "$SSH_ORIGINAL_COMMAND"`.
E: the same kilnproxy (its one worker, C's settings) with a `kilnproxy agent` as its agent://
   backend: a second storage server on this machine, whose base directory holds the same
   repositories (hard links to the sshd's files: the same bytes, the same page cache). The CA
   and the certificates are made in the run's directory (tests/agent.py Pki).
Repositories are generated deterministically (seeded bytes, fixed dates) with fast-import.
"""

from __future__ import annotations

import random
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from agent import Agent, Pki
from harness import KILNPROXY, Kiln, run
from history import Shape, history_repo
from measure import cpu_seconds
from sshd import Sshd

from kilnproxy.policy.access import Role

SEED = 20261128
EPOCH = 1_700_000_000


def git_repo(path: Path, commits: int, files: int, blob_size: int) -> int:
    """A bare git repository whose history is `commits` commits, each rewriting one file with
    incompressible bytes; returns the size of its pack."""
    run(["git", "init", "-q", "--bare", "--initial-branch=main", str(path)])
    rng = random.Random(SEED)
    importer = subprocess.Popen(["git", "--git-dir", str(path), "fast-import", "--quiet"],
                                stdin=subprocess.PIPE)  # fmt: skip
    assert importer.stdin is not None
    for n in range(1, commits + 1):
        data = rng.randbytes(blob_size)
        message = f"change {n}\n".encode()
        parent = f"from :{2 * (n - 1)}\n".encode() if n > 1 else b""
        importer.stdin.write(b"blob\nmark :%d\ndata %d\n%s\n" % (2 * n - 1, len(data), data))
        importer.stdin.write(
            b"commit refs/heads/main\nmark :%d\ncommitter Bench <bench@example.com> %d +0000\n"
            b"data %d\n%s%sM 100644 :%d src/%03d/blob.bin\n\n"
            % (2 * n, EPOCH + n, len(message), message, parent, 2 * n - 1, n % files)
        )
    importer.stdin.close()
    assert importer.wait(timeout=600) == 0
    return sum(p.stat().st_size for p in path.glob("objects/pack/*.pack"))


def hg_repo(path: Path, commits: int) -> None:
    run(["hg", "init", str(path)])
    run(["hg", "-R", str(path), "debugbuilddag", "--new-file", f"+{commits}"])
    run(["hg", "-R", str(path), "update", "-q", "null"])


class Server(Protocol):
    def stop(self) -> object: ...


def stop_all(servers: Iterable[Server | None]) -> None:
    """Stop every server, even when one fails to stop (one that had already exited by itself
    raises in tests/harness.py); then raise the first failure."""
    failures: list[Exception] = []
    for server in servers:
        if server is None:
            continue
        try:
            server.stop()
        except (AssertionError, OSError) as failure:
            failures.append(failure)
    if failures:
        raise failures[0]


@dataclass
class Paths:
    """The five ways to the same repositories, and how a client takes each."""

    root: Path
    storage: Sshd
    front: Sshd
    kiln: Kiln
    client_key: Path
    backend_key: Path
    pki: Pki
    agent: Agent  # E's storage server

    def stop(self) -> None:
        stop_all((self.kiln, self.storage, self.front, self.agent))

    def ssh(self, path: str) -> str:
        """The ssh command a client uses on this path."""
        if path == "A":
            key, known = self.backend_key, self.kiln.home / "backend_known_hosts"
        elif path == "D":
            key, known = self.client_key, self.root / "front_known_hosts"
        else:
            return " ".join(self.kiln.ssh_argv(self.client_key))
        return " ".join(openssh_argv(key, known))

    def env(self, path: str) -> dict[str, str]:
        return self.kiln.client_env(self.client_key) | {"GIT_SSH_COMMAND": self.ssh(path)}

    def clone_argv(self, path: str, name: str, vcs: str) -> list[str]:
        if vcs == "hg":
            return ["hg", "clone", "-q", "-U", "-e", self.ssh(path), self.url(path, name, vcs)]
        return ["git", "clone", "-q", "--bare", self.url(path, name, vcs)]

    def url(self, path: str, name: str, vcs: str = "git") -> str:
        suffix = ".git" if vcs == "git" else ""
        # hg reads ssh://host/PATH as relative to the home directory: absolute is //PATH.
        disk = f"{'/' if vcs == 'hg' else ''}{self.storage.base}/bench/{name}{suffix}"
        if path == "A":
            return f"ssh://root@127.0.0.1:{self.storage.port}{disk}"
        if path == "D":
            return f"ssh://root@127.0.0.1:{self.front.port}{disk}"
        suffixes = {"B": "-local", "C": "", "E": "-agent"}
        return self.kiln.url(f"bench/{name}{suffixes[path]}")


def openssh_argv(key: Path, known_hosts: Path) -> list[str]:
    """OpenSSH's client with this key and these host keys only, never asking anything."""
    return ["ssh", "-F", "/dev/null", "-i", str(key), "-o", "IdentitiesOnly=yes",
            "-o", "BatchMode=yes", "-o", f"UserKnownHostsFile={known_hosts}"]  # fmt: skip


def kiln_pids(kiln: Kiln) -> list[int]:
    """The proxy's own processes (master and workers; not the git and hg they run)."""
    assert kiln.proc is not None
    return [kiln.proc.pid, *(int(w["pid"]) for w in kiln.workers())]


def server_cpu(server: Kiln | Sshd) -> float:
    """CPU seconds a server has used so far: kilnproxy's master and workers; an sshd's listener
    and the per-connection processes it has reaped (a connection counts once it has ended)."""
    if isinstance(server, Kiln):
        return cpu_seconds(kiln_pids(server))
    assert server.proc is not None
    return cpu_seconds([server.proc.pid], children=True)


def kiln_settings(ciphers: str | None, window: str | None) -> dict[str, dict[str, Any]]:
    """A variant's kilnproxy settings: offered ciphers (comma-separated), backend window."""
    settings: dict[str, dict[str, Any]] = {}
    if ciphers:
        settings["ssh"] = {"encryption_algs": ciphers.split(",")}
    if window:
        settings["backend_ssh"] = {"window": window}
    return settings


def build(root: Path, settings: dict[str, dict[str, Any]] | None = None) -> Paths:
    pki = Pki(root / "pki")
    defaults: dict[str, dict[str, Any]] = {"workers": {"count": 1}, "ssh": {"backlog": 4096},
                                           "backend_agent": pki.proxy_settings()}  # fmt: skip
    for section, values in (settings or {}).items():  # a variant's keys, section by section
        defaults[section] = defaults.get(section, {}) | values
    kiln = Kiln(root / "kiln", defaults)
    client_key = kiln.add_user("bench", "dev", Role.WRITE)
    kiln.start()
    public = run([*KILNPROXY, "backends", "key", "--config", str(kiln.config_path)],
                 env=kiln.server_env()).stdout.decode().splitlines()[-1]  # fmt: skip
    backend_key = kiln.home / "backend_id_ed25519"
    storage = Sshd(root / "storage", extra="MaxStartups 2000\nMaxSessions 64\n")
    storage.authorize(public)
    storage.start()
    admin = [*KILNPROXY, "--config", str(kiln.config_path)]
    run([*admin, "backends", "add", "storage", storage.url], env=kiln.server_env())
    run([*admin, "backends", "trust", "storage"], env=kiln.server_env())
    front = forcecommand_proxy(root, storage, client_key, backend_key, kiln.home)
    agent = Agent(root / "agent", pki)
    agent.start()
    run([*admin, "backends", "add", "agent", agent.url], env=kiln.server_env())
    return Paths(root, storage, front, kiln, client_key, backend_key, pki, agent)


def forcecommand_proxy(root: Path, storage: Sshd, client_key: Path, backend_key: Path,
                       home: Path, name: str = "front") -> Sshd:  # fmt: skip
    """D: an sshd that relays every command to the storage server with OpenSSH's own client.
    Its host key is in `root/<name>_known_hosts`."""
    relay = " ".join([*openssh_argv(backend_key, home / "backend_known_hosts"),
                      "-o", "SendEnv=GIT_PROTOCOL", "-p", str(storage.port), "root@127.0.0.1",
                      '"$SSH_ORIGINAL_COMMAND"'])  # fmt: skip
    front = Sshd(root / name, extra=f"ForceCommand {relay}\nMaxStartups 2000\n")
    front.authorize(Path(f"{client_key}.pub").read_text())
    front.start()
    write_known_hosts(front, root / f"{name}_known_hosts")
    return front


def plain_sshd(root: Path, key: Path) -> Sshd:
    """An sshd serving nothing but the connections made to it, for what sshd spends per
    connection (the storage sshd also reaps kilnproxy's pooled connections when they idle out,
    and their CPU would count). Its host key is in `root/plain_known_hosts`."""
    sshd = Sshd(root / "plain", extra="MaxStartups 2000\n")
    sshd.authorize(Path(f"{key}.pub").read_text())
    sshd.start()
    write_known_hosts(sshd, root / "plain_known_hosts")
    return sshd


def write_known_hosts(sshd: Sshd, path: Path) -> None:
    host_key = sshd.host_key.with_suffix(".pub").read_text().split()
    path.write_text(f"[127.0.0.1]:{sshd.port} {host_key[0]} {host_key[1]}\n")


def register(paths: Paths, name: str, vcs: str) -> None:
    """bench/NAME on the ssh backend (C) and bench/NAME-local on the local backend (B), both
    the one repository on the storage server's disk; bench/NAME-agent on the agent backend (E),
    its hard-linked copy in the agent's base."""
    admin = [*KILNPROXY, "--config", str(paths.kiln.config_path)]
    env = paths.kiln.server_env()
    relative = Path("bench") / (f"{name}.git" if vcs == "git" else name)
    disk, copy = paths.storage.base / relative, paths.agent.base / relative
    copy.parent.mkdir(parents=True, exist_ok=True)
    run(["cp", "-al", str(disk), str(copy)])
    run([*admin, "repos", "add", f"bench/{name}", "--vcs", vcs, "--backend", "storage"], env=env)
    run([*admin, "repos", "add", f"bench/{name}-local", "--vcs", vcs, "--backend", "local",
         "--path", str(disk)], env=env)  # fmt: skip
    run([*admin, "repos", "add", f"bench/{name}-agent", "--vcs", vcs, "--backend", "agent",
         "--path", str(copy)], env=env)  # fmt: skip


def add_small(paths: Paths) -> int:
    """About 1.5 MB: 60 commits over 20 files."""
    (paths.storage.base / "bench").mkdir(parents=True, exist_ok=True)
    size = git_repo(paths.storage.base / "bench" / "small.git", 60, 20, 25_000)
    register(paths, "small", "git")
    return size


def add_repositories(
    paths: Paths, large_commits: int, large_blob: int, hg_commits: int, history_commits: int
) -> dict[str, int]:
    """small, large (`large_commits` x `large_blob`: its cost is bytes), history
    (`history_commits` small source edits: its cost is objects) and an hg repository."""
    base = paths.storage.base / "bench"
    sizes = {"small": add_small(paths)}
    sizes["large"] = git_repo(base / "large.git", large_commits, 400, large_blob)
    register(paths, "large", "git")
    sizes["history"] = history_repo(base / "history.git", Shape(history_commits))
    register(paths, "history", "git")
    hg_repo(base / "designs", hg_commits)
    register(paths, "designs", "hg")
    return sizes
