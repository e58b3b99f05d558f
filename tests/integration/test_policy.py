"""The SSH algorithm policy of SPEC 3 and the environment a backend receives (SPEC 4, 5)."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import World

from kilnproxy.policy.access import Role
from kilnproxy.ssh.keys import parse_public_key


def ssh_with(
    world: World, *options: str, key: Path | None = None
) -> subprocess.CompletedProcess[bytes]:
    command = "git-upload-pack 'aviato/website'"
    return world.kiln.ssh(key or world.alice, *options, command, input=b"0000")


def server_offer(world: World, *options: str) -> dict[str, list[str]]:
    """The server's KEXINIT proposal, as OpenSSH reports it at debug level 2."""
    kiln = world.kiln
    argv = [*kiln.ssh_argv(world.alice, "DEBUG2"), *options, "-p", str(kiln.port),
            "git@127.0.0.1"]  # fmt: skip
    done = subprocess.run(
        [*argv, "git-upload-pack 'aviato/website'"], env=kiln.client_env(world.alice),
        input=b"0000", capture_output=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    log = done.stderr.decode()
    peer = log[log.index("peer server KEXINIT proposal") :]
    offer = {}
    for name in ("KEX algorithms", "host key algorithms", "ciphers stoc", "MACs stoc"):
        match = re.search(rf"debug2: {name}: (.*)", peer)
        assert match, name
        offer[name] = match.group(1).strip().split(",")
    chosen = re.search(r"debug1: kex: server->client cipher: (\S+)", log)
    assert chosen, "no cipher chosen"
    offer["chosen"] = [chosen.group(1)]
    return offer


def test_server_offers_only_the_policy(world: World) -> None:
    offer = server_offer(world)
    assert offer["KEX algorithms"] == [
        "mlkem768x25519-sha256", "curve25519-sha256", "curve25519-sha256@libssh.org",
        "diffie-hellman-group16-sha512", "diffie-hellman-group18-sha512",
        "ext-info-s", "kex-strict-s-v00@openssh.com",
    ]  # fmt: skip
    assert offer["host key algorithms"] == ["ssh-ed25519"]
    assert offer["chosen"] == ["aes128-gcm@openssh.com"]  # a stock OpenSSH client's choice
    assert offer["ciphers stoc"] == ["aes128-gcm@openssh.com", "aes256-gcm@openssh.com"]
    assert all(mac.endswith("-etm@openssh.com") for mac in offer["MACs stoc"])
    assert not any(
        "sha1" in alg or "cbc" in alg or "nistp" in alg for v in offer.values() for alg in v
    )


@pytest.mark.parametrize(
    ("ciphers", "chosen"),
    [
        ("chacha20-poly1305@openssh.com,aes256-ctr", "chacha20-poly1305@openssh.com"),
        ("aes256-ctr,aes128-ctr", "aes256-ctr"),
    ],
)
def test_a_client_without_aes_gcm_is_offered_the_fallback_ciphers(
    world: World, ciphers: str, chosen: str
) -> None:
    """As Dropbear 2022.83 or paramiko 3.4 would be (tests/integration/test_client_families)."""
    offer = server_offer(world, "-o", f"Ciphers={ciphers}")
    assert offer["ciphers stoc"] == [
        "aes128-gcm@openssh.com", "aes256-gcm@openssh.com",
        "chacha20-poly1305@openssh.com", "aes128-ctr", "aes256-ctr",
    ]  # fmt: skip
    assert offer["chosen"] == [chosen]
    # A MAC that is not encrypt-then-MAC: refused, unless the cipher is AEAD and needs none.
    non_etm = ssh_with(world, "-o", f"Ciphers={ciphers}", "-o", "MACs=hmac-sha2-256")
    assert non_etm.returncode == (0 if chosen.startswith("chacha") else 255)


@pytest.mark.parametrize(
    "option",
    [
        "KexAlgorithms=ecdh-sha2-nistp256",
        "KexAlgorithms=diffie-hellman-group14-sha1",
        "Ciphers=aes128-cbc",  # offered the fallback ciphers too, none of them CBC
        "HostKeyAlgorithms=ssh-rsa",
    ],
)
def test_clients_insisting_on_weak_algorithms_cannot_connect(world: World, option: str) -> None:
    done = ssh_with(world, "-o", option)
    assert done.returncode == 255
    assert done.stdout == b""


def test_ctr_ciphers_an_operator_adds_still_take_etm_macs_only(
    new_world: Callable[..., World],
) -> None:
    """AEAD ciphers carry their own MAC, so MACs are only negotiated with CTR."""
    ciphers = ["aes128-gcm@openssh.com", "aes128-ctr"]
    world = new_world({"ssh": {"encryption_algs": ciphers}})
    assert server_offer(world)["ciphers stoc"] == ciphers
    ctr = ["-o", "Ciphers=aes128-ctr"]
    assert ssh_with(world, *ctr, "-o", "MACs=hmac-sha2-256-etm@openssh.com").returncode == 0
    refused = ssh_with(world, *ctr, "-o", "MACs=hmac-sha2-256")  # only the MAC differs
    assert refused.returncode == 255
    assert refused.stdout == b""


def test_rsa_key_signs_with_sha2_only(world: World) -> None:
    kiln = world.kiln
    key = kiln.keys / "rsa"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "rsa", "-b", "3072", "-N", "", "-f", str(key)], check=True
    )
    with kiln.directory() as directory:
        directory.add_user("aviato", "rsa-user", Role.READ)
        directory.add_key(
            "aviato", "rsa-user", "rsa", parse_public_key(Path(f"{key}.pub").read_text())
        )
    ok = ssh_with(world, "-o", "PubkeyAcceptedAlgorithms=rsa-sha2-512", key=key)
    assert ok.returncode == 0, ok.stderr
    sha1 = ssh_with(world, "-o", "PubkeyAcceptedAlgorithms=ssh-rsa", key=key)
    assert sha1.returncode == 255
    assert "Permission denied (publickey)" in sha1.stderr.decode()


def test_backend_environment_carries_the_session(world: World, tmp_path: Path) -> None:
    kiln = world.kiln
    record = tmp_path / "env.txt"
    hook = world.website / "hooks" / "pre-receive"
    hook.write_text(
        f"#!/bin/sh\nenv | grep -E '^(KILNPROXY_|GIT_PROTOCOL)' | sort > {record}\ncat >/dev/null\n"
    )
    hook.chmod(0o755)
    try:
        clone = kiln.clone_with_commit(world.alice, "aviato/website", tmp_path / "w", "env.txt")
        kiln.git(world.alice, "push", "-q", "origin", "HEAD:refs/heads/env", cwd=clone)
    finally:
        hook.unlink()
    env = dict(line.split("=", 1) for line in record.read_text().splitlines())
    assert (env["KILNPROXY_ACCOUNT"], env["KILNPROXY_USER"]) == ("aviato", "alice")
    assert env["KILNPROXY_ACCESS"] == "write"
    session = env["KILNPROXY_SESSION"]
    assert re.fullmatch(r"[0-9a-f]{8}", session)
    kiln.wait_for_log(rf"\[{session}\] access .*verb=git-receive-pack .*exit=0 outcome=ok")
