"""Every SSH client family git can use, with its own defaults, cloning and pushing through
kilnproxy (SPEC 3, issue 13); and the cipher each negotiated, from kilnproxy's log.

Clients without AES-GCM get the fallback ciphers (kilnproxy/ssh/kex_offer.py), the others
AES-GCM, which is what a default OpenSSH client must end up with. Dropbear's client also sends
a guessed first key exchange packet that RFC 4253 has the server ignore: it connects only if
that is done. Clients come from Debian (OpenSSH, PuTTY's plink, Dropbear's dbclient, curl on
Debian's libssh2, Go's x/crypto/ssh built with Debian's Go) and PyPI (paramiko current and 3.4,
libssh2 1.11 in ssh2-python's wheel), each installed by `make deps` or `make venv`. Not here:
JGit, whose maintained transport is Apache MINA sshd, which Debian does not package (its JGit
4.11 runs on JSch, whose key exchanges are all NIST curves or SHA-1).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import World
from harness import Kiln, run

TESTS = Path(__file__).resolve().parents[1]
PARAMIKO_OLD = Path(sys.prefix) / "paramiko-3.4"  # made by `make venv`
AUTHENTICATED = re.compile(
    r"authenticated aviato/alice as git .* over (?P<cipher>\S+(?: \(to client \S+\))?) "
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
        if path is not None and not path.is_dir():
            pytest.fail(f"{path} is missing: `make venv` installs it")
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


FAMILIES = {
    "openssh": Family(openssh, "SSH-2.0-OpenSSH_9.2", "aes128-gcm@openssh.com"),
    "plink": Family(plink, "SSH-2.0-PuTTY_Release_0.78", "aes128-gcm@openssh.com"),
    # No AES-GCM in Dropbear 2022.83, nor in paramiko before 3.5.
    "dbclient": Family(dbclient, "SSH-2.0-dropbear_2022.83", "chacha20-poly1305@openssh.com"),
    "paramiko": Family(library("paramiko"), "SSH-2.0-paramiko_5.1.0", "aes128-gcm@openssh.com"),
    "paramiko-3.4": Family(
        library("paramiko", PARAMIKO_OLD),
        "SSH-2.0-paramiko_3.4.1",
        "aes128-ctr+hmac-sha2-256-etm@openssh.com",
    ),
    "libssh2": Family(library("libssh2"), "SSH-2.0-libssh2_1.11.1", "aes256-gcm@openssh.com"),
    "go": Family(go, "SSH-2.0-Go", "aes128-gcm@openssh.com"),
}


def ciphers_of(kiln: Kiln, client: str) -> list[str]:
    """The cipher of every authenticated connection whose client version starts `client`."""
    return [
        match["cipher"]
        for match in AUTHENTICATED.finditer(kiln.log())
        if match["client"].startswith(client)
    ]


@pytest.mark.parametrize("name", FAMILIES)
def test_each_client_family_clones_and_pushes_with_its_defaults(
    world: World, tmp_path: Path, name: str
) -> None:
    family, kiln = FAMILIES[name], world.kiln
    env = family.setup(kiln, world.alice, tmp_path)
    work = tmp_path / "website"
    url = kiln.url("aviato/website")
    clone = run(["git", "clone", "-q", url, str(work)], env=env, check=False)
    assert clone.returncode == 0, clone.stderr.decode()
    assert (work / "README.md").read_bytes() == b"# website\n"
    (work / f"{name}.txt").write_text(f"pushed by {name}\n")
    run(["git", "add", f"{name}.txt"], env=env, cwd=work)
    run(["git", "commit", "-qm", f"from {name}"], env=env, cwd=work)
    push = run(["git", "push", "-q", "origin", "HEAD"], env=env, cwd=work, check=False)
    assert push.returncode == 0, push.stderr.decode()

    pushed = run(["git", "--git-dir", str(world.website), "show", f"main:{name}.txt"])
    assert pushed.stdout == f"pushed by {name}\n".encode()
    assert ciphers_of(kiln, family.client) == [family.cipher] * 2  # the clone, the push


def test_debians_libssh2_has_no_etm_mac_so_curl_on_it_is_refused(world: World) -> None:
    """Debian 12's libssh2 (1.10, in its curl) has no AES-GCM, no ChaCha20 and no
    encrypt-then-MAC MAC: AES-CTR is left, with a MAC the policy refuses (SPEC 3). libssh2 has
    both since 1.11 (the "libssh2" family above). On a system whose curl has it, it connects."""
    kiln = world.kiln
    version = re.search(rb"libssh2/(\d+)\.(\d+)", run(["curl", "-V"]).stdout)
    assert version, "curl is built without libssh2"
    key = str(world.alice)
    argv = ["curl", "-sS", "--key", key, "--pubkey", f"{key}.pub", "-u", "git:", "--hostpubsha256",
            host_key_sha256(kiln), f"sftp://127.0.0.1:{kiln.port}/aviato/website"]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, timeout=60, check=False)
    assert done.returncode != 0  # kilnproxy has no sftp, whatever the client
    if (int(version[1]), int(version[2])) < (1, 11):
        assert b"Unable to exchange encryption keys" in done.stderr, done.stderr
        assert ciphers_of(kiln, "SSH-2.0-libssh2_1.10") == []
    else:
        assert "gcm" in kiln.wait_for_log(r"over (\S+) from client 'SSH-2.0-libssh2")[1]


def host_key_sha256(kiln: Kiln) -> str:
    """The host key's SHA-256 fingerprint in base64, as curl's --hostpubsha256 takes it."""
    line = run(["ssh-keygen", "-lf", str(kiln.home / "ssh_host_ed25519_key.pub")]).stdout
    return line.split()[1].decode().removeprefix("SHA256:")
