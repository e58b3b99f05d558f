"""The admin CLI of SPEC 2, run as a user runs it: one process per command."""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from harness import KILNPROXY, keygen, run

from kilnproxy.config import reference

# ssh-keygen no longer makes dsa keys; this one is a valid public key of the kind refused.
DSA_KEY = (
    b"ssh-dss AAAAB3NzaC1kc3MAAACBAP1/U4EddRIpUt9KnC7s5Of2EbdSPO9EAMMeP4C2USZpRV1AIlH7"
    b"WT2NWPq/xfW6MPbLm1Vs14E7gB00b/JmYLdrmVClpJ+f6AR7ECLCT7up1/63xhv4O1fnxqimFQ8E+4P2"
    b"08UewwI1VBNaFpEy9nXzrith1yrv8iIDGZ3RSAHHAAAAFQCXYFCPFSMLzLKSuYKi64QL8Fgc9QAAAIEA"
    b"9+GghdabPd7LvKtcNrhXuXmUr7v6OuqC+VdMCz0HgmdRWVeOutRZT+ZxBxCBgLRJFnEj6EwoFhO3zwky"
    b"jMim4TwWeotUfI0o4KOuHiuzpnWRbqN/C/ohNWLx+2J6ASQ7zKTxvqhRkImog9/hWuWfBpKLZl6Ae1Ul"
    b"ZAFMO/7PSSoAAACBAPz7H+k/UGrL6BbRYu6rOgctbkSYGrYiBhBoQXALEbeeqyaCjLyGMLLuwgCFRd5f"
    b"HeoPRUWjUg+lEXMlRNl2ep0G2nTUeJNBrasXJYoN3ysUTohp5HlFaMwSFjPz3hQD9pxhj1K1Tqvt37/H"
    b"Ie0eaM94Ha03t7ojR3y3mVsHb8mN test\n"
)


@pytest.fixture
def cli(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    import os

    home = tmp_path / "var"
    env = {k: v for k, v in os.environ.items() if not k.startswith("KILNPROXY_")}
    return home, env | {"KILNPROXY_HOME": str(home), "HOME": str(tmp_path)}


def kp(
    env: dict[str, str], *args: str, input: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    return run([*KILNPROXY, *args], env=env, input=input, check=False)


def test_admin_workflow(cli: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    home, env = cli
    assert kp(env, "accounts", "add", "aviato").stdout == b"added account aviato\n"
    assert kp(env, "users", "add", "aviato", "richard", "--role", "admin").returncode == 0
    key = keygen(tmp_path / "richard")
    added = kp(env, "keys", "add", "aviato/richard", "build server", "--file", f"{key}.pub")
    assert added.returncode == 0, added.stderr
    fingerprint = added.stdout.decode().splitlines()[-1]
    assert re.fullmatch(r"SHA256:[A-Za-z0-9+/]{43}", fingerprint)
    other = keygen(tmp_path / "other")
    piped = kp(
        env, "keys", "add", "aviato/richard", "laptop", "-", input=Path(f"{other}.pub").read_bytes()
    )
    assert piped.returncode == 0, piped.stderr
    listing = kp(env, "keys", "list", "aviato/richard").stdout.decode()
    assert fingerprint in listing and "build server" in listing and "laptop" in listing
    assert kp(env, "backends", "list").stdout.decode().startswith(f"local  local://{home}/repos")
    made = kp(env, "repos", "add", "aviato/website", "--vcs", "git", "--backend", "local", "--init")
    assert made.returncode == 0, made.stderr
    assert (home / "repos" / "aviato" / "website.git" / "HEAD").exists()
    made = kp(
        env, "repos", "add", "aviato/designs/logo", "--vcs", "hg", "--backend", "local", "--init"
    )
    assert (home / "repos" / "aviato" / "designs" / "logo" / ".hg").is_dir(), made.stderr
    assert "aviato/designs/logo  hg  local" in kp(env, "repos", "list", "aviato").stdout.decode()
    assert kp(env, "accounts", "add", "hooli").returncode == 0
    assert kp(env, "users", "add", "hooli", "gavin").returncode == 0
    granted = kp(env, "grant", "hooli/gavin", "aviato/website", "read")
    assert granted.stdout == b"granted read on aviato/website to hooli/gavin\n"
    removed = kp(env, "keys", "remove", fingerprint)
    assert removed.returncode == 0 and b"build server" in removed.stdout
    assert fingerprint not in kp(env, "keys", "list").stdout.decode()


def test_repos_add_init_that_fails_leaves_nothing_on_disk(
    cli: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    """`--init` checks first and creates last: a command that fails (no such account, a
    relative --path) leaves no repository behind, so the same command works once mended."""
    home, env = cli
    add = ["repos", "add", "nosuch/x", "--vcs", "git", "--backend", "local", "--init"]
    failed = kp(env, *add)
    assert (failed.returncode, failed.stderr) == (2, b"kilnproxy: error: no account 'nosuch'\n")
    assert not (home / "repos" / "nosuch").exists()
    assert kp(env, "accounts", "add", "nosuch").returncode == 0
    made = kp(env, *add)
    assert made.returncode == 0, made.stderr
    assert (home / "repos" / "nosuch" / "x.git" / "HEAD").exists()
    umask = os.umask(0o022)
    os.umask(umask)
    assert (home / "repos" / "nosuch" / "x.git").stat().st_mode & 0o777 == 0o777 & ~umask
    assert sorted(p.name for p in (home / "repos" / "nosuch").iterdir()) == ["x.git"]
    relative = kp(env, "repos", "add", "nosuch/y", "--vcs", "hg", "--backend", "local", "--init",
                  "--path", "rel/y")  # fmt: skip
    assert relative.returncode == 2 and b"must be absolute" in relative.stderr
    assert not (tmp_path / "rel").exists() and not Path("rel").exists()


def test_what_the_file_system_refuses_is_one_line_and_leaves_no_row(
    cli: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    """A place that cannot be made (under a file, or a symlink, dangling or not, already there)
    is refused before any row is written, so the command can be run again once mended."""
    home, env = cli
    assert kp(env, "accounts", "add", "aviato").returncode == 0
    (home / "repos" / "aviato").mkdir(parents=True)
    (home / "repos" / "aviato" / "q.git").symlink_to(tmp_path / "nowhere")
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    (home / "kilnproxy.toml").write_text(f'[backend_ssh]\nkey = "{a_file}/key"\n')
    for args, message in [
        (["repos", "add", "aviato/q", "--vcs", "git", "--backend", "local", "--init"],
         "q.git already exists"),
        (["repos", "add", "aviato/r", "--vcs", "git", "--backend", "local", "--init", "--path",
          f"{a_file}/sub/r.git"], f"cannot create {a_file}/sub/r.git: "),
        (["backends", "key"], f"cannot write a new key to {a_file}/key: "),
    ]:  # fmt: skip
        done = kp(env, *args)
        lines = done.stderr.decode().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and message in lines[0], lines
    assert kp(env, "repos", "list").stdout == b""
    (home / "repos" / "aviato" / "q.git").unlink()
    made = kp(env, "repos", "add", "aviato/q", "--vcs", "git", "--backend", "local", "--init")
    assert made.returncode == 0, made.stderr


def test_a_repository_path_is_its_own(cli: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    """Two rows on one place would share its data (a grant on one gives the other), and a path
    that goes up is not the place it seems."""
    home, env = cli
    assert kp(env, "accounts", "add", "aviato").returncode == 0
    add = ["repos", "add", "--vcs", "git", "--backend", "local"]
    assert kp(env, *add, "aviato/website").returncode == 0
    for args, message in [
        (["aviato/copy", "--path", f"{home}/repos/aviato/website.git"],
         f"{home}/repos/aviato/website.git on local is repository aviato/website's"),
        (["aviato/slash", "--path", f"/{home}/repos/aviato/./website.git/"],
         f"{home}/repos/aviato/website.git on local is repository aviato/website's"),
        (["aviato/up", "--path", f"{home}/repos/../elsewhere.git"], "must not go up (..)"),
        (["aviato/in", "--path", f"{home}/repos/aviato/website.git/objects"],
         f"and repository aviato/website ({home}/repos/aviato/website.git on local) would lie"),
        (["aviato/around", "--path", f"{home}/repos/aviato"], "would lie one inside the other"),
        (["aviato/all", "--path", "/"], "--path / is the whole disk, not a repository"),
        # Another backend that reaches the same disk: the same place all the same.
        (["aviato/alias", "--backend", "again", "--path", f"{home}/repos/aviato/website.git"],
         f"{home}/repos/aviato/website.git on again is repository aviato/website's"),
    ]:  # fmt: skip
        if "again" in args:
            assert kp(env, "backends", "add", "again", f"local://{home}/repos/").returncode == 0
        done = kp(env, *add, *args)
        assert done.returncode == 2 and message in done.stderr.decode(), done.stderr
    assert kp(env, "repos", "list").stdout.decode().count("\n") == 1
    # --init makes nothing where it would be refused.
    inside = home / "repos" / "aviato" / "website.git" / "nested"
    nested = kp(env, *add, "aviato/nested", "--init", "--path", str(inside))
    assert nested.returncode == 2 and b"would lie one inside the other" in nested.stderr
    assert not inside.exists()
    # The same path on another machine's disk is another place; behind another port, too.
    website = f"{home}/repos/aviato/website.git"
    for backend, url in [
        ("far", "ssh://git@far.example/srv"),
        ("far2", "ssh://git@far.example:2222/srv"),
    ]:
        assert kp(env, "backends", "add", backend, url).returncode == 0
        done = kp(env, *add, f"aviato/{backend}", "--backend", backend, "--path", website)
        assert done.returncode == 0, done.stderr


def test_another_programs_database_is_left_as_it_was(
    cli: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    home, env = cli
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE t (x)")
    db.close()
    before = other.read_bytes()
    home.mkdir(parents=True, exist_ok=True)
    (home / "kilnproxy.toml").write_text(f'[directory]\nurl = "sqlite:{other}"\n')
    done = kp(env, "keys", "list")
    assert done.returncode == 2 and b"is another program's database" in done.stderr, done.stderr
    assert other.read_bytes() == before and not Path(f"{other}-wal").exists()


def test_standard_input_closed_or_output_cut_short(cli: tuple[Path, dict[str, str]]) -> None:
    _, env = cli
    assert kp(env, "accounts", "add", "aviato").returncode == 0
    assert kp(env, "users", "add", "aviato", "alice").returncode == 0
    closed = run(["sh", "-c", '"$@" <&-', "sh", *KILNPROXY, "keys", "add", "aviato/alice", "k",
                  "-"], env=env, check=False)  # fmt: skip
    assert closed.returncode == 2 and b"standard input is closed" in closed.stderr
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader has left (`| head -1`): every write fails with EPIPE
    with os.fdopen(write_end, "wb") as stdout:
        cut = subprocess.run([*KILNPROXY, "config"], env=env, stdout=stdout,
                             stderr=subprocess.PIPE, timeout=60, check=False)  # fmt: skip
    assert (cut.returncode, cut.stderr) == (141, b"")
    # Output that cannot be written: said in one line, and what was done stands.
    with open("/dev/full", "wb") as full:
        lost = subprocess.run([*KILNPROXY, "accounts", "add", "hooli"], env=env, stdout=full,
                              stderr=subprocess.PIPE, timeout=60, check=False)  # fmt: skip
    assert lost.returncode == 1, lost.stderr
    assert lost.stderr == b"kilnproxy: cannot write the command's output: No space left on device\n"
    closed = run(["sh", "-c", '"$@" >&-', "sh", *KILNPROXY, "accounts", "add", "piper"], env=env,
                 check=False)  # fmt: skip
    assert closed.returncode == 1
    assert closed.stderr == b"kilnproxy: standard output is closed; the command's output is lost\n"
    for account in ("hooli", "piper"):
        assert kp(env, "users", "add", account, "gavin").returncode == 0


def test_a_key_pasted_slowly_is_not_held_to_the_directorys_deadline(
    cli: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    """A key pasted slowly into `keys add -` is not cut by the directory's deadline (6 dials).
    (`backends trust` held to it: test_directory_cli.)"""
    home, env = cli
    home.mkdir(parents=True, exist_ok=True)
    (home / "kilnproxy.toml").write_text('[timeouts]\ndial = "200ms"\n')
    assert kp(env, "accounts", "add", "aviato").returncode == 0
    assert kp(env, "users", "add", "aviato", "alice").returncode == 0
    key = keygen(tmp_path / "alice")
    with subprocess.Popen([*KILNPROXY, "keys", "add", "aviato/alice", "laptop", "-"], env=env,
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE) as pasting:  # fmt: skip
        time.sleep(2)  # past 6 x 200ms
        out, err = pasting.communicate(Path(f"{key}.pub").read_bytes(), timeout=20)
    assert pasting.returncode == 0, err
    assert out.decode().startswith("added key 'laptop' for aviato/alice\n")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["users", "add", "nope", "x"], "no account 'nope'"),
        (["accounts", "add", "bad name"], "invalid account name"),
        (["accounts", "add", "../etc"], "invalid account name"),
        (["keys", "add", "aviato", "k", "--file", "/nonexistent"], "is not ACCOUNT/USER"),
        (["keys", "add", "aviato/u", "k"], "give the key once: --file PUBKEY, or - for standard"),
        (["keys", "add", "aviato/u", "k", "-", "--file", "/x.pub"], "give the key once"),
        (
            ["keys", "add", "aviato/u", "k", "id.pub"],
            "a key file is given with --file id.pub, or -",
        ),
        (["keys", "add", "aviato/u", "k", "-", "extra"], "unrecognized arguments: extra"),
        (["keys", "list", "aviato/b c"], "invalid user name 'b c'"),
        (["accounts", "add", "caf\udce9"], "argument 'caf\\xe9' is not UTF-8"),
        (["accounts", "add", "x", "--config", "/dev/zero"], "is over 1 MiB: not a config file"),
        (["kill", "a\nb"], "'a\\nb' is no session id (8 hex digits"),
        (["kill", "--", "-abcdef1"], "'-abcdef1' is no session id"),  # `--`: positionals follow
        (["accounts", "add", "--", "-acc"], "invalid account name '-acc'"),
        (
            ["repos", "add", "aviato/y", "--vcs", "git", "--backend", "local", "--path", "/s/y\n"],
            "must not hold control characters",
        ),
        (["keys", "remove", "SHA256:nothing"], "no key SHA256:nothing"),
        (["keys", "list", "nobody"], "no account 'nobody'"),
        (["keys", "list", "nobody/alice"], "no user nobody/alice"),
        (["repos", "list", "nobody"], "no account 'nobody'"),
        (["backends", "add", "b", "http://x"], "a backend URL is local:///PATH"),
        (["backends", "add", "b", "local:relative"], "local:///ABSOLUTE/PATH"),
        (["backends", "add", "b", "local:///srv/a\nb"], "no spaces or control characters"),
        (["backends", "add", "b", "local:///srv/x?q=1"], "no query (?) or fragment (#)"),
        (["backends", "add", "b", "ssh://git@h:0/srv"], "port 0 is no port"),
        (["backends", "add", "b", "ssh://git:secret@h/srv"], "ssh://...: a backend URL has no pas"),
        (["backends", "add", "b", "ssh://git@[::1/srv"], "not a URL (Invalid IPv6 URL)"),
        (
            ["repos", "add", "aviato/../x", "--vcs", "git", "--backend", "local"],
            "not a repository name",
        ),
        (["repos", "add", "aviato/x", "--vcs", "git", "--backend", "nope"], "no backend 'nope'"),
        (["repos", "add", "aviato/x", "--vcs", "svn", "--backend", "local"], "invalid choice"),
        (["grant", "aviato/u", "aviato/x", "admin"], "invalid choice"),
        (["frobnicate"], "invalid choice"),
        (["serve", "--config", "/nonexistent.toml"], "cannot read config /nonexistent.toml"),
        (["--config", "/nonexistent.toml", "serve"], "cannot read config /nonexistent.toml"),
        (["accounts", "add", "x", "--config", ""], "--config needs a path"),
        (["--config", "/none.toml", "accounts", "add", "x"], "cannot read config /none.toml"),
        (["backends", "add", "b", "agent://h/srv"], "agent://HOST:PORT/ABSOLUTE/PATH"),
        (["agent"], "[agent] base"),
        (["agent", "--config", "/nonexistent.toml"], "cannot read config /nonexistent.toml"),
        (
            ["pki", "issue", "--ca", "/nonexistent", "--kind", "agent", "--name", "h", "/x/y"],
            "cannot read the CA in /nonexistent",
        ),
        (["pki", "issue", "--ca", "/x", "--kind", "web", "--name", "h", "/x/y"], "invalid choice"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    cli: tuple[Path, dict[str, str]], args: list[str], message: str
) -> None:
    _, env = cli
    done = kp(env, *args)
    assert done.returncode == 2
    lines = done.stderr.decode().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("kilnproxy: error: ") and message in lines[0], lines[0]


def test_bad_keys_are_refused(cli: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    _, env = cli
    kp(env, "accounts", "add", "a")
    kp(env, "users", "add", "a", "u")
    run(["ssh-keygen", "-q", "-t", "rsa", "-b", "1024", "-N", "", "-f", str(tmp_path / "rsa")])
    small = kp(env, "keys", "add", "a/u", "old", "--file", str(tmp_path / "rsa.pub"))
    assert small.returncode == 2 and b"too small" in small.stderr
    junk = kp(env, "keys", "add", "a/u", "junk", "-", input=b"ssh-ed25519 AAAAnotbase64\n")
    assert junk.returncode == 2 and b"not an OpenSSH public key" in junk.stderr
    dsa = DSA_KEY
    refused = kp(env, "keys", "add", "a/u", "dsa", "-", input=dsa)
    assert refused.returncode == 2 and b"not accepted" in refused.stderr, refused.stderr
    # Over OpenSSH's 16384 bits (a public modulus needs no primes to be written down).
    modulus = rsa.RSAPublicNumbers(65537, (1 << 16400) + 1).public_key()
    line = modulus.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    large = kp(env, "keys", "add", "a/u", "large", "-", input=line + b"\n")
    assert large.returncode == 2 and b"16401 bits is too large" in large.stderr, large.stderr
    (tmp_path / "huge.pub").write_bytes(b"ssh-ed25519 " + b"A" * (1 << 20))
    huge = kp(env, "keys", "add", "a/u", "huge", "--file", str(tmp_path / "huge.pub"))
    assert huge.returncode == 2 and b"over 64 KiB, which is no public key" in huge.stderr


def test_keys_as_people_paste_them(cli: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    """ssh-keygen's RFC 4716 export (PuTTYgen's format) is the key it holds; an authorized_keys
    line with options, a private key, or a whole file of keys is refused, saying so."""
    _, env = cli
    kp(env, "accounts", "add", "a")
    kp(env, "users", "add", "a", "u")
    key = tmp_path / "id"
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "u@laptop", "-f", str(key)])
    rfc4716 = run(["ssh-keygen", "-e", "-f", f"{key}.pub"]).stdout
    assert rfc4716.startswith(b"---- BEGIN SSH2 PUBLIC KEY ----")
    added = kp(env, "keys", "add", "a/u", "putty", "-", input=rfc4716)
    assert added.returncode == 0, added.stderr
    listed = kp(env, "keys", "list", "a/u").stdout.decode()
    fingerprint = run(["ssh-keygen", "-l", "-f", f"{key}.pub"]).stdout.split()[1].decode()
    assert fingerprint in listed and "putty" in listed
    notepad = tmp_path / "notepad.pub"  # Windows' Notepad: a byte order mark, CRLF
    saved = Path(f"{keygen(tmp_path / 'windows')}.pub").read_bytes()
    notepad.write_bytes("\ufeff".encode() + saved.replace(b"\n", b"\r\n"))
    added = kp(env, "keys", "add", "a/u", "notepad", "--file", str(notepad))
    assert added.returncode == 0, added.stderr
    public = Path(f"{key}.pub").read_bytes()
    for given, message in [
        (b'no-pty,command="git-shell" ' + public, "the key comes after authorized_keys options "
         "(no-pty,command=\"git-shell\"): give the key alone"),
        (key.read_bytes(), "this is a private key: give the public one (its .pub file)"),
        (public + public, "expected one public key, got 2 lines: add each key on its own"),
        (rfc4716 + rfc4716, "expected one public key, got 2 RFC 4716 blocks"),
        (public + rfc4716, "expected one public key, got an RFC 4716 block and more"),
        (rfc4716.replace(b"AAAA", b"!!!!"), "not an RFC 4716 public key"),
        (b"PuTTY-User-Key-File-3: ssh-ed25519\nEncryption: none\n", "this is a private key"),
        (b"\n", "no public key given"),
    ]:  # fmt: skip
        refused = kp(env, "keys", "add", "a/u", "other", "-", input=given)
        lines = refused.stderr.decode().splitlines()
        assert refused.returncode == 2 and len(lines) == 1, (given, lines)
        assert lines[0].startswith(f"kilnproxy: error: {message}"), lines


def test_bad_config_is_one_line(cli: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    _, env = cli
    for text, message in [
        ('[timeouts]\nidle = "ten minutes"\n', "[timeouts] idle: 'ten minutes' is not a duration"),
        ('[ssh]\nlisten = ["nowhere"]\n', "[ssh] listen: 'nowhere' is not an address"),
        ("[ssh]\nlisen = []\n", "unknown setting lisen in [ssh]"),
        ("[nope]\n", "unknown section [nope]"),
        ("[workers]\ncount = 0\n", "[workers] count: expected a whole number of at least 1"),
        ("not toml at all", "not valid TOML"),
    ]:
        config = tmp_path / "bad.toml"
        config.write_text(text)
        done = kp(env, "repos", "list", "--config", str(config))
        assert done.returncode == 2
        assert message in done.stderr.decode() and len(done.stderr.splitlines()) == 1, done.stderr


def test_config_is_read_whether_named_before_or_after_the_command(
    cli: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    home, env = cli
    config = tmp_path / "elsewhere.toml"
    config.write_text(f'[directory]\nurl = "sqlite:{tmp_path / "elsewhere.db"}"\n')
    assert kp(env, "--config", str(config), "accounts", "add", "aviato").returncode == 0
    again = kp(env, "accounts", "add", "aviato", "--config", str(config))
    assert again.returncode == 2 and b"already exists" in again.stderr, again.stderr
    # Between a command's positionals too: `-` still counts after the option.
    assert kp(env, "users", "add", "aviato", "--config", str(config), "alice").returncode == 0
    key = Path(f"{keygen(tmp_path / 'alice')}.pub").read_bytes()
    added = kp(env, "keys", "add", "aviato/alice", "k", "--config", str(config), "-", input=key)
    assert added.returncode == 0 and b"added key 'k'" in added.stdout, added.stderr
    assert (tmp_path / "elsewhere.db").exists() and not (home / "kilnproxy.db").exists()


def test_version_is_stamped(cli: tuple[Path, dict[str, str]]) -> None:
    _, env = cli
    out = kp(env, "version").stdout.decode().strip()
    assert re.fullmatch(r"\d+\.\d+\.\d+\.[0-9a-f]{7,}\.\d{8}T\d{6}Z", out), out


def test_config_prints_the_reference_a_file_can_start_from(
    cli: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    _, env = cli
    done = kp(env, "config")
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode() == reference()
    written = tmp_path / "kilnproxy.toml"
    written.write_bytes(done.stdout)
    assert kp(env, "repos", "list", "--config", str(written)).returncode == 0


def test_status_without_server_is_one_line(cli: tuple[Path, dict[str, str]]) -> None:
    _, env = cli
    done = kp(env, "status")
    assert done.returncode == 2
    assert done.stderr.decode().startswith("kilnproxy: error: cannot reach kilnproxy at")


@pytest.fixture
def ca(cli: tuple[Path, dict[str, str]], tmp_path: Path) -> tuple[dict[str, str], Path]:
    """kilnproxy's environment, and a CA that `pki init` made in the test's directory."""
    _, env = cli
    pki = tmp_path / "pki"
    assert kp(env, "pki", "init", str(pki)).returncode == 0
    return env, pki


def test_pki_makes_a_ca_and_certificates_once(ca: tuple[dict[str, str], Path]) -> None:
    env, pki = ca
    issued = kp(env, "pki", "issue", "--ca", str(pki), "--kind", "agent", "--name",
                "repo1.internal", "--name", "10.0.0.7", str(pki / "repo1"))  # fmt: skip
    assert issued.stdout.decode().startswith("agent certificate for repo1.internal, 10.0.0.7: ")
    assert (pki / "ca.key").stat().st_mode & 0o777 == 0o600
    assert (pki / "repo1.key").stat().st_mode & 0o777 == 0o600
    text = run(["openssl", "x509", "-in", str(pki / "repo1.pem"), "-noout", "-text"]).stdout
    assert b"DNS:repo1.internal, IP Address:10.0.0.7" in text
    assert b"TLS Web Server Authentication" in text
    verified = run(["openssl", "verify", "-CAfile", str(pki / "ca.pem"), str(pki / "repo1.pem")])
    assert verified.stdout.decode().endswith(": OK\n")
    # A host name longer than a common name may be: whole in the subjectAltName that TLS
    # checks, its first label as the common name.
    long = "repo2." + "storage-eu-west-1." * 4 + "internal.example"
    issued = kp(env, "pki", "issue", "--ca", str(pki), "--kind", "agent", "--name", long,
                str(pki / "repo2"))  # fmt: skip
    assert issued.returncode == 0, issued.stderr
    text = run(["openssl", "x509", "-in", str(pki / "repo2.pem"), "-noout", "-text"]).stdout
    assert b"Subject: CN = repo2\n" in text and f"DNS:{long}\n".encode() in text
    again = kp(env, "pki", "init", str(pki))
    assert again.returncode == 2
    assert (
        again.stderr.decode()
        == f"kilnproxy: error: {pki / 'ca.key'} exists already; not overwriting it\n"
    )


def test_pki_refuses_what_a_certificate_cannot_carry_and_writes_nothing(
    ca: tuple[dict[str, str], Path], tmp_path: Path
) -> None:
    env, pki = ca
    issue = ["pki", "issue", "--ca", str(pki), "--kind", "agent"]
    for args, message in [
        (["--name", "bücher.example", str(pki / "a")], "cannot issue a certificate for bücher"),
        (["--name", "h" * 65, str(pki / "a")], "cannot issue a certificate for hhh"),
        (["--name", "h", "--days", "99999999", str(pki / "a")], "--days must be 1 to 36500"),
        (["--name", "h", str(pki / "ca.pem" / "a")], "cannot make the directory"),
        (["--name", "h", "."], "OUT must name the files to write"),
        (["--name", "bad name!", str(pki / "a")], "'bad name!' is neither a host name nor an IP"),
        (["--name=-h.example", str(pki / "a")], "is neither a host name nor an IP address"),
    ]:
        done = kp(env, *issue, *args)
        lines = done.stderr.decode().splitlines()
        assert (done.returncode, len(lines)) == (2, 1), lines
        assert lines[0].startswith("kilnproxy: error: ") and message in lines[0], lines[0]
    two = kp(env, "pki", "issue", "--ca", str(pki), "--kind", "proxy", "--name", "p1", "--name",
             "p2", str(pki / "p"))  # fmt: skip
    assert two.returncode == 2 and b"a proxy's certificate has one name, not 2" in two.stderr
    for args, message in [
        (["pki", "issue", "--ca", str(pki), "--kind", "proxy", "--name", "p\n1", str(pki / "p")],
         "--name 'p\\n1' must be printable"),
        (["pki", "init", "--name", "c\tA", str(tmp_path / "tab")], "--name 'c\\tA' must be"),
        (["pki", "init", ""], "DIR must name the CA's directory"),
    ]:  # fmt: skip
        done = kp(env, *args)
        lines = done.stderr.decode().splitlines()
        assert done.returncode == 2 and len(lines) == 1, lines
        assert lines[0].startswith(f"kilnproxy: error: {message}"), lines
    assert not (tmp_path / "tab").exists()
    other = tmp_path / "other"
    assert kp(env, "pki", "init", str(other)).returncode == 0
    mixed = tmp_path / "mixed"  # one CA's certificate, another's key
    mixed.mkdir()
    (mixed / "ca.pem").write_bytes((pki / "ca.pem").read_bytes())
    (mixed / "ca.key").write_bytes((other / "ca.key").read_bytes())
    leaf = tmp_path / "leaf"  # a certificate that is no CA's, with its own key
    assert kp(env, *issue, "--name", "h", str(tmp_path / "h")).returncode == 0
    leaf.mkdir()
    (leaf / "ca.pem").write_bytes((tmp_path / "h.pem").read_bytes())
    (leaf / "ca.key").write_bytes((tmp_path / "h.key").read_bytes())
    for directory, message in [(mixed, "is not the key of ca.pem"), (leaf, "is not a CA cert")]:
        done = kp(env, "pki", "issue", "--ca", str(directory), "--kind", "agent", "--name", "h",
                  str(directory / "a"))  # fmt: skip
        assert done.returncode == 2 and message in done.stderr.decode(), done.stderr
        assert not (directory / "a.pem").exists()
    long_ca = kp(env, "pki", "init", "--name", "c" * 65, str(tmp_path / "long"))
    assert long_ca.returncode == 2
    assert long_ca.stderr.decode().startswith("kilnproxy: error: cannot name a CA")
    # A certificate already there (made with openssl, say): no key is written beside it.
    (pki / "repo1.pem").write_text("kept\n")
    again = kp(env, *issue, "--name", "repo1.internal", str(pki / "repo1"))
    assert again.returncode == 2
    assert sorted(p.name for p in pki.iterdir()) == ["ca.key", "ca.pem", "repo1.pem"]
    assert not (tmp_path / "long").exists() or not any((tmp_path / "long").iterdir())


def test_pki_certificates_find_their_ca_in_a_bundle_of_same_named_cas(
    cli: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    """While one CA replaces another, a `ca` file holds both; their names may be the same."""
    _, env = cli
    for name in ("old", "new"):
        assert (
            kp(env, "pki", "init", "--name", "kilnproxy CA", str(tmp_path / name)).returncode == 0
        )
    kp(env, "pki", "issue", "--ca", str(tmp_path / "new"), "--kind", "proxy", "--name", "p1",
       str(tmp_path / "proxy"))  # fmt: skip
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(
        (tmp_path / "old/ca.pem").read_bytes() + (tmp_path / "new/ca.pem").read_bytes()
    )
    verified = run(["openssl", "verify", "-CAfile", str(bundle), str(tmp_path / "proxy.pem")])
    assert verified.stdout.decode().endswith(": OK\n")
    default_names = {kp(env, "pki", "init", str(tmp_path / d)).stdout for d in ("c1", "c2")}
    assert len(default_names) == 2 and all(b"kilnproxy CA " in n for n in default_names)


def test_demo_with_a_host_key_that_cannot_serve_seeds_nothing(
    cli: tuple[Path, dict[str, str]],
) -> None:
    home, env = cli
    home.mkdir()
    (home / "ssh_host_ed25519_key").write_text("not a key\n")
    done = kp(env, "demo")
    assert done.returncode == 2
    (line,) = done.stderr.decode().splitlines()
    assert line.startswith("kilnproxy: error: host key ") and "not a usable private key" in line
    assert sorted(p.name for p in home.iterdir()) == ["ssh_host_ed25519_key"]


def test_the_agent_says_which_of_its_files_it_cannot_load(
    cli: tuple[Path, dict[str, str]], ca: tuple[dict[str, str], Path], tmp_path: Path
) -> None:
    _, env = cli
    _, pki = ca
    config = tmp_path / "agent.toml"
    for files, message in [
        (("/nonexistent/ca.pem", pki / "ca.pem", pki / "ca.key"), "cannot load ca /nonexistent/"),
        ((pki / "ca.pem", pki / "ca.pem", tmp_path), f"cannot load cert {pki / 'ca.pem'} with key"),
    ]:
        ca_file, cert, key = files
        config.write_text(f'[agent]\nlisten = ["127.0.0.1:9"]\nbase = "{tmp_path}"\n'
                          f'ca = "{ca_file}"\ncert = "{cert}"\nkey = "{key}"\n')  # fmt: skip
        done = kp(env, "agent", "--config", str(config))
        (line,) = done.stderr.decode().splitlines()
        assert done.returncode == 2 and line.startswith(f"kilnproxy: error: [agent] {message}")


def test_an_admin_command_imports_no_ssh_stack(tmp_path: Path) -> None:
    """asyncssh takes longer to import than most admin commands take to run (0.15 s of 0.3):
    only the commands that read a key or speak SSH load it."""
    probe = (
        "import sys; from kilnproxy.cli.main import main; status = main(['accounts', 'add', "
        "'acme']); print(status, [m for m in sys.modules if 'asyncssh' in m])"
    )
    env = {**os.environ, "KILNPROXY_HOME": str(tmp_path)}
    done = run([sys.executable, "-c", probe], env=env)
    assert done.stdout.splitlines()[-1] == b"0 []"
