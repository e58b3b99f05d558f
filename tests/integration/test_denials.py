"""Check 3: every refusal with its exact message and exit status, and nothing changed."""

from __future__ import annotations

import re
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import World
from harness import Kiln, keygen, run

SESSION = r"\(session [0-9a-f]{8}\)"


def stderr_line(done: subprocess.CompletedProcess[bytes]) -> str:
    return done.stderr.decode().strip()


def not_found(repo: str) -> str:
    return rf"^kilnproxy: repository '{re.escape(repo)}' not found or access denied {SESSION}$"


def refs(git_dir: Path) -> str:
    return run(["git", "--git-dir", str(git_dir), "show-ref"]).stdout.decode()


def test_unknown_key_is_refused(world: World) -> None:
    done = world.kiln.ssh(world.stranger, "git-upload-pack 'aviato/website'")
    assert done.returncode == 255
    assert "Permission denied (publickey)" in stderr_line(done)
    world.kiln.wait_for_log(r"access .*outcome=auth-failed")


def test_the_last_key_that_max_auth_tries_allows_gets_in(world: World, tmp_path: Path) -> None:
    """max_auth_tries (6) counts the keys a client offers: the 6th gets in, although asyncssh
    asks about it twice (offered, then signed); a 7th is not even looked up, and the client is
    hung up on, as OpenSSH does."""
    kiln = world.kiln
    strangers = [keygen(tmp_path / f"stranger{i}") for i in range(6)]

    def offering(*keys: Path) -> list[str]:
        return [arg for key in keys for arg in ("-i", str(key))]

    argv = [*kiln.ssh_argv(world.stranger), *offering(*strangers[:5], world.alice), "-p",
            str(kiln.port), "git@127.0.0.1", "git-upload-pack 'aviato/website'"]  # fmt: skip
    done = run(argv, env=kiln.client_env(world.alice), input=b"0000", check=False)
    assert done.returncode == 255  # alice is 7th: refused, and the connection hung up on
    assert re.search("Permission denied|Too many authentication failures", stderr_line(done))
    kiln.wait_for_log(r"too many keys offered: disconnecting")
    argv = [*kiln.ssh_argv(strangers[0]), *offering(*strangers[1:5], world.alice), "-p",
            str(kiln.port), "git@127.0.0.1", "git-upload-pack 'aviato/website'"]  # fmt: skip
    done = run(argv, env=kiln.client_env(world.alice), input=b"0000", check=False)
    assert done.returncode == 0, done.stderr  # alice's key is the 6th


def auth_lookups(kiln: Kiln) -> float:
    """How many keys the workers have looked up in the directory (from /metrics)."""
    url = f"http://127.0.0.1:{kiln.http_port}/metrics"
    with urllib.request.urlopen(url, timeout=30) as response:
        text = response.read().decode()
    found = re.search(r"^kilnproxy_auth_lookup_seconds_count (\S+)$", text, re.MULTILINE)
    assert found, text
    return float(found[1])


def test_a_login_asks_the_directory_once(world: World) -> None:
    """OpenSSH offers the key, then signs with it, and asyncssh asks the session both times:
    the second answer comes from the first lookup, on that connection only."""
    kiln = world.kiln
    before = -1.0
    while (count := auth_lookups(kiln)) != before:  # the earlier tests' lookups have come in
        before = count
        time.sleep(1.5)  # more than a heartbeat
    done = kiln.ssh(world.alice, "git-upload-pack 'aviato/website'", input=b"0000")
    assert done.returncode == 0, done.stderr
    deadline = time.monotonic() + 10
    while auth_lookups(kiln) == before and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.5)  # one more heartbeat: a second lookup would have arrived with it
    assert auth_lookups(kiln) == before + 1
    done = kiln.ssh(world.alice, "git-upload-pack 'aviato/website'", input=b"0000")
    assert done.returncode == 0, done.stderr
    deadline = time.monotonic() + 10
    while auth_lookups(kiln) == before + 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert auth_lookups(kiln) == before + 2  # the next connection asks again


def test_other_account_gets_not_found(world: World) -> None:
    done = world.kiln.ssh(world.carol, "git-upload-pack 'aviato/website.git'")
    assert done.returncode == 1
    assert re.match(not_found("aviato/website"), stderr_line(done))
    assert done.stdout == b""


def test_missing_repository_gets_the_same_message(world: World) -> None:
    done = world.kiln.ssh(world.alice, "git-upload-pack 'aviato/nothing-here.git'")
    assert done.returncode == 1
    assert re.match(not_found("aviato/nothing-here"), stderr_line(done))


def test_git_client_sees_the_message(world: World, tmp_path: Path) -> None:
    done = world.kiln.git(
        world.carol, "clone", world.kiln.url("aviato/website.git"), str(tmp_path / "x"), check=False
    )
    assert done.returncode == 128  # git's own status for a failed remote
    assert re.search(not_found("aviato/website")[1:-1], done.stderr.decode(), re.M)


def test_read_only_git_push_is_refused(world: World, tmp_path: Path) -> None:
    kiln = world.kiln
    clone = kiln.clone_with_commit(world.bob, "aviato/website.git", tmp_path / "bob", "bob.txt")
    before = refs(world.website)
    done = kiln.git(world.bob, "push", "origin", "HEAD:refs/heads/bob", cwd=clone, check=False)
    assert done.returncode != 0
    expected = rf"kilnproxy: you have read-only access to 'aviato/website' {SESSION}"
    assert re.search(expected, done.stderr.decode())
    assert refs(world.website) == before
    raw = kiln.ssh(world.bob, "git-receive-pack 'aviato/website.git'")
    assert raw.returncode == 1
    assert re.match(f"^{expected}$", stderr_line(raw))


def test_read_only_hg_push_is_refused(world: World, tmp_path: Path) -> None:
    kiln = world.kiln
    clone = tmp_path / "designs"
    kiln.hg(world.bob, "clone", "-q", kiln.url("aviato/designs"), str(clone))
    (clone / "bob.svg").write_text("<svg/>\n")
    kiln.hg(world.bob, "add", str(clone / "bob.svg"), cwd=clone)
    kiln.hg(world.bob, "commit", "-m", "bob", cwd=clone)
    tip_before = run(["hg", "-R", str(world.designs), "log", "-r", "tip", "-T", "{node}"]).stdout
    done = kiln.hg(world.bob, "push", cwd=clone, check=False)
    assert done.returncode != 0
    output = (done.stdout + done.stderr).decode()
    assert re.search(rf"kilnproxy: you have read-only access to 'aviato/designs' {SESSION}", output)
    tip_after = run(["hg", "-R", str(world.designs), "log", "-r", "tip", "-T", "{node}"]).stdout
    assert tip_after == tip_before
    assert b"bob.svg" not in run(["hg", "-R", str(world.designs), "files", "-r", "tip"]).stdout


def test_shell_request_gets_the_greeting(world: World) -> None:
    done = world.kiln.ssh(world.bob, "-T")
    assert done.returncode == 1
    assert stderr_line(done) == (
        "Hi bob (aviato)! You have authenticated, but kilnproxy does not provide shell access."
    )


def test_pty_request_is_refused(world: World) -> None:
    done = world.kiln.ssh(world.bob, "-tt")  # -tt makes a refused pty fatal for the client
    assert done.returncode == 255
    assert "PTY allocation request failed" in done.stderr.decode()


def test_sftp_and_scp_are_refused(world: World, tmp_path: Path) -> None:
    kiln = world.kiln
    ssh_options = kiln.ssh_argv(world.alice)[1:]
    sftp = run(
        ["sftp", *ssh_options, "-P", str(kiln.port), "-b", "-", "git@127.0.0.1"],
        env=kiln.client_env(world.alice), input=b"ls\n", check=False,
    )  # fmt: skip
    assert sftp.returncode != 0
    assert b"subsystem request failed" in sftp.stderr
    scp = run(
        ["scp", *ssh_options, "-O", "-P", str(kiln.port), "git@127.0.0.1:x/y", str(tmp_path)],
        env=kiln.client_env(world.alice), check=False,
    )  # fmt: skip
    assert scp.returncode != 0
    assert re.search(rf"kilnproxy: unknown command.* {SESSION}", scp.stderr.decode())


@pytest.mark.parametrize(
    "command",
    [
        "git-upload-pack '../x'",
        "git-upload-pack 'a/../../b'",
        "git-upload-pack '-x'",
        "git-upload-pack ''",
        "git-upload-pack 'aviato'",
        "git-upload-pack 'aviato//website'",
        "hg -R x serve --stdio --debugger",
        "hg -R aviato/designs serve",
        "ls; rm -rf /",
        "git-upload-pack 'unbalanced",
        "git-upload-pack aviato/website extra",
        "git-upload-pack 'aviato/\udcffwebsite'",  # the byte 0xff: not UTF-8
    ],
)
def test_malformed_commands_exit_128(world: World, command: str) -> None:
    done = world.kiln.ssh(world.alice, command)
    assert done.returncode == 128, done.stderr
    assert re.match(rf"^kilnproxy: .* {SESSION}$", stderr_line(done))
    assert done.stdout == b""


def test_absolute_path_is_only_a_name(world: World) -> None:
    """'/etc/passwd' is the repository name etc/passwd, which does not exist: nothing leaks."""
    done = world.kiln.ssh(world.alice, "git-upload-pack '/etc/passwd'")
    assert done.returncode == 1
    assert re.match(not_found("etc/passwd"), stderr_line(done))


def test_wrong_vcs_for_repository_is_not_found(world: World) -> None:
    done = world.kiln.ssh(world.alice, "hg -R aviato/website serve --stdio")
    assert done.returncode == 1
    assert re.match(not_found("aviato/website"), stderr_line(done))


def test_port_forwarding_is_refused(world: World) -> None:
    done = world.kiln.ssh(
        world.alice, "-o", "ExitOnForwardFailure=yes", "-N", "-L", "0:127.0.0.1:22", timeout=20
    )
    assert done.returncode == 255
    assert "forwarding" in done.stderr.decode().lower()
