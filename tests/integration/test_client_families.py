"""Every SSH client family git can use, with its own defaults, cloning and pushing through
kilnproxy (SPEC 3, issue 13); and the cipher each negotiated, from kilnproxy's log.

Clients without AES-GCM get the fallback ciphers (kilnproxy/ssh/kex_offer.py), the others
AES-GCM, which is what a default OpenSSH client must end up with. Dropbear's client also sends
a guessed first key exchange packet that RFC 4253 has the server ignore: it connects only if
that is done. Clients come from Debian (OpenSSH, PuTTY's plink, Dropbear's dbclient, curl on
Debian's libssh2, Go's x/crypto/ssh built with Debian's Go) and PyPI (paramiko current and 3.4,
libssh2 1.11 in ssh2-python's wheel), each installed by `make deps` or `make venv`. Not here:
JGit, whose maintained transport is Apache MINA sshd, which Debian does not package (its JGit
4.11 runs on JSch, whose key exchanges are all NIST curves or SHA-1). How each family is set up
is in tests/client_families.py, which bench/per_client.py shares.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from client_families import FAMILIES, ciphers_of, unavailable
from conftest import World
from harness import Kiln, run


@pytest.mark.parametrize("name", FAMILIES)
def test_each_client_family_clones_and_pushes_with_its_defaults(
    world: World, tmp_path: Path, name: str
) -> None:
    reason = unavailable(name)
    if reason is not None:
        pytest.fail(reason)
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
