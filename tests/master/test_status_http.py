"""The intranet status server (SPEC 7): endpoints, metrics, profiling, and the dashboard."""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import World, make_world
from harness import finish_upload_pack, hold_upload_pack
from prometheus_client.parser import text_string_to_metric_families

from kilnproxy.policy.admission import Refusal
from kilnproxy.policy.commands import Vcs

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"
VERSION = re.compile(r"^\d+\.\d+\.\d+\.[0-9a-f]{7,}\.\d{8}T\d{6}Z$")


@pytest.fixture(scope="module")
def status_world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = make_world(tmp_path_factory.mktemp("status"), {"workers": {"count": 2}})
    yield w
    w.kiln.stop()


def base(w: World) -> str:
    return f"http://127.0.0.1:{w.kiln.http_port}"


def get(w: World, path: str, method: str = "GET") -> tuple[int, bytes]:
    request = urllib.request.Request(base(w) + path, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as error:
        with error:
            return int(error.code), bytes(error.read())


def get_json(w: World, path: str) -> Any:
    status, body = get(w, path)
    assert status == 200, (path, status, body)
    return json.loads(body)


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return result


def hold(w: World) -> subprocess.Popen[bytes]:
    return hold_upload_pack(w.kiln, w.alice)


def row_of(w: World, repo: str = "aviato/website") -> dict[str, Any]:
    def find() -> dict[str, Any] | None:
        return next((r for r in get_json(w, "/connections") if r["repo"] == repo), None)

    found: dict[str, Any] = wait_for(find, 10, "the session row")
    return found


def test_info(status_world: World) -> None:
    first = get_json(status_world, "/info")
    assert VERSION.match(first["version"]), first["version"]
    assert re.fullmatch(r"[0-9a-f]{7,}", first["commit"]) and isinstance(first["commit_count"], int)
    assert re.fullmatch(r"\d{8}T\d{6}Z", first["build_date"])
    assert isinstance(first["started_at"], float) and isinstance(first["now"], float)
    assert first["now"] >= first["started_at"]
    assert re.fullmatch(r"(\d+h)?(\d+m)?(\d+s)?", first["uptime"])
    assert first["fast_path"] == "on"  # both workers, on the pinned asyncssh
    time.sleep(2.2)
    second = get_json(status_world, "/info")
    assert second["now"] > first["now"] and second["uptime"] != first["uptime"]


def test_connections_and_ending_one(status_world: World) -> None:
    w = status_world
    with hold(w) as client:
        row = row_of(w)
        expected = {
            "session", "worker", "remote_addr", "login", "account", "user", "key_name",
            "key_fingerprint", "repo", "vcs", "verb", "backend", "started_at", "duration",
            "bytes_in", "bytes_out",
        }  # fmt: skip
        assert expected <= set(row)
        assert (row["account"], row["user"], row["key_name"]) == (
            "aviato",
            "alice",
            "alice's laptop",
        )
        assert (row["vcs"], row["verb"], row["backend"]) == ("git", "git-upload-pack", "local")
        assert row["key_fingerprint"].startswith("SHA256:") and row["bytes_out"] > 0
        status, body = get(w, f"/connections/{row['session']}", method="DELETE")
        assert status == 200, body
        assert client.wait(timeout=10) == 1
        assert client.stderr is not None
        message = client.stderr.read().decode().strip()
    assert message == f"kilnproxy: session ended by an administrator (session {row['session']})"
    w.kiln.wait_for_log(rf"\[{row['session']}\] access .*outcome=cut")


def metric_values(w: World) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, body = get(w, "/metrics")
    assert status == 200
    values = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


def test_metrics_parse_and_move_with_a_clone(status_world: World, tmp_path: Path) -> None:
    w = status_world
    before = metric_values(w)
    ok = ("kilnproxy_sessions_total", (("outcome", "ok"),))
    out = ("kilnproxy_relayed_bytes_total", (("direction", "out"),))
    lookups = ("kilnproxy_route_lookup_seconds_count", ())
    w.kiln.git(w.alice, "clone", "-q", w.kiln.url("aviato/website"), str(tmp_path / "c"))

    def moved() -> bool:
        now = metric_values(w)
        return all(now.get(k, 0) > before.get(k, 0) for k in (ok, out, lookups))

    wait_for(moved, 10, "the counters to move")
    now = metric_values(w)
    assert now[("kilnproxy_workers", ())] == 2
    fast_path = {state: now[("kilnproxy_fast_path_workers", (("state", state),))]
                 for state in ("on", "disabled", "unsupported", "not applied")}  # fmt: skip
    assert fast_path == {"on": 2, "disabled": 0, "unsupported": 0, "not applied": 0}
    assert ("kilnproxy_worker_rss_bytes", (("worker", "0"),)) in now
    labels = {label for key in now for label, _ in key[1]}
    assert labels <= {
        "vcs", "verb", "outcome", "direction", "backend", "worker", "version", "le", "reason",
        "state",
    }  # fmt: skip
    # Every admission refusal reason is a series from the start, at zero until one happens.
    refused = {dict(key[1])["reason"]: value for key, value in now.items()
               if key[0] == "kilnproxy_admission_refusals_total"}  # fmt: skip
    assert refused == dict.fromkeys([r.value for r in Refusal], 0.0)
    assert now[("kilnproxy_unauthenticated_connections", ())] == 0
    assert now[("kilnproxy_penalised_sources", ())] == 0


def test_the_session_that_ends_a_drain_is_counted(tmp_path: Path) -> None:
    """A replaced worker exits as its last session ends, within milliseconds, before its next
    heartbeat: the one it sends as it goes, read before the master counts it gone, carries
    that session and its bytes into the totals."""
    w = make_world(tmp_path, {"workers": {"count": 1}})
    ok = ("kilnproxy_sessions_total", (("outcome", "ok"),))
    try:
        with hold(w) as client:
            row_of(w)
            before = metric_values(w).get(ok, 0)
            old = w.kiln.workers()[0]["pid"]
            assert w.kiln.proc is not None
            w.kiln.proc.send_signal(signal.SIGHUP)
            w.kiln.wait_for_log(r"rolling restart to generation \d+ complete")
            assert finish_upload_pack(client) == 0
        w.kiln.wait_for_log(rf"worker 0 \(pid {old}\) exited 0 after draining")
        assert metric_values(w).get(ok, 0) == before + 1
    finally:
        w.kiln.stop()


def test_a_worker_that_drains_for_a_hup_waits_for_its_session_and_can_be_dumped(
    tmp_path: Path,
) -> None:
    """The old worker of a slot waits for its session past the drain timeout (SPEC 6: a HUP
    cuts none); `?pid=` reaches it for a task dump, which shows that session. Without it, the
    slot's new worker answers; each answer names its pid."""
    w = make_world(tmp_path, {"workers": {"count": 1}, "timeouts": {"drain": "1s"}})
    try:
        with hold(w) as client:
            row = row_of(w)
            old = w.kiln.workers()[0]["pid"]
            assert w.kiln.proc is not None
            w.kiln.proc.send_signal(signal.SIGHUP)
            w.kiln.wait_for_log(r"rolling restart to generation \d+ complete")
            time.sleep(1.5)  # past the drain timeout
            new = get_json(w, "/debug/workers/0/tasks")
            assert new["pid"] != old and row["session"] not in json.dumps(new["sessions"])
            dump = get_json(w, f"/debug/workers/0/tasks?pid={old}")
            assert dump["pid"] == old and row["session"] in json.dumps(dump["sessions"])
            assert get(w, "/debug/workers/0/tasks?pid=1")[0] == 404
            assert finish_upload_pack(client) == 0
        w.kiln.wait_for_log(rf"worker 0 \(pid {old}\) exited 0 after draining")
    finally:
        w.kiln.stop()


def test_task_dump_shows_a_waiting_session(tmp_path: Path) -> None:
    w = make_world(tmp_path, {"timeouts": {"dial": "20s"}})
    try:
        with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts, never speaks SSH
            port = silent.getsockname()[1]
            (w.kiln.home / "backend_known_hosts").touch()  # trusts nobody; the dial waits
            with w.kiln.directory() as directory:
                directory.add_backend("hung", f"ssh://git@127.0.0.1:{port}/srv")
                directory.add_repo("aviato/stuck", Vcs.GIT, "hung", None)
            with w.kiln.ssh_popen(w.alice, "git-upload-pack 'aviato/stuck'") as client:
                row = row_of(w, "aviato/stuck")
                dump = get_json(w, "/debug/workers/0/tasks")
                task = next(
                    t for t in dump["tasks"] if t["name"].startswith(f"session {row['session']}")
                )
                assert any("kilnproxy/backends/pool.py" in frame for frame in task["stack"]), task
                assert any("kilnproxy/ssh/relay.py" in frame for frame in task["stack"])
                assert any(s["session"] == row["session"] for s in dump["sessions"])
                client.kill()
    finally:
        w.kiln.stop()


def test_heap_profile_on_demand_and_stops(status_world: World) -> None:
    w = status_world
    first = get_json(status_world, "/debug/workers/0/heap?seconds=2&top=10")
    assert first["tracing"] is True
    time.sleep(1.0)
    second = get_json(w, "/debug/workers/0/heap?seconds=2&top=10")
    assert second["sites"], second
    site = second["sites"][0]
    assert site["size"] > 0 and site["count"] > 0 and site["traceback"]
    stopped = get_json(w, "/debug/workers/0/heap?stop=1")
    assert stopped == {"tracing": False, "sites": [], "pid": first["pid"]}
    get_json(w, "/debug/workers/0/heap?seconds=1")
    time.sleep(1.5)  # the time limit stops it by itself
    assert get_json(w, "/debug/workers/0/heap?peek=1")["tracing"] is False


def test_memory_history_holds_a_sample_per_second(status_world: World) -> None:
    time.sleep(3.5)
    history = get_json(status_world, "/debug/memory")["workers"]
    assert set(history) == {"0", "1"}
    for samples in history.values():
        assert len(samples) >= 3
        gaps = [b["t"] - a["t"] for a, b in zip(samples[-4:], samples[-3:], strict=False)]
        assert all(0.7 < gap < 1.5 for gap in gaps), gaps
        assert {"rss", "heap", "sessions", "tasks"} <= set(samples[-1])
        assert samples[-1]["rss"] > samples[-1]["heap"] > 0


def test_bound_to_its_address_and_malformed_requests_get_4xx(status_world: World) -> None:
    w = status_world
    assert w.kiln.proc is not None
    sockets = psutil.Process(w.kiln.proc.pid).net_connections("tcp")
    listening = [s for s in sockets if s.status == psutil.CONN_LISTEN]
    listening = [s for s in listening if s.laddr.port == w.kiln.http_port]
    assert [c.laddr.ip for c in listening] == ["127.0.0.1"]
    for method, path, expected in [
        ("DELETE", "/connections/not-hex", 400),
        ("DELETE", "/connections/deadbeef", 404),
        ("GET", "/debug/workers/99/tasks", 404),
        ("GET", "/debug/workers/x/tasks", 400),
        ("GET", "/debug/workers/0/heap?top=many", 400),
        ("GET", "/debug/workers/0/heap?seconds=99999", 400),
        ("GET", "/debug/memory?since=yesterday", 400),
        ("GET", "/static/../../etc/passwd", 404),
        ("GET", "/nothing-here", 404),
        ("POST", "/info", 405),
    ]:
        status, body = get(w, path, method)
        assert status == expected, (method, path, status, body)
    with socket.create_connection(("127.0.0.1", w.kiln.http_port), timeout=10) as sock:
        sock.sendall(b"GET /info HTTP/1.1\r\nHost: x\r\nX-Huge: " + b"a" * 100_000 + b"\r\n\r\n")
        reply = sock.recv(200)
    assert re.match(rb"HTTP/1\.[01] 4\d\d ", reply), reply
    assert get_json(w, "/info")["version"]  # still serving


def test_a_worker_answers_one_debug_request_at_a_time(status_world: World) -> None:
    """A dump blocks the worker's loop while it runs: a second request for the same worker,
    while one is under way, is turned away at once (503), not queued behind it."""
    w = status_world
    pid = next(r["pid"] for r in w.kiln.workers() if r["index"] == 0)
    os.kill(pid, signal.SIGSTOP)  # the first request waits, for well under a heartbeat timeout
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            asked = [pool.submit(get, w, "/debug/workers/0/tasks")]
            time.sleep(0.2)
            asked.append(pool.submit(get, w, "/debug/workers/0/tasks"))
            # Whichever reached the worker second is turned away at once, the other waits.
            done, waiting = concurrent.futures.wait(asked, timeout=5, return_when="FIRST_COMPLETED")
            assert len(done) == 1 and len(waiting) == 1, "neither was turned away"
            status, body = done.pop().result()
            assert status == 503 and b"answering another request" in body, (status, body)
            os.kill(pid, signal.SIGCONT)
            assert waiting.pop().result(timeout=15)[0] == 200
    finally:
        os.kill(pid, signal.SIGCONT)
    assert get(w, "/debug/workers/0/tasks")[0] == 200


def test_dashboard_in_headless_chromium(status_world: World, tmp_path: Path) -> None:
    assert shutil.which("chromium"), "Debian's chromium is missing: `make test` installs it"
    w = status_world
    with hold(w) as client:
        row = row_of(w)
        time.sleep(2.5)  # a few memory samples to draw
        flags = [
            "chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", "--hide-scrollbars",
            "--window-size=1280,820", "--virtual-time-budget=5000", "--enable-logging=stderr",
            "--v=0",
        ]  # fmt: skip
        env = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
        dom = subprocess.run([*flags, "--dump-dom", base(w) + "/"], env=env, capture_output=True,
                             text=True, timeout=120, check=False)  # fmt: skip
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "dashboard.png"
        subprocess.run([*flags, f"--screenshot={shot}", base(w) + "/"], env=env,
                       capture_output=True, timeout=120, check=False)  # fmt: skip
        assert finish_upload_pack(client) == 0
    console = [line for line in dom.stderr.splitlines() if ":CONSOLE" in line]
    assert console == [], console
    html = dom.stdout
    for chart in ("memory-chart", "sessions-chart"):
        svg = re.search(rf'<svg id="{chart}".*?</svg>', html, re.S)
        assert svg and re.search(r'<polyline points="[\d., ]{10,}', svg.group(0)), chart
    assert f'data-session="{row["session"]}"' in html and "end session" in html
    assert get_json(w, "/info")["version"] in html
    assert shot.stat().st_size > 10_000


CHROMIUM = [
    "chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--allow-file-access-from-files",
]  # fmt: skip


def test_the_charts_take_an_hour_of_many_workers(tmp_path: Path) -> None:
    """An hour of samples of 24 workers (2 x 24 x 3600 points in the memory chart) is drawn:
    spread into one Math.min call, so many arguments threw a RangeError and froze the page."""
    script = REPO / "master" / "static" / "dashboard.js"
    page = tmp_path / "charts.html"
    page.write_text(f"""<!doctype html><title>-</title><div id="status"></div><svg id="c"></svg>
<script src="{script.as_uri()}"></script>
<script>
const now = Date.now() / 1000, lines = [];
for (let w = 0; w < 24; w++) {{
  const points = [];
  for (let i = 0; i < 3600; i++) points.push([now - 3600 + i, 1e6 * (w + 1) + i]);
  lines.push({{color: "#000", points}}, {{color: "#000", dashed: true, points}});
}}
try {{
  chart(document.getElementById("c"), lines, String);
  document.title = "drawn " + document.querySelectorAll("#c polyline").length;
}} catch (error) {{
  document.title = "failed: " + error;
}}
</script>""")
    env = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    dom = subprocess.run([*CHROMIUM, f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom",
                          page.as_uri()], env=env, capture_output=True, text=True, timeout=120,
                         check=False)  # fmt: skip
    assert "<title>drawn 48</title>" in dom.stdout, dom.stdout[:300]


def test_json_logs_carry_the_session_everywhere(tmp_path: Path) -> None:
    w = make_world(tmp_path, {"log": {"format": "json"}})
    try:
        w.kiln.git(w.alice, "clone", "-q", w.kiln.url("aviato/website"), str(tmp_path / "c"))
        w.kiln.wait_for_log(r'"logger": "kilnproxy.access"')
    finally:
        w.kiln.stop()
    records = [json.loads(line) for line in w.kiln.log().splitlines() if line.startswith("{")]
    access = next(r for r in records if r["logger"] == "kilnproxy.access")
    assert (access["repo"], access["verb"], access["outcome"], access["exit"]) == (
        "aviato/website", "git-upload-pack", "ok", 0,
    )  # fmt: skip
    assert access["user"] == "alice" and access["key_name"] == "alice's laptop"
    session = access["session"]
    about = [r for r in records if r.get("session") == session]
    assert {r["logger"] for r in about} >= {"kilnproxy.session", "kilnproxy.access"}
    assert all(re.fullmatch(r"[0-9a-f]{8}", r["session"]) for r in records if "session" in r)
