"""Every SSH client family git can use, each set up with its own defaults for git's
GIT_SSH_COMMAND: the knowledge tests/integration/test_client_families.py (clone and push) and
bench/per_client.py (proxy CPU per GB) share.

Clients come from Debian (OpenSSH, PuTTY's plink, Dropbear's dbclient, Go's x/crypto/ssh built
with Debian's Go) and PyPI (paramiko current and 3.4, libssh2 1.11 in ssh2-python's wheel), each
installed by `make deps` or `make venv`; `unavailable` says which one is missing here, and why.
The cipher a connection negotiated is read from kilnproxy's access log (`ciphers_of`).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from harness import Kiln, run

TESTS = Path(__file__).resolve().parent
PARAMIKO_OLD = Path(sys.prefix) / "paramiko-3.4"  # made by `make venv`
GO_CRYPTO = Path("/usr/share/gocode/src/golang.org/x/crypto/ssh")  # Debian's x/crypto
AUTHENTICATED = re.compile(
    r"authenticated \S+ as \S+ .* over (?P<cipher>\S+(?: \(to client \S+\))?) "
    r"from client '(?P<client>SSH-2\.0-[^']*)'"
)

Setup = Callable[[Kiln, Path, Path], dict[str, str]]


def openssh(kiln: Kiln, key: Path, tmp: Path) -> dict[str, str]:
    return kiln.client_env(key)


def plink(kiln: Kiln, key: Path, tmp: Path) -> dict[str, str]:
    """PuTTY's plink: its own key format, and the host key given by its fingerprint."""
    ppk = tmp / "key.ppk"
    run(["puttygen", str(key), "-O", "private", "-o", str(ppk)])
    host_key = kiln.home / "ssh_host_ed25519_key.pub"
    fingerprint = run(["ssh-keygen", "-lf", str(host_key)]).stdout.split()[1].decode()
    command = f"plink -batch -noagent -hostkey {fingerprint} -i {ppk}"
    return kiln.client_env(key) | {"GIT_SSH_COMMAND": command, "GIT_SSH_VARIANT": "plink"}


def dbclient(kiln: Kiln, key: Path, tmp: Path) -> dict[str, str]:
    """Dropbear's client: its own key format, and known_hosts in its HOME (host, no port)."""
    key_db = tmp / "key.dropbear"
    run(["dropbearconvert", "openssh", "dropbear", str(key), str(key_db)])
    home = tmp / "home"
    (home / ".ssh").mkdir(parents=True)
    kind, blob = (kiln.home / "ssh_host_ed25519_key.pub").read_text().split()[:2]
    (home / ".ssh" / "known_hosts").write_text(f"127.0.0.1 {kind} {blob}\n")
    (home / ".gitconfig").write_text((kiln.client_home / ".gitconfig").read_text())
    return kiln.client_env(key) | {
        "HOME": str(home), "GIT_SSH_COMMAND": f"dbclient -i {key_db}", "GIT_SSH_VARIANT": "ssh",
    }  # fmt: skip


def go(kiln: Kiln, key: Path, tmp: Path) -> dict[str, str]:
    """tests/go_ssh on Go's x/crypto/ssh, built with Debian's Go and x/crypto (no download)."""
    binary = tmp / "go_ssh"
    env = {"PATH": os.environ["PATH"], "GO111MODULE": "off", "GOPATH": "/usr/share/gocode",
           "GOCACHE": str(tmp / "go-cache")}  # fmt: skip
    run(["go", "build", "-o", str(binary), "."], cwd=TESTS / "go_ssh", env=env)
    command = f"{binary} -i {key} -k {kiln.known_hosts}"
    return kiln.client_env(key) | {"GIT_SSH_COMMAND": command, "GIT_SSH_VARIANT": "ssh"}


def library(name: str, path: Path | None = None) -> Setup:
    """tests/library_ssh.py over `name`, imported from `path` first if given."""

    def setup(kiln: Kiln, key: Path, tmp: Path) -> dict[str, str]:
        command = (f"{sys.executable} {TESTS / 'library_ssh.py'} --library {name} "
                   f"--key {key} --known-hosts {kiln.known_hosts}")  # fmt: skip
        env = kiln.client_env(key) | {"GIT_SSH_COMMAND": command, "GIT_SSH_VARIANT": "ssh"}
        return env | ({"PYTHONPATH": str(path)} if path else {})

    return setup


@dataclass(frozen=True)
class Family:
    setup: Setup
    client: str  # what its SSH version line starts with
    cipher: str  # what kilnproxy's offer leaves it with
    tools: tuple[str, ...] = ()  # commands it needs on PATH
    needs: Path | None = None  # a directory it needs
    module: str | None = None  # a Python module it needs (tests/library_ssh.py's library)


FAMILIES = {
    "openssh": Family(openssh, "SSH-2.0-OpenSSH_9.2", "aes128-gcm@openssh.com", ("ssh",)),
    "plink": Family(
        plink, "SSH-2.0-PuTTY_Release_0.78", "aes128-gcm@openssh.com", ("plink", "puttygen")
    ),
    # No AES-GCM in Dropbear 2022.83, nor in paramiko before 3.5.
    "dbclient": Family(
        dbclient,
        "SSH-2.0-dropbear_2022.83",
        "chacha20-poly1305@openssh.com",
        ("dbclient", "dropbearconvert"),
    ),
    "paramiko": Family(
        library("paramiko"), "SSH-2.0-paramiko_5.1.0", "aes128-gcm@openssh.com", module="paramiko"
    ),
    "paramiko-3.4": Family(
        library("paramiko", PARAMIKO_OLD),
        "SSH-2.0-paramiko_3.4.1",
        "aes128-ctr+hmac-sha2-256-etm@openssh.com",
        needs=PARAMIKO_OLD / "paramiko",
    ),
    "libssh2": Family(
        library("libssh2"), "SSH-2.0-libssh2_1.11.1", "aes256-gcm@openssh.com", module="ssh2"
    ),
    "go": Family(go, "SSH-2.0-Go", "aes128-gcm@openssh.com", ("go",), needs=GO_CRYPTO),
}


def unavailable(name: str) -> str | None:
    """Why family `name`'s client cannot run on this machine, or None if it can."""
    family = FAMILIES[name]
    missing = [tool for tool in family.tools if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} not on PATH (`make deps` installs it)"
    if family.needs is not None and not family.needs.is_dir():
        return f"{family.needs} is missing (`make deps` or `make venv` installs it)"
    if family.module is not None and importlib.util.find_spec(family.module) is None:
        return f"Python module {family.module} is missing (`make venv` installs it)"
    return None


def authenticated(log: str) -> list[tuple[str, str]]:
    """(client version, cipher) of every authenticated connection in kilnproxy's log text."""
    return [(match["client"], match["cipher"]) for match in AUTHENTICATED.finditer(log)]


def ciphers_of(kiln: Kiln, client: str) -> list[str]:
    """The cipher of every authenticated connection whose client version starts `client`."""
    return [cipher for version, cipher in authenticated(kiln.log()) if version.startswith(client)]
