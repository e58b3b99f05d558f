"""A real `kilnproxy agent` on 127.0.0.1, run inside a test's directory, with its own CA.

It plays a storage server for agent:// backends, as `sshd.Sshd` does for ssh:// ones, with the
same methods where the two mean the same (start, stop, processes, serving, kill_connections),
so that a test of "the storage" runs against either. `Pki` makes the CAs and certificates;
`read_frames` takes bytes read by hand as the agent backend's connection takes them.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
from harness import KILNPROXY, free_port, wait_for_line

from kilnproxy.backends.frames import HEADER, MAX_PAYLOAD, Frame, FrameReader
from kilnproxy.cli.pki import init_ca, issue


def read_frames(reader: FrameReader, data: bytes) -> list[Frame]:
    """`data` into `reader` as a BufferedProtocol's transport puts it: into `get_buffer`'s
    room, as much as fits, then `buffer_updated`."""
    frames: list[Frame] = []
    view = memoryview(data)
    while view:
        room = reader.get_buffer()
        assert len(room) >= HEADER.size + MAX_PAYLOAD  # a whole frame always fits
        count = min(len(room), len(view))
        room[:count] = view[:count]
        frames += reader.buffer_updated(count)
        view = view[count:]
    return frames


@dataclass
class Pki:
    """A CA in `root`, and certificates it issues (each once: OUT.pem and OUT.key)."""

    root: Path

    def __post_init__(self) -> None:
        if not (self.root / "ca.pem").exists():
            init_ca(self.root, f"test CA {self.root.name}")

    @property
    def ca(self) -> Path:
        return self.root / "ca.pem"

    def issue(self, kind: str, name: str, *more: str) -> tuple[Path, Path]:
        out = self.root / f"{kind}-{name}"
        if not out.with_name(out.name + ".pem").exists():
            issue(self.root, kind, [name, *more], out, 30)
        return out.with_name(out.name + ".pem"), out.with_name(out.name + ".key")

    def proxy_settings(self, agents: Pki | None = None) -> dict[str, str]:
        """[backend_agent] for a proxy whose certificate this CA signs, trusting the agents
        that `agents` (by default this CA) signs."""
        cert, key = self.issue("proxy", "proxy")
        return {"ca": str((agents or self).ca), "cert": str(cert), "key": str(key)}


@dataclass
class Agent:
    root: Path
    pki: Pki  # signs this agent's certificate
    proxies: Pki | None = None  # signs the proxies' certificates (default: `pki`)
    name: str = "127.0.0.1"  # the name in its certificate
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    env: dict[str, str] | None = None
    settings: str = ""  # more [agent] lines

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        self.base = self.root / "srv"
        self.base.mkdir(exist_ok=True)
        self.log_path = self.root / "agent.log"
        cert, key = self.cert, self.key = self.pki.issue("agent", self.name)
        self.config = self.root / "agent.toml"
        self.config.write_text(
            f'[agent]\nlisten = ["127.0.0.1:{self.port}"]\nbase = "{self.base}"\n'
            f'ca = "{(self.proxies or self.pki).ca}"\ncert = "{cert}"\nkey = "{key}"\n'
            f"{self.settings}"
            '[timeouts]\ndial = "2s"\ndrain = "5s"\n'
        )

    @property
    def url(self) -> str:
        return f"agent://127.0.0.1:{self.port}{self.base}"

    def start(self) -> None:
        env = {**(self.env or {}), "KILNPROXY_HOME": str(self.root / "home")}
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [*KILNPROXY, "agent", "--config", str(self.config)],
                env={**os.environ, **env}, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        deadline = time.monotonic() + 20
        started = self.log().count("agent listening on")
        while self.log().count("agent listening on") == started:
            assert self.proc.poll() is None, self.log()
            assert time.monotonic() < deadline, f"agent did not start:\n{self.log()}"
            time.sleep(0.05)

    def stop(self) -> None:
        """Kill the agent and every command it runs, as a storage server crashing would."""
        if self.proc is None:
            return
        self.kill()
        self.proc = None

    def kill(self) -> int:
        assert self.proc is not None
        commands = self.processes()
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGKILL)
        for command in commands:
            with contextlib.suppress(psutil.NoSuchProcess):
                command.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        return 1 + len(commands)

    def kill_connections(self) -> int:
        """The agent dies with every command it runs, and is back at once on the same port."""
        killed = self.kill()
        self.start()
        return killed

    def processes(self) -> list[psutil.Process]:
        """The commands the agent runs (and what they started)."""
        if self.proc is None:
            return []
        with contextlib.suppress(psutil.NoSuchProcess):
            children: list[psutil.Process] = psutil.Process(self.proc.pid).children(True)
            return children
        return []

    def serving(self, client_pid: int) -> list[psutil.Process]:
        """What serves a worker's connections: the agent itself (one process for all)."""
        return [psutil.Process(self.proc.pid)] if self.proc is not None else []

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_for_log(self, pattern: str, timeout: float = 10) -> re.Match[str]:
        return wait_for_line(self.log, pattern, timeout)
