"""agent:// backends: multiplexed channels on a pooled TLS connection, or one TLS connection
per session with TLS 1.3 resumption? Measured here, in the proxy's own code on uvloop, against
a real `kilnproxy agent` on loopback (issue 14, item 2).

1. Dial cost, per session, in wall time and in the proxy process's CPU time:
   - full: TCP + TLS 1.3 handshake with certificates both ways + one PING/PONG (what the pool
     does to learn that the agent accepted our certificate);
   - resumed: the same with a TLS 1.3 session ticket from an earlier connection. asyncio and
     uvloop have no `session=` for create_connection; both call `SSLContext.wrap_bio`, so a
     context that passes the last ticket to wrap_bio gives real resumption in the real loop
     (`ssl_object.session_reused` is checked);
   - channel: an OPEN on a connection already open, until the agent's CREDIT (it includes the
     agent starting git, which every design pays), and a PING/PONG on it (the floor).
2. CPU per GB relayed (the proxy process's CPU time while a pack streams from the agent through
   AgentBackend into a counting sink): one session; four sessions on one connection; four
   sessions on four connections (what one-connection-per-session would do); and for scale, one
   session through the ssh:// backend to a real OpenSSH sshd serving the same repository.

Run: `.venv/bin/python bench/agent_dial.py [--rounds N] [--mib M]`; prints a table and writes
bench/results/agent_dial.json. The machine is shared: compare figures of one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import uvloop

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from agent import Agent, Pki  # noqa: E402
from harness import keygen, run, seed_git  # noqa: E402
from sshd import Sshd  # noqa: E402

from kilnproxy.backends import Backends  # noqa: E402
from kilnproxy.backends.agent import AgentConnection, client_context  # noqa: E402
from kilnproxy.backends.base import BackendRequest  # noqa: E402
from kilnproxy.backends.frames import CONTROL, Kind, frame  # noqa: E402
from kilnproxy.backends.pool import Link, Pool  # noqa: E402
from kilnproxy.config import from_mapping  # noqa: E402
from kilnproxy.directory.model import Identity, Route  # noqa: E402
from kilnproxy.policy.access import Access, Role  # noqa: E402
from kilnproxy.policy.commands import Vcs, Verb  # noqa: E402

RESULTS = ROOT / "bench" / "results"


class ResumingContext(ssl.SSLContext):
    """Hands the last session ticket to every new TLS connection (asyncio has no session=)."""

    session: ssl.SSLSession | None = None

    def wrap_bio(self, *args: Any, **kwargs: Any) -> ssl.SSLObject:
        kwargs["session"] = self.session
        return super().wrap_bio(*args, **kwargs)


def resuming_context(ca: Path, cert: Path, key: Path) -> ResumingContext:
    context = ResumingContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_verify_locations(cafile=ca)
    context.load_cert_chain(cert, key)
    return context


class Counter:
    """A relay's side that takes everything at once and counts it."""

    def __init__(self) -> None:
        self.bytes = 0
        self.done: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    def backend_stdout(self, data: bytes) -> None:
        self.bytes += len(data)

    def backend_stderr(self, data: bytes) -> None:
        pass

    def backend_pause_input(self) -> None:
        pass

    def backend_resume_input(self) -> None:
        pass

    def backend_finished(self, exit_status: int) -> None:
        self.done.set_result(exit_status)

    def backend_lost(self, error: Exception) -> None:
        self.done.set_exception(error)


async def dial(port: int, context: ssl.SSLContext) -> AgentConnection:
    """One dial as the pool makes it: TCP, TLS, PING/PONG."""
    pool: Pool[AgentConnection] = Pool("bench", ("127.0.0.1", port), _never, 1, 60, 10)
    link: Link[AgentConnection] = Link(pool)
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_connection(
        lambda: AgentConnection(link, 60), "127.0.0.1", port, ssl=context,
        server_hostname="127.0.0.1",
    )  # fmt: skip
    await conn.answered
    return conn


async def _never(link: Link[AgentConnection]) -> AgentConnection:
    raise AssertionError("not used")


def clocks() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


async def measure_dials(
    port: int, pki_paths: tuple[Path, Path, Path], rounds: int
) -> dict[str, Any]:
    ca, cert, key = pki_paths
    full_ctx = client_context(ca, cert, key)
    resume_ctx = resuming_context(ca, cert, key)
    out: dict[str, Any] = {}
    for name in ("full", "resumed"):
        walls, cpus, reused = [], [], 0
        for _ in range(rounds):
            wall, cpu = clocks()
            conn = await dial(port, full_ctx if name == "full" else resume_ctx)
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
            assert conn.transport is not None
            tls = conn.transport.get_extra_info("ssl_object")
            reused += bool(tls.session_reused)
            if name == "resumed":
                resume_ctx.session = tls.session  # the ticket arrived with the PONG
            conn.close()
            await asyncio.sleep(0.01)
        out[name] = summary(walls, cpus) | {"session_reused": reused, "rounds": rounds}
    return out


def summary(walls: list[float], cpus: list[float]) -> dict[str, float]:
    return {
        "wall_ms_median": round(statistics.median(walls) * 1000, 3),
        "cpu_ms_median": round(statistics.median(cpus) * 1000, 3),
    }


def request(repo_path: Path, session: str = "0badf00d") -> BackendRequest:
    route = Route("bench/big", Vcs.GIT, "agent", "agent://x", str(repo_path), Access.READ)
    who = Identity("bench", "bench", Role.READ, "key", "SHA256:x")
    return BackendRequest(session, Verb.UPLOAD_PACK, route, who, None)


def backends(
    home: Path, settings: dict[str, Any], sessions: int, ssh: dict[str, Any] | None = None
) -> Backends:
    raw = {"backend_agent": {**settings, "max_sessions_per_connection": sessions}}
    config = from_mapping({**raw, "backend_ssh": ssh or {}}, home)
    return Backends(home / "state", config.backend_ssh, config.backend_agent, 10.0)


async def measure_channels(
    url: str, home: Path, settings: dict[str, Any], repo: Path, rounds: int
) -> dict[str, Any]:
    made = backends(home, settings, 8)
    route = request(repo).route
    backend = made.for_route(Route(route.repo, route.vcs, "agent", url, route.path, route.access))
    walls, cpus, pings, ping_cpus = [], [], [], []
    for i in range(rounds + 1):
        sink = Counter()
        wall, cpu = clocks()
        stream = await backend.open(request(repo), sink)
        if i:  # the first one dials
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
        stream.write(b"0000")
        stream.write_eof()
        await sink.done
        link = made._by_key[("agent", url)].pool.links[0]  # type: ignore[attr-defined]
        conn: AgentConnection = link.conn
        conn.answered = asyncio.get_running_loop().create_future()
        wall, cpu = clocks()
        conn.send(frame(Kind.PING, CONTROL))
        await conn.answered
        pings.append(time.perf_counter() - wall)
        ping_cpus.append(time.process_time() - cpu)
    await made.close()
    return {"channel": summary(walls, cpus), "ping": summary(pings, ping_cpus)}


def pack_request(head: str) -> bytes:
    want = f"want {head}\n".encode()
    done = b"done\n"
    return b"%04x" % (len(want) + 4) + want + b"0000" + b"%04x" % (len(done) + 4) + done


async def measure_relay(
    url: str, home: Path, settings: dict[str, Any], repo: Path, head: str, sessions: int,
    per_connection: int, ssh: dict[str, Any] | None = None,
) -> dict[str, Any]:  # fmt: skip
    made = backends(home, settings, per_connection, ssh)
    route = request(repo).route
    name = "ssh" if url.startswith("ssh:") else "agent"
    backend = made.for_route(Route(route.repo, route.vcs, name, url, route.path, route.access))
    warm = Counter()  # dial first: the handshake is not what this measures
    stream = await backend.open(request(repo), warm)
    stream.write(b"0000")
    stream.write_eof()
    await warm.done
    sinks = [Counter() for _ in range(sessions)]
    wall, cpu = clocks()
    for sink in sinks:
        stream = await backend.open(request(repo), sink)
        stream.write(pack_request(head))
        stream.write_eof()
    statuses = await asyncio.gather(*(sink.done for sink in sinks))
    took, used = time.perf_counter() - wall, time.process_time() - cpu
    assert statuses == [0] * sessions, statuses
    total = sum(sink.bytes for sink in sinks)
    connections = made.statistics()[name]["dials"]
    await made.close()
    return {
        "backend": name,
        "sessions": sessions,
        "connections": connections,
        "bytes": total,
        "cpu_s_per_gb": round(used / (total / 1e9), 3),
        "mb_per_s": round(total / 1e6 / took, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--mib", type=int, default=256)
    args = parser.parse_args()
    logging.getLogger("kilnproxy.backend").setLevel(logging.ERROR)  # closing is not news here
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pki = Pki(root / "pki")
        agent = Agent(root / "agent", pki)
        repo = agent.base / "bench" / "big.git"
        repo.parent.mkdir(parents=True)
        run(["git", "init", "-q", "--bare", "--initial-branch=main", str(repo)])
        head = seed_git(repo, root / "seed", {"big.bin": os.urandom(args.mib << 20)})
        run(["git", "--git-dir", str(repo), "repack", "-adq"])
        agent.start()
        sshd = Sshd(root / "sshd")
        sshd.authorize(keygen(root / "proxy_key").with_suffix(".pub").read_text())
        host_key = sshd.host_key.with_suffix(".pub").read_text().split()[:2]
        (root / "known_hosts").write_text(f"[127.0.0.1]:{sshd.port} {' '.join(host_key)}\n")
        sshd.start()
        ssh = {"key": str(root / "proxy_key"), "known_hosts": str(root / "known_hosts")}
        ssh_url = f"ssh://root@127.0.0.1:{sshd.port}{agent.base}"
        try:
            results = uvloop.run(measure(agent, pki, root, repo, head, args.rounds))
            results["relay"].append(
                uvloop.run(measure_relay(ssh_url, root / "home", {}, repo, head, 1, 8, ssh))
            )
        finally:
            agent.stop()
            sshd.stop()
    results["machine"] = {"cpus": os.cpu_count(), "openssl": ssl.OPENSSL_VERSION}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "agent_dial.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


async def measure(
    agent: Agent, pki: Pki, root: Path, repo: Path, head: str, rounds: int
) -> dict[str, Any]:
    settings = pki.proxy_settings()
    paths = (Path(settings["ca"]), Path(settings["cert"]), Path(settings["key"]))
    out: dict[str, Any] = {"dial": await measure_dials(agent.port, paths, rounds)}
    out |= await measure_channels(agent.url, root / "home", settings, repo, rounds // 4)
    out["relay"] = [
        await measure_relay(agent.url, root / "home", settings, repo, head, 1, 8),
        await measure_relay(agent.url, root / "home", settings, repo, head, 4, 8),
        await measure_relay(agent.url, root / "home", settings, repo, head, 4, 1),
    ]
    return out


if __name__ == "__main__":
    main()
