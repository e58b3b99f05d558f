"""A real OpenSSH sshd on 127.0.0.1, configured and run entirely inside a test's directory.

It plays a storage server: the proxy's backend key is in its authorized_keys, it accepts the
GIT_PROTOCOL and KILNPROXY_* environment, and it logs every accepted key (LogLevel VERBOSE).
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
from harness import free_port, run

SSHD = "/usr/sbin/sshd"


@dataclass
class Sshd:
    root: Path
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    extra: str = ""  # more sshd_config lines

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        self.base = self.root / "srv"
        self.base.mkdir(exist_ok=True)
        self.host_key = self.root / "ssh_host_ed25519_key"
        if not self.host_key.exists():
            run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.host_key)])
        self.authorized_keys = self.root / "authorized_keys"
        # sshd runs every command through the user's shell, and Debian's bash sources ~/.bashrc
        # when sshd starts it: root's (pyenv set up on these machines) adds ~0.3 s to each
        # storage command, which would swamp what the tests and the bench time. An empty HOME.
        self.home = self.root / "home"
        self.home.mkdir(exist_ok=True)
        self.log_path = self.root / "sshd.log"
        self.config = self.root / "sshd_config"
        self.config.write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {self.host_key}\n"
            f"PidFile {self.root / 'sshd.pid'}\nAuthorizedKeysFile {self.authorized_keys}\n"
            "PubkeyAuthentication yes\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
            "PermitRootLogin prohibit-password\nAcceptEnv GIT_PROTOCOL KILNPROXY_*\n"
            f"SetEnv HOME={self.home}\nLogLevel VERBOSE\n"
            + self.extra  # OpenSSH's default MaxSessions is 10
        )

    @property
    def url(self) -> str:
        return f"ssh://root@127.0.0.1:{self.port}{self.base}"

    def authorize(self, public_key: str) -> None:
        with self.authorized_keys.open("a") as out:
            out.write(public_key.strip() + "\n")

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [SSHD, "-D", "-e", "-f", str(self.config)],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log()
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), 1),
            ):
                return
            time.sleep(0.05)
        raise AssertionError(f"sshd did not start:\n{self.log()}")

    def stop(self) -> None:
        """Kill the listener and every connection it serves (they are its children)."""
        if self.proc is None:
            return
        with contextlib.suppress(psutil.NoSuchProcess):
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                with contextlib.suppress(psutil.NoSuchProcess):
                    child.send_signal(signal.SIGKILL)
        self.proc.kill()
        self.proc.wait(10)
        self.proc = None

    def processes(self) -> list[psutil.Process]:
        """Every process serving a connection (sshd and what it runs), not the listener."""
        if self.proc is None:
            return []
        children: list[psutil.Process] = psutil.Process(self.proc.pid).children(recursive=True)
        return children

    def serving(self, client_pid: int) -> list[psutil.Process]:
        """The processes (sshd and what it runs) serving one client process's connections."""
        ports = {
            c.laddr.port
            for c in psutil.Process(client_pid).net_connections("tcp")
            if c.raddr and c.raddr.port == self.port
        }
        found: dict[int, psutil.Process] = {}
        for process in self.processes():
            with contextlib.suppress(psutil.NoSuchProcess):
                if any(c.raddr and c.raddr.port in ports for c in process.net_connections("tcp")):
                    for p in [process, *process.children(recursive=True)]:
                        found[p.pid] = p
        return list(found.values())

    def kill_connections(self) -> int:
        """SIGKILL every per-connection sshd, as a storage server crashing would; keep listening."""
        assert self.proc is not None
        children = psutil.Process(self.proc.pid).children(recursive=True)
        for child in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.send_signal(signal.SIGKILL)
        return len(children)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def accepted(self) -> int:
        """How many connections authenticated ("Accepted publickey" lines)."""
        return self.log().count("Accepted publickey")
