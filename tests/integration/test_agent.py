"""The storage agent's own guards (SPEC 5, agent://): certificates both ways, its base
directory, its drain. Each case has real `kilnproxy agent` processes with CAs made in the
test's directory; the contract every backend keeps is in test_backend_contract, and the
storage's faults (killed, stopped) in test_faults.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import sqlite3
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
from agent import Agent, Pki, read_frames
from conftest import World, make_world
from harness import KILNPROXY, finish_upload_pack, hold_upload_pack, run, seed_git
from midway import release

from kilnproxy.backends.frames import CONTROL, Frame, FrameReader, Kind, OpenRequest, frame
from kilnproxy.cli.pki import issue

UNAVAILABLE = (
    r"kilnproxy: storage for {} is unavailable, try again later \(session [0-9a-f]{{8}}\)\n"
)
CUT = r"kilnproxy: storage server {} \(session [0-9a-f]{{8}}\)\n"


@dataclass
class Site:
    world: World
    pki: Pki  # signs the proxy's certificate, and the agents' it trusts
    root: Path
    agents: list[Agent]

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        return self.world.kiln.cli(*args, check=check)

    def agent(
        self,
        backend: str,
        pki: Pki | None = None,
        proxies: Pki | None = None,
        name: str = "",
        env: dict[str, str] | None = None,
    ) -> Agent:
        """A started agent, added as `backend`; its certificate signed by `pki` for `name`."""
        agent = Agent(self.root / backend, pki or self.pki, proxies, name or "127.0.0.1", env=env)
        self.agents.append(agent)
        agent.start()
        self.cli("backends", "add", backend, agent.url)
        return agent

    def repo(self, agent: Agent, backend: str, repo: str, path: Path | None = None) -> Path:
        """A seeded repository in the agent's base (or at `path`), routed to it."""
        where = path or agent.base / f"{repo}.git"
        where.parent.mkdir(parents=True, exist_ok=True)
        run(["git", "init", "-q", "--bare", "--initial-branch=main", str(where)])
        seed_git(where, self.root / f"seed-{repo.replace('/', '-')}", {"README": b"hi\n"})
        extra = ["--path", str(path)] if path else []
        self.cli("repos", "add", repo, "--vcs", "git", "--backend", backend, *extra)
        return where

    def upload_pack(self, repo: str) -> subprocess.CompletedProcess[bytes]:
        return self.world.kiln.ssh(self.world.alice, f"git-upload-pack '{repo}'", input=b"0000")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("agents")
    pki = Pki(root / "pki")
    settings = {"timeouts": {"dial": "2s"}, "backend_agent": pki.proxy_settings()}
    s = Site(make_world(root / "kiln", settings), pki, root, [])
    yield s
    s.world.kiln.stop()
    for agent in s.agents:
        agent.stop()


def assert_unavailable(done: subprocess.CompletedProcess[bytes], repo: str) -> None:
    assert done.returncode == 1, done
    assert re.fullmatch(UNAVAILABLE.format(repo), done.stderr.decode()), done.stderr


def test_a_good_agent_serves(site: Site) -> None:
    agent = site.agent("good")
    site.repo(agent, "good", "aviato/on-good")
    done = site.upload_pack("aviato/on-good")
    assert done.returncode == 0 and b"refs/heads/main" in done.stdout, done
    agent.wait_for_log(r"\[[0-9a-f]{8}\] started git-upload-pack .*aviato/on-good\.git")
    agent.wait_for_log(r"\[[0-9a-f]{8}\] exit=0 git-upload-pack \(repo aviato/on-good\)")
    agent.wait_for_log(r"proxy 127\.0\.0\.1:\d+ connected \(certificate proxy\)")


def test_a_proxy_certificate_of_another_ca_is_refused(site: Site) -> None:
    agent = site.agent("picky", proxies=Pki(site.root / "other-proxies"))
    site.repo(agent, "picky", "aviato/on-picky")
    assert_unavailable(site.upload_pack("aviato/on-picky"), "aviato/on-picky")
    agent.wait_for_log(r"refused connection from 127\.0\.0\.1:\d+: TLS handshake failed: .*"
                       r"(certificate verify failed|unknown ca)")  # fmt: skip
    site.world.kiln.wait_for_log(
        r"backend picky: cannot connect to 127\.0\.0\.1:\d+: refused by the agent: "
        r"(.*(UNKNOWN_CA|unknown ca)|closed before it answered \(does it trust our certificate)"
    )
    assert "started" not in agent.log()


def test_an_agent_certificate_of_another_ca_is_refused(site: Site) -> None:
    agent = site.agent("impostor", pki=Pki(site.root / "other-agents"), proxies=site.pki)
    site.repo(agent, "impostor", "aviato/on-impostor")
    assert_unavailable(site.upload_pack("aviato/on-impostor"), "aviato/on-impostor")
    site.world.kiln.wait_for_log(
        r"backend impostor: cannot connect to 127\.0\.0\.1:\d+: "
        r"SSLCertVerificationError: .*certificate verify failed"
    )
    assert "started" not in agent.log()


def test_an_agent_certificate_for_another_name_is_refused(site: Site) -> None:
    agent = site.agent("misnamed", name="storage.invalid")
    site.repo(agent, "misnamed", "aviato/on-misnamed")
    assert_unavailable(site.upload_pack("aviato/on-misnamed"), "aviato/on-misnamed")
    site.world.kiln.wait_for_log(r"backend misnamed: cannot connect to 127\.0\.0\.1:\d+: "
                                 r"SSLCertVerificationError: .*(mismatch|match)")  # fmt: skip
    assert "started" not in agent.log()


def test_tls_below_1_3_is_refused(site: Site) -> None:
    agent = site.agent("modern")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(site.pki.ca)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    cert, key = site.pki.issue("proxy", "proxy")
    context.load_cert_chain(cert, key)
    with (
        socket.create_connection(("127.0.0.1", agent.port), 5) as raw,
        pytest.raises(ssl.SSLError, match=r"(?i)version|protocol"),
    ):
        context.wrap_socket(raw, server_hostname="127.0.0.1")
    agent.wait_for_log(r"refused connection from 127\.0\.0\.1:\d+: TLS handshake failed")


def test_paths_outside_the_base_are_refused(site: Site, tmp_path: Path) -> None:
    agent = site.agent("confined")
    outside = site.repo(agent, "confined", "aviato/dotdot", agent.base.parent / "outside.git")
    # `repos add` refuses a path that goes up; a row an older kilnproxy, or another tool, wrote
    # may have one all the same, and the agent is the last word on what it serves.
    with sqlite3.connect(site.world.kiln.home / "kilnproxy.db") as db:
        db.execute("UPDATE repos SET path = ? WHERE name = 'dotdot'",
                   (str(agent.base / ".." / "outside.git"),))  # fmt: skip
    db.close()
    site.repo(agent, "confined", "aviato/inside")
    link = agent.base / "aviato" / "link.git"
    link.symlink_to(outside)  # inside the base by name, outside it in truth
    site.cli("repos", "add", "aviato/link", "--vcs", "git", "--backend", "confined",
             "--path", str(link))  # fmt: skip
    for repo in ("aviato/dotdot", "aviato/link"):
        assert_unavailable(site.upload_pack(repo), repo)
        agent.wait_for_log(rf"\[[0-9a-f]{{8}}\] refused git-upload-pack \S+ \(repo {repo}\): "
                           r"path .* is outside the agent's base")  # fmt: skip
    site.world.kiln.wait_for_log(r"backend confined failed: agent refused: path .* outside")
    assert "started" not in agent.log()
    assert site.upload_pack("aviato/inside").returncode == 0  # the connection still serves


def test_sigterm_drains(site: Site) -> None:
    """On TERM the agent stops accepting, lets a running command finish, and exits; a command
    that outlives [timeouts] drain (5 s here) is cut, and its client told so. The proxy hears
    of the drain on the connection the running command keeps open, and opens no session on it:
    with no agent to take its place, a new session is told the storage is unavailable."""
    kiln, alice = site.world.kiln, site.world.alice
    agent = site.agent("draining")
    site.repo(agent, "draining", "aviato/on-draining")
    held = hold_upload_pack(kiln, alice, "aviato/on-draining")
    assert agent.proc is not None
    agent.proc.send_signal(signal.SIGTERM)
    agent.wait_for_log(r"draining: 1 command\(s\) running")
    kiln.wait_for_log(r"backend draining: the peer drains a connection \(1 channel\(s\) on it\)")
    assert_unavailable(site.upload_pack("aviato/on-draining"), "aviato/on-draining")
    kiln.wait_for_log(r"backend draining: cannot connect to 127\.0\.0\.1:\d+: .*refused")
    assert finish_upload_pack(held) == 0
    assert release(held) == b""
    assert agent.proc.wait(10) == 0
    assert "agent stopped" in agent.log()

    agent.start()
    held = hold_upload_pack(kiln, alice, "aviato/on-draining")
    agent.proc.send_signal(signal.SIGTERM)
    assert agent.proc.wait(15) == 0
    agent.wait_for_log(r"drain timeout: cutting 1 command\(s\)")
    assert held.wait(10) == 1
    assert re.fullmatch(CUT.format("is stopping and the drain timeout expired"),
                        release(held).decode())  # fmt: skip


@pytest.mark.parametrize("signals", [[signal.SIGINT], [signal.SIGTERM, signal.SIGTERM]])
def test_int_or_a_second_term_stops_at_once(site: Site, signals: list[signal.Signals]) -> None:
    """As the proxy's master (SPEC 6): running commands are cut, their clients told why, and
    the agent exits within the grace its commands get (they exit at once on SIGTERM here)."""
    kiln, alice = site.world.kiln, site.world.alice
    agent = site.agent(f"hurried-{len(signals)}")
    site.repo(agent, f"hurried-{len(signals)}", f"aviato/on-hurried-{len(signals)}")
    held = hold_upload_pack(kiln, alice, f"aviato/on-hurried-{len(signals)}")
    assert agent.proc is not None
    for signum in signals:
        agent.proc.send_signal(signum)
        agent.wait_for_log(r"draining: 1 command\(s\) running")
    started = time.monotonic()
    assert agent.proc.wait(5) == 0
    assert time.monotonic() - started < 2.0  # its command exited on SIGTERM, no SIGKILL waited
    assert re.search(r"stopping at once: cutting 1 command\(s\)\n.*agent stopped", agent.log(),
                     re.DOTALL)  # fmt: skip
    assert held.wait(10) == 1
    assert re.fullmatch(CUT.format("is shutting down"), release(held).decode())
    assert agent.processes() == []


def test_a_command_aborted_during_the_drain_has_exited_before_the_agent_does(
    site: Site, tmp_path: Path
) -> None:
    """A proxy's connection is lost while the agent drains: its command gets SIGTERM, and
    SIGKILL after the grace if it takes no notice (as this one, which ignores TERM). The agent
    exits only once it has: a command left behind runs on in its own process group."""
    wrapper = tmp_path / "bin"
    wrapper.mkdir()
    (wrapper / "git").write_text("#!/bin/sh\ntrap '' TERM\nexec sleep 60\n")
    (wrapper / "git").chmod(0o755)
    agent = site.agent("stubborn", env={"PATH": f"{wrapper}:{os.environ['PATH']}"})
    path = str(site.repo(agent, "stubborn", "aviato/on-stubborn"))
    request = OpenRequest("5ca1ab1e", "aviato/on-stubborn", "git-upload-pack", path,
                          {"KILNPROXY_SESSION": "5ca1ab1e"}, 65536)  # fmt: skip
    assert agent.proc is not None
    try:
        with contextlib.closing(tls_to(site, agent)) as tls:
            tls.sendall(request.encode(1))
            agent.wait_for_log(r"\[5ca1ab1e\] started git-upload-pack")
            (command,) = agent.processes()
            agent.proc.send_signal(signal.SIGTERM)
            agent.wait_for_log(r"draining: 1 command\(s\) running")
        agent.wait_for_log(r"\[5ca1ab1e\] aborting git-upload-pack .*connection from .* lost")
        started = time.monotonic()
        assert agent.proc.wait(10) == 0
        assert time.monotonic() - started > 1.0  # its SIGKILL came KILL_GRACE after its SIGTERM
        assert not command.is_running()
    finally:
        with contextlib.suppress(psutil.NoSuchProcess, UnboundLocalError):
            command.kill()


def agent_certificate(agent: Agent, trusted: Pki, proxies: Pki) -> bytes:
    """The certificate an agent presents to a new connection (DER)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(trusted.ca)
    context.load_cert_chain(*proxies.issue("proxy", "proxy"))
    with (
        socket.create_connection(("127.0.0.1", agent.port), 5) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        certificate = tls.getpeercert(binary_form=True)
    assert certificate is not None
    return certificate


def test_usr1_reopens_the_log_and_hup_loads_the_certificates_again(site: Site) -> None:
    """USR1: a rotated [log] file is written anew. HUP: a renewed certificate is presented to
    the next connections; one that cannot be loaded leaves the one loaded before in use."""
    pki = Pki(site.root / "renewing")
    agent = Agent(site.root / "renewed", pki, site.pki)
    with agent.config.open("a") as config:
        config.write(f'[log]\nfile = "{agent.log_path}"\n')  # where its stderr goes too
    site.agents.append(agent)
    agent.start()
    assert agent.proc is not None
    rotated = agent.log_path.rename(agent.log_path.with_suffix(".log.1"))
    agent.proc.send_signal(signal.SIGUSR1)
    agent.wait_for_log(r"agent reopened its log")  # in a new file at [log] file
    assert "agent listening on" in rotated.read_text()
    assert "agent listening on" not in agent.log()
    first = agent_certificate(agent, pki, site.pki)
    renewal, renewal_key = pki.root / "renewal.pem", pki.root / "renewal.key"
    issue(pki.root, "agent", ["127.0.0.1"], pki.root / "renewal", 30)
    agent.cert.unlink()
    agent.proc.send_signal(signal.SIGHUP)
    agent.wait_for_log(r"HUP: still using the certificates loaded before: \[agent\] cannot load")
    assert agent_certificate(agent, pki, site.pki) == first
    agent.cert.write_bytes(renewal.read_bytes())
    agent.key.write_bytes(renewal_key.read_bytes())
    agent.proc.send_signal(signal.SIGHUP)
    agent.wait_for_log(r"HUP: loaded .* for the next connections")
    renewed = agent_certificate(agent, pki, site.pki)
    assert renewed == ssl.PEM_cert_to_DER_cert(renewal.read_text()) != first
    assert agent.proc.poll() is None


def test_sessions_go_to_the_agent_that_replaces_a_draining_one(site: Site, tmp_path: Path) -> None:
    """The storage's agent is restarted (TERM, and a new one on the same port) while a command
    keeps the proxy's pooled connection to the old one open: the next clone is served by the
    new agent, and the old one finishes its command and exits."""
    kiln, alice = site.world.kiln, site.world.alice
    old = site.agent("relieved")
    site.repo(old, "relieved", "aviato/on-relieved")
    held = hold_upload_pack(kiln, alice, "aviato/on-relieved")
    assert old.proc is not None
    draining = old.proc
    draining.send_signal(signal.SIGTERM)
    old.wait_for_log(r"draining: 1 command\(s\) running")
    kiln.wait_for_log(r"backend relieved: the peer drains a connection \(1 channel\(s\) on it\)")
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "srv").symlink_to(old.base)  # the same repositories, its own log
    new = Agent(tmp_path / "new", site.pki, port=old.port)
    site.agents.append(new)
    new.start()
    kiln.git(alice, "clone", "-q", kiln.url("aviato/on-relieved"), str(tmp_path / "clone"))
    assert (tmp_path / "clone" / "README").read_bytes() == b"hi\n"
    new.wait_for_log(r"\[[0-9a-f]{8}\] exit=0 git-upload-pack \(repo aviato/on-relieved\)")
    assert "refused" not in old.log()  # the proxy asked the old agent for nothing more
    assert finish_upload_pack(held) == 0
    assert release(held) == b""
    assert draining.wait(10) == 0
    assert "agent stopped" in old.log()


def test_a_draining_agent_says_so_and_refuses_new_channels(site: Site) -> None:
    """What a draining agent tells a proxy, frame by frame: DRAINING on the connection as the
    drain begins, DRAINING (not REFUSED) for an OPEN that comes anyway, and the running
    command's channel served to its end, after which the agent closes the connection."""
    agent = site.agent("telling")
    path = str(site.repo(agent, "telling", "aviato/on-telling"))
    env = {"KILNPROXY_SESSION": "5ca1ab1e"}
    upload = OpenRequest("5ca1ab1e", "aviato/on-telling", "git-upload-pack", path, env, 65536)
    with contextlib.closing(tls_to(site, agent)) as tls:
        answers = Answers(tls)
        tls.sendall(upload.encode(1))
        answers.wait_for(Kind.STDOUT, 1)  # the advertisement: the command runs
        assert agent.proc is not None
        agent.proc.send_signal(signal.SIGTERM)
        answers.wait_for(Kind.DRAINING, CONTROL)
        tls.sendall(upload.encode(3))
        answers.wait_for(Kind.DRAINING, 3)
        tls.sendall(frame(Kind.STDIN, 1, b"0000") + frame(Kind.STDIN_EOF, 1))
        answers.wait_for_close()
    assert [(a.kind, a.count()) for a in answers.frames if a.kind is Kind.EXIT] == [(Kind.EXIT, 0)]
    assert [a.kind for a in answers.frames if a.channel == 3] == [Kind.DRAINING]
    assert Kind.REFUSED not in [a.kind for a in answers.frames]
    assert agent.proc.wait(10) == 0
    agent.wait_for_log(r"\[5ca1ab1e\] refused git-upload-pack \(repo aviato/on-telling\): "
                       r"the agent is draining")  # fmt: skip


def capped_agent(site: Site, backend: str, session: str) -> tuple[Agent, OpenRequest]:
    """A started agent that runs one command at a time, added as `backend`, with a repository
    of its own; and the OPEN of an upload-pack of that repository, for `session`."""
    agent = Agent(site.root / backend, site.pki, settings="max_commands = 1\n")
    site.agents.append(agent)
    agent.start()
    site.cli("backends", "add", backend, agent.url)
    repo = f"aviato/on-{backend}"
    path = str(site.repo(agent, backend, repo))
    env = {"KILNPROXY_SESSION": session}
    return agent, OpenRequest(session, repo, "git-upload-pack", path, env, 65536)


def test_commands_beyond_max_commands_are_refused_until_one_ends(site: Site) -> None:
    """The agent's own cap, over all its connections: a proxy with a good certificate (a bug,
    or one in the wrong hands) cannot start more commands at once than the storage server is
    set to run. The one beyond is REFUSED and logged; once a command ends, the next one runs."""
    agent, upload = capped_agent(site, "capped", "c0ffee00")
    with (
        contextlib.closing(tls_to(site, agent)) as first,
        contextlib.closing(tls_to(site, agent)) as second,
    ):
        one, other = Answers(first), Answers(second)
        first.sendall(upload.encode(1))
        one.wait_for(Kind.STDOUT, 1)
        second.sendall(upload.encode(1))
        other.wait_for(Kind.REFUSED, 1)
        first.sendall(upload.encode(3))
        one.wait_for(Kind.REFUSED, 3)
        refused = [a.payload for a in one.frames + other.frames if a.kind is Kind.REFUSED]
        assert refused == [b"busy: 1 command(s) running, [agent] max_commands = 1"] * 2
        first.sendall(frame(Kind.STDIN, 1, b"0000") + frame(Kind.STDIN_EOF, 1))
        one.wait_for(Kind.EXIT, 1)
        second.sendall(upload.encode(3))
        other.wait_for(Kind.STDOUT, 3)  # room again: it runs
    agent.wait_for_log(r"\[c0ffee00\] refused git-upload-pack \(repo aviato/on-capped\): "
                       r"busy: 1 command\(s\) running, \[agent\] max_commands = 1")  # fmt: skip


def test_commands_closed_as_they_start_still_count_until_they_exit(site: Site) -> None:
    """A proxy closes a channel whose command is slow to start (its dial timeout), and an
    aborted command takes its grace to exit: the cap counts commands started and not exited,
    not open channels, or an agent slow to start commands would run more the slower it got."""
    agent, upload = capped_agent(site, "slow-capped", "c0ffee01")
    burst = b"".join(upload.encode(n) + frame(Kind.CLOSE, n) for n in range(1, 21, 2))
    with contextlib.closing(tls_to(site, agent)) as tls:
        answers = Answers(tls)
        tls.sendall(burst)  # ten opened and closed at once: the first one starts
        answers.wait_for(Kind.REFUSED, 19)
        refused = [a.channel for a in answers.frames if a.kind is Kind.REFUSED]
        assert refused == list(range(3, 21, 2))
        deadline = time.monotonic() + 10
        while True:  # room again once the first has exited
            tls.sendall(upload.encode(99))
            answers.wait_for_any(99)
            if answers.frames[-1].kind is not Kind.REFUSED:
                break
            answers.frames.clear()
            assert time.monotonic() < deadline, "the aborted command never made room"
            time.sleep(0.1)
        tls.sendall(frame(Kind.STDIN, 99, b"0000") + frame(Kind.STDIN_EOF, 99))
        answers.wait_for(Kind.EXIT, 99)
        answers.frames.clear()
        tls.sendall(upload.encode(101))
        answers.wait_for(Kind.STDOUT, 101)  # the advertisement: it runs
        # Closed, then another asked for in the same read: the first is aborted, and has yet
        # to exit (the agent hears so on a later pass of its loop).
        tls.sendall(frame(Kind.CLOSE, 101) + upload.encode(103))
        answers.wait_for_any(103)
        assert [a.kind for a in answers.frames if a.channel == 103] == [Kind.REFUSED]
    # The first was closed before its path was checked: it never started. 99 and 101 did.
    assert len(re.findall(r"started git-upload-pack", agent.log())) == 2


def test_a_channel_number_used_again_keeps_its_command(site: Site) -> None:
    """A channel refused after its proxy closed it says nothing: its number may be another
    channel's by then, which goes on (and is aborted with its connection, not left running)."""
    agent = site.agent("renumbered")
    path = str(site.repo(agent, "renumbered", "aviato/on-renumbered"))
    env = {"KILNPROXY_SESSION": "c0ffee02"}
    missing = OpenRequest("c0ffee02", "aviato/on-renumbered", "git-upload-pack",
                          str(agent.base / "nowhere.git"), env, 65536)  # fmt: skip
    upload = OpenRequest("c0ffee02", "aviato/on-renumbered", "git-upload-pack", path, env, 65536)
    with contextlib.closing(tls_to(site, agent)) as tls:
        answers = Answers(tls)
        tls.sendall(missing.encode(5) + frame(Kind.CLOSE, 5) + upload.encode(5))
        answers.wait_for(Kind.STDOUT, 5)  # the advertisement: the second one runs
        assert Kind.REFUSED not in [a.kind for a in answers.frames]
    agent.wait_for_log(r"\[c0ffee02\] aborting git-upload-pack \(repo aviato/on-renumbered\): "
                       r"connection from .* lost")  # fmt: skip


def test_the_start_line_names_the_port_the_system_chose(site: Site) -> None:
    agent = Agent(site.root / "anyport", site.pki)
    agent.config.write_text(agent.config.read_text().replace(f':{agent.port}"', ':0"'))
    site.agents.append(agent)
    agent.start()
    bound = re.search(r"agent listening on 127\.0\.0\.1:(\d+), serving", agent.log())
    assert bound is not None and int(bound[1]) != 0, agent.log()
    socket.create_connection(("127.0.0.1", int(bound[1])), 5).close()


@dataclass
class Answers:
    """What an agent sends on a connection written to by hand, read as the test asks."""

    tls: ssl.SSLSocket
    frames: list[Frame] = field(default_factory=list)
    reader: FrameReader = field(default_factory=FrameReader)

    def wait_for(self, kind: Kind, channel: int) -> None:
        while not any(a.kind is kind and a.channel == channel for a in self.frames):
            data = self.tls.recv(65536)
            assert data, f"closed before {kind.name} on {channel}: {self.frames}"
            self.frames += read_frames(self.reader, data)

    def wait_for_any(self, channel: int) -> None:
        """Until a frame of `channel` has come."""
        while not any(a.channel == channel for a in self.frames):
            data = self.tls.recv(65536)
            assert data, f"closed before anything on {channel}: {self.frames}"
            self.frames += read_frames(self.reader, data)

    def wait_for_close(self) -> None:
        """Until the agent closes the connection (or is silent for the socket's timeout)."""
        with contextlib.suppress(TimeoutError, ssl.SSLError, ConnectionError):
            while data := self.tls.recv(65536):
                self.frames += read_frames(self.reader, data)


def tls_to(site: Site, agent: Agent) -> ssl.SSLSocket:
    """A connection to `agent` with a proxy's certificate, for frames written by hand."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(site.pki.ca)
    context.load_cert_chain(*site.pki.issue("proxy", "proxy"))
    raw = socket.create_connection(("127.0.0.1", agent.port), 5)
    tls = context.wrap_socket(raw, server_hostname="127.0.0.1")
    tls.settimeout(10)
    return tls


def speak(site: Site, agent: Agent, *frames: bytes) -> list[Frame]:
    """A proxy's certificate, and frames written by hand: what the agent answers, until it
    closes the connection or falls silent for a second."""
    with contextlib.closing(tls_to(site, agent)) as tls:
        answers = Answers(tls)
        tls.sendall(b"".join(frames))
        tls.settimeout(1)
        answers.wait_for_close()
    return answers.frames


def test_only_the_local_backends_commands_run(site: Site) -> None:
    """The agent trusts a proxy's certificate, not its requests: a command that is not git's or
    hg's is refused, and so is a variable that is not one of kilnproxy's (git would run what
    GIT_CONFIG_PARAMETERS names as its pack-objects hook), a push without write access, and a
    NUL in a value (which no process environment can hold); a broken frame closes the
    connection."""
    agent = site.agent("strict")
    path = str(site.repo(agent, "strict", "aviato/on-strict"))
    env = {"KILNPROXY_SESSION": "5ca1ab1e"}
    shell = OpenRequest("5ca1ab1e", "aviato/on-strict", "sh", path, env, 65536)
    answers = speak(site, agent, shell.encode(1))
    assert [(a.kind, a.channel) for a in answers] == [(Kind.REFUSED, 1)]
    assert answers[0].payload == b"command 'sh' is not one the agent runs"
    agent.wait_for_log(r"\[5ca1ab1e\] refused sh .* command 'sh' is not one the agent runs")
    hooked = env | {"GIT_CONFIG_PARAMETERS": "'uploadpack.packobjectshook'='touch hooked'"}
    upload = OpenRequest("5ca1ab1e", "aviato/on-strict", "git-upload-pack", path, hooked, 65536)
    answers = speak(site, agent, upload.encode(1))
    assert [(a.kind, a.payload) for a in answers] == [
        (Kind.REFUSED, b"variable 'GIT_CONFIG_PARAMETERS' is not one the agent passes on")
    ]
    agent.wait_for_log(r"\[5ca1ab1e\] refused git-upload-pack .* 'GIT_CONFIG_PARAMETERS'")
    # A push with no write access (hg's are refused by its hook), and a value no process takes.
    reader = env | {"KILNPROXY_ACCESS": "read"}
    push = OpenRequest("5ca1ab1e", "aviato/on-strict", "git-receive-pack", path, reader, 65536)
    nul = OpenRequest("5ca1ab1e", "aviato/on-strict", "git-upload-pack", path,
                      env | {"KILNPROXY_REPO": "a\0b"}, 65536)  # fmt: skip
    answers = speak(site, agent, push.encode(1) + nul.encode(2))
    assert [(a.kind, a.channel, a.payload) for a in answers] == [
        (Kind.REFUSED, 1, b"git-receive-pack without KILNPROXY_ACCESS=write"),
        (Kind.REFUSED, 2, b"a variable's value holds a NUL byte"),
    ]
    assert speak(site, agent, frame(Kind.OPEN, 1, b"{not json")) == []
    agent.wait_for_log(r"proxy 127\.0\.0\.1:\d+: protocol error, closing: OPEN is not JSON")
    assert "started" not in agent.log()


def test_a_proxy_without_its_certificate_says_so(new_world: Callable[..., World]) -> None:
    """[backend_agent] naming files that are not there: every dial says which, in the log;
    the client gets the one line, and the worker goes on serving."""
    missing = {"ca": "/nonexistent/ca.pem", "cert": "/nonexistent/c.pem", "key": "/nonexistent/k"}
    w = new_world({"timeouts": {"dial": "2s"}, "backend_agent": missing})
    config = ["--config", str(w.kiln.config_path)]
    run([*KILNPROXY, "backends", "add", "nowhere", "agent://127.0.0.1:9/srv", *config],
        env=w.kiln.server_env())  # fmt: skip
    run([*KILNPROXY, "repos", "add", "aviato/far", "--vcs", "git", "--backend", "nowhere",
         *config], env=w.kiln.server_env())  # fmt: skip
    done = w.kiln.ssh(w.alice, "git-upload-pack 'aviato/far'")
    assert_unavailable(done, "aviato/far")
    w.kiln.wait_for_log(r"backend nowhere: cannot connect to 127\.0\.0\.1:9: cannot load "
                        r"\[backend_agent\] ca /nonexistent/ca\.pem: ")  # fmt: skip
    assert w.kiln.ssh(w.alice, "git-upload-pack 'aviato/website'", input=b"0000").returncode == 0
    w.kiln.stop()


def test_an_address_still_held_is_tried_again(site: Site, tmp_path: Path) -> None:
    """At boot the storage network's address may not be up yet, or the agent this one replaces
    may still hold the port: the agent tries again each second (for up to 30 s), and says so."""
    holder = socket.create_server(("127.0.0.1", 0))
    port = holder.getsockname()[1]
    agent = Agent(tmp_path / "patient", site.pki, port=port)
    site.agents.append(agent)
    releasing = threading.Timer(2.0, holder.close)
    releasing.start()
    try:
        agent.start()  # returns once it listens; fails if it exits
    finally:
        releasing.cancel()
        holder.close()
    assert (f"cannot listen on 127.0.0.1:{port} yet (Address already in use); trying again "
            "each second for up to 30s") in agent.log()  # fmt: skip
