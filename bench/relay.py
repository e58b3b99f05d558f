"""Raw relay throughput: a stream of zeros through each path, with no git at either end.

A `zero` sshd runs `head -c SIZE /dev/zero` whatever it is asked (ForceCommand), so what is
timed is the relay alone, not git's packing and indexing:

A: `ssh zero` directly;
B: a second kilnproxy whose local backend finds a `git` on its PATH that is that same `head`;
C: the benchmark's kilnproxy, whose repository bench/zero lives on the zero sshd as its backend;
D: an OpenSSH ForceCommand proxy in front of the zero sshd;
E: the benchmark's kilnproxy, whose repository bench/zero-agent lives on a `zero` agent (a
   second `kilnproxy agent` whose `git` on its PATH is that same `head`).

The client pipes into `wc -c`, which checks that every byte came. For B, C and E, the kilnproxy
worker's write and read syscalls during the relay are counted too (bench/measure.py io_calls):
the per-packet work that remains, as writes per MB relayed. For E, the zero agent's own CPU
(not its `head`'s) is counted apart: it runs on the storage server, not on the proxy.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent import Agent
from fixtures import Paths, forcecommand_proxy, kiln_pids, openssh_argv, server_cpu, stop_all
from harness import KILNPROXY, Kiln, run
from measure import cpu_seconds, io_calls
from sshd import Sshd

from kilnproxy.policy.access import Role

# What kilnproxy routes; the backend ignores it.
KILNPROXY_PATHS = ("B", "C", "E")
COMMANDS = {"B": "git-upload-pack 'bench/zero'", "C": "git-upload-pack 'bench/zero'",
            "E": "git-upload-pack 'bench/zero-agent'"}  # fmt: skip


@dataclass
class RawRelay:
    size: int
    source: Sshd
    front: Sshd
    local: Kiln  # B's kilnproxy
    local_key: Path
    agent: Agent  # E's storage
    paths: Paths

    def argv(self, path: str) -> list[str]:
        p = self.paths
        if path == "A":
            return [*openssh_argv(p.backend_key, p.kiln.home / "backend_known_hosts"),
                    "-p", str(self.source.port), "root@127.0.0.1", "zero"]  # fmt: skip
        if path == "D":
            return [*openssh_argv(p.client_key, p.root / "front-zero_known_hosts"),
                    "-p", str(self.front.port), "root@127.0.0.1", "zero"]  # fmt: skip
        kiln, key = (self.local, self.local_key) if path == "B" else (p.kiln, p.client_key)
        return [*kiln.ssh_argv(key), "-p", str(kiln.port), "git@127.0.0.1", COMMANDS[path]]

    def proxy_cpu(self, path: str) -> float:
        """CPU seconds used so far by the proxy of this path (none for A)."""
        proxies: dict[str, Kiln | Sshd] = {"B": self.local, "C": self.paths.kiln,
                                           "D": self.front, "E": self.paths.kiln}  # fmt: skip
        return server_cpu(proxies[path]) if path in proxies else 0.0

    def agent_cpu(self) -> float:
        """CPU seconds used so far by the zero agent's own process (not the commands it ran)."""
        assert self.agent.proc is not None
        return cpu_seconds([self.agent.proc.pid])

    def worker_syscalls(self, path: str) -> tuple[int, int]:
        """Write and read syscalls made so far by the kilnproxy workers of path B, C or E."""
        return io_calls(kiln_pids(self.local if path == "B" else self.paths.kiln)[1:])

    def once(self, path: str) -> dict[str, float]:
        """Relay `size` bytes once; wall seconds and proxy CPU seconds, for B, C and E the
        worker's write and read syscalls, and for E the agent's CPU seconds."""
        before, agent_before = self.proxy_cpu(path), self.agent_cpu()
        calls = self.worker_syscalls(path) if path in KILNPROXY_PATHS else (0, 0)
        started = time.perf_counter()
        done = subprocess.run(
            f"{shlex.join(self.argv(path))} | wc -c",
            shell=True, capture_output=True, timeout=600, check=False,
        )  # fmt: skip
        seconds = time.perf_counter() - started
        received = int(done.stdout.strip() or 0)
        if done.returncode != 0 or received != self.size:
            raise RuntimeError(f"relay {path}: {received} of {self.size} bytes: {done.stderr!r}")
        time.sleep(0.3)  # let per-connection processes exit and be counted
        figures = {"seconds": seconds, "cpu": self.proxy_cpu(path) - before}
        if path in KILNPROXY_PATHS:
            writes, reads = self.worker_syscalls(path)
            figures |= {"writes": writes - calls[0], "reads": reads - calls[1]}
        if path == "E":
            figures["agent_cpu"] = self.agent_cpu() - agent_before
        return figures

    def stop(self) -> None:
        stop_all((self.local, self.source, self.front, self.agent))


def add_raw_relay(
    paths: Paths, size: int, settings: dict[str, dict[str, Any]] | None = None
) -> RawRelay:
    """Start the zero sshd, its ForceCommand proxy, B's kilnproxy and E's zero agent; register
    bench/zero and bench/zero-agent. If any of them fails to start, those already started are
    stopped."""
    started: list[Sshd | Kiln | Agent] = []
    try:
        return _start_raw_relay(paths, size, settings or {}, started)
    except BaseException:
        stop_all(reversed(started))
        raise


def _start_raw_relay(
    paths: Paths,
    size: int,
    settings: dict[str, dict[str, Any]],
    started: list[Sshd | Kiln | Agent],
) -> RawRelay:
    root = paths.root
    public = paths.backend_key.with_suffix(".pub").read_text()
    source = Sshd(root / "zero", extra=f"ForceCommand head -c {size} /dev/zero\nMaxSessions 64\n")
    source.authorize(public)
    source.start()
    started.append(source)
    admin = [*KILNPROXY, "--config", str(paths.kiln.config_path)]
    env = paths.kiln.server_env()
    run([*admin, "backends", "add", "zero", source.url], env=env)
    run([*admin, "backends", "trust", "zero"], env=env)
    run([*admin, "repos", "add", "bench/zero", "--vcs", "git", "--backend", "zero"], env=env)
    front = forcecommand_proxy(root, source, paths.client_key, paths.backend_key,
                               paths.kiln.home, name="front-zero")  # fmt: skip
    started.append(front)

    fake = root / "zero-bin"
    fake.mkdir()
    (fake / "git").write_text(f"#!/bin/sh\nexec head -c {size} /dev/zero\n")
    (fake / "git").chmod(0o755)
    local = Kiln(root / "kiln-zero", {"workers": {"count": 1}} | settings)
    local_key = local.add_user("bench", "dev", Role.WRITE)
    run([*KILNPROXY, "--config", str(local.config_path), "repos", "add", "bench/zero",
         "--vcs", "git", "--backend", "local", "--path", str(source.base)],
        env=local.server_env())  # fmt: skip
    fake_path = {"PATH": f"{fake}{os.pathsep}{os.environ['PATH']}"}
    local.start(env=fake_path)
    started.append(local)

    agent = Agent(root / "agent-zero", paths.pki, env=fake_path)
    agent.start()
    started.append(agent)
    (agent.base / "zero").mkdir()
    run([*admin, "backends", "add", "zero-agent", agent.url], env=env)
    run([*admin, "repos", "add", "bench/zero-agent", "--vcs", "git", "--backend", "zero-agent",
         "--path", str(agent.base / "zero")], env=env)  # fmt: skip
    return RawRelay(size, source, front, local, local_key, agent, paths)
