"""The pre-fork master (SPEC 6): real `kilnproxy serve` processes receiving real signals."""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import World
from harness import (
    KILNPROXY,
    Kiln,
    finish_upload_pack,
    gone,
    hold_upload_pack,
    run,
    wait_until,
)

Factory = Callable[..., World]


def title(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()


def held_session(w: World) -> subprocess.Popen[bytes]:
    return hold_upload_pack(w.kiln, w.alice)


def kill_if_running(client: subprocess.Popen[bytes]) -> None:
    if client.poll() is None:
        client.kill()


def owner_of_held(w: World) -> int:
    wait_until(lambda: any(r["repo"] for r in w.kiln.connections()), 10, "the session row")
    row = next(r for r in w.kiln.connections() if r["repo"])
    return int(next(x["pid"] for x in w.kiln.workers() if x["index"] == row["worker"]))


def test_three_workers_status_and_connections(new_world: Factory) -> None:
    w = new_world({"workers": {"count": 3}})
    kiln = w.kiln
    assert kiln.proc is not None
    assert title(kiln.proc.pid) == "kilnproxy: master"
    workers = kiln.workers()
    assert sorted(x["index"] for x in workers) == [0, 1, 2]
    for worker in workers:
        assert title(worker["pid"]) == f"kilnproxy: worker {worker['index']} (0 sessions)"
    env = kiln.server_env()
    status = run([*KILNPROXY, "status", "--config", str(kiln.config_path)], env=env).stdout.decode()
    assert status.splitlines()[0].endswith(", fast path on")
    for worker in workers:
        assert re.search(
            rf"^\s+{worker['index']}\s+{worker['pid']}\s+0\s+\d+\s+[\d.]+ MiB\s+on$", status, re.M
        )
    with held_session(w) as client:
        pid = owner_of_held(w)
        listing = run([*KILNPROXY, "connections", "--config", str(kiln.config_path)], env=env)
        line = listing.stdout.decode()
        assert "aviato/alice" in line and 'key "alice\'s laptop"' in line
        assert "git-upload-pack aviato/website" in line
        wait_until(lambda: "(1 sessions)" in title(pid), 5, "the title to count the session")
        assert finish_upload_pack(client) == 0
    kiln.send(signal.SIGUSR1)  # every process reopens its log
    wait_until(lambda: kiln.log().count("reopened its log") == 3, 10, "three reopened logs")


def test_workers_of_a_dead_master_drain_and_exit(new_world: Factory) -> None:
    w = new_world({"workers": {"count": 2}})
    kiln = w.kiln
    pids = [x["pid"] for x in kiln.workers()]
    with held_session(w) as client:
        owner = owner_of_held(w)
        kiln.send(signal.SIGKILL)
        assert kiln.proc is not None and kiln.proc.wait(timeout=10) == -signal.SIGKILL
        for pid in pids:
            if pid != owner:
                wait_until(gone(pid), 10, "the idle worker to exit")
        assert not gone(owner)()  # draining: its session is still running
        assert finish_upload_pack(client) == 0
    wait_until(gone(owner), 10, "the last worker to exit")
    assert kiln.log().count("master gone, draining") == 2


def test_kill_9_fails_one_session_and_is_replaced(new_world: Factory, tmp_path: Path) -> None:
    w = new_world({"workers": {"count": 2}})
    kiln = w.kiln
    with held_session(w) as victim_client:
        victim = owner_of_held(w)
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        failures: list[str] = []
        stop = threading.Event()

        def clone_loop() -> int:
            done = 0
            while not stop.is_set():
                target = tmp_path / f"c{done}"
                result = kiln.git(
                    w.alice, "clone", "-q", kiln.url("aviato/website"), str(target), check=False
                )
                if result.returncode != 0:
                    failures.append(result.stderr.decode())
                done += 1
            return done

        with ThreadPoolExecutor(1) as pool:
            loop = pool.submit(clone_loop)
            wait_until(
                lambda: len([x for x in kiln.workers() if x["state"] == "ready"]) == 2
                and victim not in [x["pid"] for x in kiln.workers()],
                10, "a replacement",
            )  # fmt: skip
            replaced_in = time.monotonic() - killed_at
            time.sleep(0.5)
            stop.set()
            clones = loop.result(timeout=60)
        assert victim_client.wait(timeout=10) != 0  # only the session on the dead worker failed
    assert failures == [] and clones > 0
    assert replaced_in < 2.0, replaced_in
    kiln.wait_for_log(rf"worker \d \(pid {victim}\) died with status -9")


def test_stopped_worker_is_killed_with_its_stacks_and_the_watchdog_pauses(
    new_world: Factory, notify: NotifyListener
) -> None:
    w = new_world({"workers": {"count": 2}}, env=notify.env(watchdog_usec=1_000_000))
    kiln = w.kiln
    notify.wait_for("READY=1")
    victim = kiln.workers()[0]["pid"]
    os.kill(victim, signal.SIGSTOP)
    stopped_at = time.monotonic()
    wait_until(
        lambda: victim not in [x["pid"] for x in kiln.workers()], 25, "the stopped worker to go"
    )
    gone_after = time.monotonic() - stopped_at
    # 10 s of silence, counted from the last heartbeat, which came up to 1 s before the stop.
    assert 9 <= gone_after < 20, gone_after
    kiln.wait_ready(2)
    log = kiln.log()
    assert re.search(rf"worker \d \(pid {victim}\) silent for \d+s: SIGABRT", log)
    assert (
        "Fatal Python error: Aborted" in log
        and "File " in log.split("Fatal Python error: Aborted")[1]
    )
    # WATCHDOG=1 came every 0.5 s while healthy, and paused while the worker was stopped.
    pings = notify.times("WATCHDOG=1")
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert max(gaps) > 5, gaps
    assert any(t > stopped_at + gone_after for t in pings)  # and resumed after


def test_a_workers_stacks_go_to_the_log_file_after_a_rotation(
    new_world: Factory, tmp_path: Path
) -> None:
    """faulthandler's file is reopened with the log (USR1): a hung worker's stacks went to
    the rotated file, and once it was deleted, nowhere, its disk space held by the worker."""
    log_file = tmp_path / "kiln.log"
    w = new_world({"workers": {"count": 1}, "log": {"file": str(log_file)}})
    kiln = w.kiln
    victim = kiln.workers()[0]["pid"]
    log_file.rename(tmp_path / "kiln.log.1")
    kiln.send(signal.SIGUSR1)
    wait_until(lambda: log_file.exists() and "worker 0 reopened its log" in log_file.read_text(),
               10, "the worker's log reopened")  # fmt: skip
    (tmp_path / "kiln.log.1").unlink()
    rotated = str(tmp_path / "kiln.log.1 (deleted)")

    def let_go() -> bool:
        return all(os.readlink(fd) != rotated for fd in Path(f"/proc/{victim}/fd").iterdir())

    wait_until(let_go, 5, "the rotated file let go")
    os.kill(victim, signal.SIGABRT)
    wait_until(lambda: "Fatal Python error: Aborted" in log_file.read_text(), 10, "the stacks")


def test_term_finishes_the_clone_and_refuses_new_connections(new_world: Factory) -> None:
    w = new_world({"workers": {"count": 2}})
    kiln = w.kiln
    with held_session(w) as client:
        owner_of_held(w)
        kiln.send(signal.SIGTERM)
        # Master and workers each let go of the listening socket as they take the drain in.
        draining = re.compile(r"worker \d draining \d+ sessions")
        wait_until(lambda: len(draining.findall(kiln.log())) == 2, 10, "both workers draining")
        time.sleep(0.2)
        refused = kiln.ssh(w.alice, "git-upload-pack 'aviato/website'", input=b"0000")
        assert refused.returncode == 255
        assert "Connection refused" in refused.stderr.decode()
        assert kiln.proc is not None and kiln.proc.poll() is None
        assert finish_upload_pack(client) == 0
    assert kiln.proc.wait(timeout=15) == 0


def test_a_worker_that_dies_during_a_drain_notice_is_replaced(new_world: Factory) -> None:
    """SPEC 6: through a drain notice the host serves on, so a worker that dies meanwhile is
    replaced as at any other time, and its replacement fails the health checks too."""
    w = new_world({
        "workers": {"count": 2},
        "timeouts": {"drain_notice": "60s"},
        "ssh": {"proxy_protocol": "optional", "proxy_allowed": ["192.0.2.0/24"]},
    })  # fmt: skip
    kiln = w.kiln
    kiln.send(signal.SIGTERM)
    told = "fails health checks: a drain is coming"
    wait_until(lambda: kiln.log().count(told) == 2, 10, "both workers told of the drain")
    victim = kiln.workers()[0]["pid"]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: kiln.log().count(told) == 3, 10, "a replacement, told of the drain")
    workers = kiln.workers()
    assert victim not in [x["pid"] for x in workers]
    assert [x["state"] for x in workers] == ["ready", "ready"]
    served = kiln.ssh(w.alice, "git-upload-pack 'aviato/website'", input=b"0000")
    assert served.returncode == 0 and b"refs/heads/main" in served.stdout
    kiln.send(signal.SIGINT)
    assert kiln.proc is not None and kiln.proc.wait(timeout=10) == 0


def test_hup_rolling_restart_drops_nothing(new_world: Factory, tmp_path: Path) -> None:
    w = new_world({"workers": {"count": 2}})
    kiln = w.kiln
    before = {x["pid"] for x in kiln.workers()}
    failures: list[str] = []
    count = iter(range(50))
    lock = threading.Lock()

    def clone_loop() -> None:
        while True:
            with lock:
                i = next(count, None)
            if i is None:
                return
            result = kiln.git(
                w.alice,
                "clone",
                "-q",
                kiln.url("aviato/website"),
                str(tmp_path / f"c{i}"),
                check=False,
            )
            if result.returncode != 0:
                failures.append(result.stderr.decode())

    with held_session(w) as survivor, ThreadPoolExecutor(4) as pool:
        owner_of_held(w)
        clients = [pool.submit(clone_loop) for _ in range(4)]
        time.sleep(0.3)
        kiln.send(signal.SIGHUP)
        for client in clients:
            client.result(timeout=300)
        wait_until(lambda: not before & {x["pid"] for x in kiln.workers() if x["state"] == "ready"},
                   30, "every worker to be replaced")  # fmt: skip
        assert finish_upload_pack(survivor) == 0  # opened before the HUP, finished after it
    assert failures == []
    kiln.wait_for_log(r"rolling restart to generation 1 complete")


def test_a_log_rotation_while_workers_boot_ends_none(new_world: Factory) -> None:
    """USR1's default action ends a process, and a worker installs its handler only once its
    imports and configuration are done (half a second or more): one that is booting gets the
    signal blocked, and acts on it once it runs, instead of dying."""
    w = new_world({"workers": {"count": 2}})
    kiln = w.kiln
    kiln.send(signal.SIGHUP)  # a rolling restart: new workers boot, one after the other
    deadline = time.monotonic() + 30
    while "rolling restart to generation 1 complete" not in kiln.log():
        assert time.monotonic() < deadline, kiln.log()
        kiln.send(signal.SIGUSR1)  # as a log rotation would, at any time
        time.sleep(0.05)
    assert "died with status" not in kiln.log()
    assert {x["state"] for x in kiln.workers() if x["generation"] == 1} == {"ready"}


def test_hup_with_a_broken_config_changes_nothing(new_world: Factory) -> None:
    w = new_world({"workers": {"count": 2}})
    kiln = w.kiln
    before = {x["pid"] for x in kiln.workers()}
    good = kiln.config_path.read_text()
    kiln.config_path.write_text(good + '[timeouts]\nidle = "forever"\n')
    kiln.send(signal.SIGHUP)
    kiln.wait_for_log(
        r"reload refused, nothing changed: .*\[timeouts\] idle: 'forever' is not a duration"
    )
    time.sleep(1)
    assert {x["pid"] for x in kiln.workers()} == before
    # A host key no worker could serve with is no better.
    kiln.config_path.write_text(good)
    key = kiln.home / "ssh_host_ed25519_key"
    key.write_text("not a key\n")
    kiln.send(signal.SIGHUP)
    kiln.wait_for_log(rf"reload refused, nothing changed: host key {key} is not a usable private")
    time.sleep(1)
    assert {x["pid"] for x in kiln.workers()} == before
    assert "rolling restart" not in kiln.log()


def test_hup_reads_the_file_the_master_started_from_or_changes_nothing(
    new_world: Factory,
) -> None:
    """A master started from $KILNPROXY_HOME/kilnproxy.toml (no --config) reloads that file.
    Gone, it refuses the reload: the defaults would serve from an empty directory. A [log]
    file it cannot open is refused too: no new worker could boot with it."""
    w = new_world({"workers": {"count": 1}})
    kiln = w.kiln
    kiln.stop()
    kiln.start([*KILNPROXY, "serve"])
    before = {x["pid"] for x in kiln.workers()}
    saved = kiln.config_path.read_text()
    kiln.config_path.rename(kiln.config_path.with_suffix(".moved"))
    kiln.send(signal.SIGHUP)
    kiln.wait_for_log(rf"reload refused, nothing changed: cannot read config {kiln.config_path}")
    kiln.config_path.write_text(saved.replace("[log]", "") + '[log]\nfile = "/proc/none/x.log"\n')
    kiln.send(signal.SIGHUP)
    kiln.wait_for_log(r"reload refused, nothing changed: \[log\] file /proc/none/x.log: cannot")
    time.sleep(1)
    assert {x["pid"] for x in kiln.workers()} == before
    assert "rolling restart" not in kiln.log()


def test_hup_says_what_only_a_restart_applies_and_takes_the_log_settings(
    new_world: Factory,
) -> None:
    """The sockets the master bound at its start stay (a line names the settings that wait
    for a restart); its own log takes the new [log] settings, as the new workers do."""
    w = new_world({"workers": {"count": 1}})
    kiln = w.kiln
    kiln.settings["status"] = {"http": f"127.0.0.1:{kiln.http_port + 1}"}
    kiln.settings["log"] = {"format": "json"}
    kiln.write_config()
    kiln.send(signal.SIGHUP)
    kiln.wait_for_log(r"reload: \[status\] http changed, in force only after a restart")
    kiln.wait_for_log(r'^\{.*"kilnproxy.master".*rolling restart to generation \d+ complete')
    assert kiln.status()["workers"]  # the status socket, where it was


def test_a_replaced_worker_starts_from_the_config_the_master_read(new_world: Factory) -> None:
    """A config file saved with a mistake, and no HUP yet: a worker replaced meanwhile (it
    died) starts from the configuration its master read, as every other worker runs, not
    from the file as it is now; the HUP then refuses the file and changes nothing."""
    w = new_world({"workers": {"count": 2}})
    kiln = w.kiln
    kiln.config_path.write_text("[ssh\nlisten = \n")  # half-saved
    victim = kiln.workers()[0]["pid"]
    os.kill(victim, signal.SIGKILL)

    def replaced() -> bool:
        ready = [x["pid"] for x in kiln.workers() if x["state"] == "ready"]
        return len(ready) == 2 and victim not in ready

    wait_until(replaced, 20, "the replacement")
    assert "cannot boot" not in kiln.log()
    assert kiln.ssh(w.alice, "git-upload-pack 'aviato/website'", input=b"0000").returncode == 0
    kiln.send(signal.SIGHUP)
    kiln.wait_for_log(r"reload refused, nothing changed: .*not valid TOML")


def test_a_hup_with_every_slot_held_hurries_the_oldest_drain(new_world: Factory) -> None:
    """A HUP leaves each replaced worker draining for as long as its sessions last; each holds
    a slot of the startup table (4 here, 64 and up for real). When a replacement finds none
    free, the oldest drain gets a TERM, as a worker restarted alone does: its sessions are cut
    at the drain timeout, its slot frees, and the restart goes on. The others are not cut."""
    fault = {"PYTHONPATH": str(Path(__file__).parents[1] / "fault_injection"),
             "KILNPROXY_TEST_SLOTS": "1"}  # fmt: skip
    w = new_world({"workers": {"count": 1}, "timeouts": {"drain": "1s"}}, env=fault)
    kiln = w.kiln
    held: list[subprocess.Popen[bytes]] = []
    with contextlib.ExitStack() as stack:
        for generation in range(1, 4):  # slots 0-2 drain, and slot 3 serves
            held.append(stack.enter_context(held_session(w)))  # on the one worker accepting
            stack.callback(kill_if_running, held[-1])  # should the test fail
            kiln.send(signal.SIGHUP)
            kiln.wait_for_log(rf"rolling restart to generation {generation} complete")
        first = int(re.findall(r"started worker 0 \(pid (\d+)", kiln.log())[0])
        kiln.send(signal.SIGHUP)
        kiln.wait_for_log(rf"no free slot: worker 0 \(pid {first}\) cuts what is left in 1s")
        assert held[0].wait(timeout=10) == 1
        assert held[0].stderr is not None
        assert b"drain timeout expired" in held[0].stderr.read()
        kiln.wait_for_log(r"rolling restart to generation 4 complete", timeout=30)
        for client in held[1:]:  # replaced too, and never cut
            assert client.poll() is None
            assert finish_upload_pack(client) == 0
    done = kiln.ssh(w.alice, "git-upload-pack 'aviato/website'", input=b"0000")
    assert done.returncode == 0 and b"refs/heads/main" in done.stdout


def test_term_to_one_worker_drains_it_after_its_replacement_is_up(new_world: Factory) -> None:
    w = new_world({"workers": {"count": 2}})
    kiln = w.kiln
    with held_session(w) as client:
        victim = owner_of_held(w)
        os.kill(victim, signal.SIGTERM)
        wait_until(lambda: len([x for x in kiln.workers() if x["state"] == "ready"]) == 2
                   and victim not in [x["pid"] for x in kiln.workers() if x["state"] == "ready"],
                   10, "the replacement")  # fmt: skip
        assert not gone(victim)()  # still draining: the held session is on it
        accepted = kiln.ssh(w.alice, "git-upload-pack 'aviato/website'", input=b"0000")
        assert accepted.returncode == 0
        assert finish_upload_pack(client) == 0
    wait_until(gone(victim), 10, "the drained worker to exit")
    kiln.wait_for_log(rf"worker \d \(pid {victim}\) exited 0 after draining")


def test_what_holds_the_status_socket_or_page_is_left_alone(
    new_world: Factory, tmp_path: Path
) -> None:
    """A second server given the first's status socket or page stops with one line, and the
    first still answers; a status socket path that names another file (a mistyped setting)
    stops the server, and the file is left as it was."""
    first = new_world().kiln
    notes = tmp_path / "second" / "var" / "notes.txt"
    cases = [
        ({"socket": str(first.home / "kilnproxy.sock")}, "is in use: is another kilnproxy"),
        ({"socket": str(notes)}, "exists and is not a socket; not replacing it"),
        ({"http": f"127.0.0.1:{first.http_port}"}, "cannot listen on [status] http 127.0.0.1:"),
    ]
    for settings, message in cases:
        second = Kiln(tmp_path / "second", {"status": settings})
        notes.write_text("kept\n")
        argv = [*KILNPROXY, "serve", "--config", str(second.config_path)]
        done = run(argv, env=second.server_env(), check=False, timeout=30)
        lines = done.stderr.decode().splitlines()
        assert done.returncode == 2 and message in lines[-1], lines
        assert notes.read_text() == "kept\n"
        assert not (second.home / "kilnproxy.sock").exists()  # none left behind
        assert first.workers()  # the first server still answers on its socket
        assert first.cli("status").returncode == 0


def booting_fails_while(flag: Path) -> dict[str, str]:
    """The environment of a server whose workers cannot boot while `flag` exists (as if their
    host key were broken after the master read it: a deploy under way)."""
    return {"PYTHONPATH": str(Path(__file__).parents[1] / "fault_injection"),
            "KILNPROXY_TEST_BOOT_FAILS_WHILE": str(flag)}  # fmt: skip


def test_a_worker_that_cannot_boot_stops_the_master(tmp_path: Path, new_world: Factory) -> None:
    w = new_world({"workers": {"count": 2}})
    kiln = w.kiln
    kiln.stop()
    flag = tmp_path / "broken"
    flag.touch()
    started = time.monotonic()
    with kiln.log_path.open("ab") as log:
        proc = subprocess.Popen([*KILNPROXY, "serve", "--config", str(kiln.config_path)],
                                env=kiln.server_env() | booting_fails_while(flag), stdout=log,
                                stderr=log)  # fmt: skip
    assert proc.wait(timeout=30) == 2  # an operator's problem: systemd does not restart it
    assert time.monotonic() - started < 15
    log_text = kiln.log()
    assert "cannot boot (3 of 3 tries)" in log_text
    assert log_text.count("host key") >= 3 and "the master gives up" in log_text
    # A host key that is broken before the start is said once, before any worker boots.
    key = kiln.home / "ssh_host_ed25519_key"
    key.write_text("not a key\n")
    argv = [*KILNPROXY, "serve", "--config", str(kiln.config_path)]
    done = run(argv, env=kiln.server_env(), check=False, timeout=30)
    assert done.returncode == 2
    (line,) = done.stderr.decode().splitlines()
    assert line.startswith(f"kilnproxy: error: host key {key} is not a usable private key"), line


def test_workers_that_cannot_boot_while_others_serve_stop_nothing(
    new_world: Factory, tmp_path: Path
) -> None:
    """A broken deploy (workers that cannot boot, though the master found nothing wrong) then a
    HUP, and a worker killed meanwhile: the replacements cannot boot, but the workers that serve
    go on serving, the held clone is not cut, and the master does not give up. It tries again
    with its backoff, and once the deploy is mended the rolling restart completes."""
    broken = tmp_path / "broken"
    w = new_world({"workers": {"count": 2}}, env=booting_fails_while(broken))
    kiln = w.kiln
    with held_session(w) as client:
        owner = owner_of_held(w)
        broken.touch()
        kiln.send(signal.SIGHUP)
        kiln.wait_for_log(r"rolling restart to generation 1 stalled: its workers cannot boot",
                          timeout=30)  # fmt: skip
        ready = [x["pid"] for x in kiln.workers() if x["state"] == "ready"]
        other = next(pid for pid in ready if pid != owner)  # not a replacement booting
        os.kill(other, signal.SIGKILL)
        kiln.wait_for_log(r"worker \d cannot boot \(\d+ in a row\); 1 worker\(s\) serve on",
                          timeout=30)  # a retry waits for its backoff  # fmt: skip
        assert kiln.proc is not None and kiln.proc.poll() is None
        assert "gives up" not in kiln.log()
        accepted = kiln.ssh(w.alice, "git-upload-pack 'aviato/website'", input=b"0000")
        assert accepted.returncode == 0
        broken.unlink()
        kiln.wait_for_log(r"rolling restart to generation 1 complete", timeout=60)
        assert finish_upload_pack(client) == 0  # opened before the HUP, finished after it
    wait_until(gone(owner), 10, "the old worker to drain and exit")


def test_signals_before_the_master_runs_wait_for_it(tmp_path: Path) -> None:
    """`serve` checks the directory before anything else, which takes a while when the
    database answers nothing. A log rotation's USR1, a HUP and a TTIN sent then must neither
    end nor stop the master (their default actions): each is acted on once it runs."""
    silent = socket.create_server(("127.0.0.1", 0))  # accepts, then never says a word
    with silent:
        port = silent.getsockname()[1]
        url = f"postgresql://k@127.0.0.1:{port}/k"
        settings: dict[str, dict[str, Any]] = {
            "workers": {"count": 2}, "timeouts": {"dial": "2s"}, "directory": {"url": url}
        }  # fmt: skip
        kiln = Kiln(tmp_path, settings)
        with kiln.log_path.open("ab") as log:
            proc = subprocess.Popen([*KILNPROXY, "serve", "--config", str(kiln.config_path)],
                                    env=kiln.server_env(), stdout=log, stderr=log)  # fmt: skip
        try:
            silent.settimeout(30)
            held, _ = silent.accept()  # the schema check is under way
            with held:
                for signum in (signal.SIGUSR1, signal.SIGHUP, signal.SIGTTIN):
                    proc.send_signal(signum)
                    time.sleep(0.05)
                assert psutil.Process(proc.pid).status() != psutil.STATUS_STOPPED
                kiln.wait_for_log(r"received SIGTTIN", timeout=30)
            assert proc.poll() is None
            log_text = kiln.log()
            assert "received SIGUSR1" in log_text and "received SIGHUP" in log_text
            kiln.wait_for_log(r"workers wanted: 3")
        finally:
            proc.send_signal(signal.SIGINT)
            assert proc.wait(10) == 0


def test_a_burst_of_signals_is_counted_exactly(new_world: Factory) -> None:
    """100 signals in 2 s, while workers start and drain: every one acted on, in order.

    They are 20 ms apart because the kernel merges a standard signal sent while the same one is
    still pending (POSIX): on two busy cores, back-to-back signals are lost before any handler
    of ours could run. What the master must not do is lose one it was delivered.
    """
    w = new_world({"workers": {"count": 2}})
    kiln = w.kiln
    assert kiln.proc is not None
    master = kiln.proc.pid
    ttin, ttou, hup = signal.SIGTTIN, signal.SIGTTOU, signal.SIGHUP
    plan = [ttin, ttin, hup, ttou, ttin, ttou, ttou, ttou] * 12 + [ttin, ttin, hup, ttin]
    expected = 2
    for signum in plan:
        if signum == ttin:
            expected += 1
        elif signum == ttou:
            expected = max(1, expected - 1)  # never fewer than one
    assert (len(plan), expected) == (100, 4)
    for signum in plan:
        os.kill(master, signum)
        time.sleep(0.02)
    wait_until(lambda: kiln.log().count("received SIG") >= len(plan), 20, "every signal")
    assert kiln.log().count("received SIG") == len(plan)

    def settled() -> bool:
        status = kiln.status()
        workers = status["workers"]
        current = all(x["generation"] == status["generation"] for x in workers)
        return len(workers) == expected and current and all(x["state"] == "ready" for x in workers)

    wait_until(settled, 180, f"{expected} ready workers")
    time.sleep(1)
    group = [
        p for p in psutil.process_iter(["pid", "status"]) if os.getpgid(p.pid) == os.getpgid(master)
    ]
    assert len(group) == 1 + expected, [title(p.pid) for p in group]
    assert not [p for p in group if p.info["status"] == psutil.STATUS_ZOMBIE]


class NotifyListener:
    """A NOTIFY_SOCKET of the test's own, recording what arrives and when."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def env(self, watchdog_usec: int | None = None) -> dict[str, str]:
        env = {"NOTIFY_SOCKET": str(self.path)}
        if watchdog_usec:
            env["WATCHDOG_USEC"] = str(watchdog_usec)
        return env

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            for line in data.decode().splitlines():
                self.messages.append((time.monotonic(), line))

    def lines(self) -> list[str]:
        return [line for _, line in self.messages]

    def times(self, line: str) -> list[float]:
        return [t for t, got in self.messages if got == line]

    def wait_for(self, line: str, after: int = 0, timeout: float = 30) -> int:
        wait_until(lambda: line in self.lines()[after:], timeout, line)
        return self.lines().index(line, after)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifyListener]:
    listener = NotifyListener(tmp_path / "notify.sock")
    yield listener
    listener.close()


def test_sd_notify_ready_reloading_stopping(new_world: Factory, notify: NotifyListener) -> None:
    w = new_world({"workers": {"count": 3}}, env=notify.env())
    kiln = w.kiln
    first_ready = notify.wait_for("READY=1")
    ready_at = notify.times("READY=1")[0]
    log = kiln.log()
    assert log.count(") ready") >= 3  # every worker had said READY before READY=1
    status_line = "STATUS=3 workers, 0 sessions"
    wait_until(lambda: status_line in notify.lines(), 5, status_line)
    kiln.send(signal.SIGHUP)
    reloading = notify.wait_for("RELOADING=1", first_ready)
    assert any(line.startswith("MONOTONIC_USEC=") for line in notify.lines()[reloading:])
    notify.wait_for("READY=1", reloading)
    kiln.send(signal.SIGTERM)
    stopping = notify.wait_for("STOPPING=1", reloading)
    assert kiln.proc is not None and kiln.proc.wait(timeout=15) == 0
    assert first_ready < reloading < stopping
    assert ready_at > 0


def test_socket_activation_serves_on_fd_3(new_world: Factory, tmp_path: Path) -> None:
    w = new_world({"workers": {"count": 1}})
    kiln = w.kiln
    kiln.stop()
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    adopt = (
        "import os, sys; os.dup2(int(sys.argv[1]), 3); os.environ['LISTEN_FDS'] = '1'; "
        "os.environ['LISTEN_PID'] = str(os.getpid()); os.execv(sys.argv[2], sys.argv[2:])"
    )
    argv = [sys.executable, "-c", adopt, str(listener.fileno()), *KILNPROXY, "serve",
            "--config", str(kiln.config_path)]  # fmt: skip
    with kiln.log_path.open("ab") as log:
        kiln.proc = subprocess.Popen(argv, env=kiln.server_env(), stdout=log, stderr=log,
                                     pass_fds=[listener.fileno()])  # fmt: skip
    listener.close()
    kiln.port = port  # the configured port is not used: systemd's socket is
    kiln.wait_ready(1)
    host_key = (kiln.home / "ssh_host_ed25519_key.pub").read_text().split()
    kiln.known_hosts.write_text(f"[127.0.0.1]:{port} {host_key[0]} {host_key[1]}\n")
    done = kiln.ssh(w.alice, "git-upload-pack 'aviato/website'", input=b"0000")
    assert done.returncode == 0 and b"refs/heads/main" in done.stdout
    assert f"listening on 127.0.0.1:{port}" in kiln.log()


def test_master_never_imports_asyncssh() -> None:
    modules = sorted(p.stem for p in (Path(__file__).parents[2] / "master").glob("*.py"))
    assert {"arbiter", "board", "supervisor", "http", "metrics", "status"} <= set(modules)
    imports = "; ".join(f"import master.{name}" for name in modules if name != "__init__")
    code = f"import sys; {imports}; sys.exit('asyncssh' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_kill_ends_one_session_with_the_administrator_message(new_world: Factory) -> None:
    w = new_world({"workers": {"count": 2}})
    kiln = w.kiln
    with held_session(w) as client, held_session(w) as bystander:
        wait_until(lambda: len([r for r in kiln.connections() if r["repo"]]) == 2, 10, "two rows")
        session = kiln.connections()[0]["session"]
        argv = [*KILNPROXY, "kill", session, "--config", str(kiln.config_path)]
        assert run(argv, env=kiln.server_env()).stdout.decode() == f"ended session {session}\n"
        assert client.wait(timeout=10) == 1
        assert client.stderr is not None
        message = client.stderr.read().decode().strip()
        assert message == f"kilnproxy: session ended by an administrator (session {session})"
        assert finish_upload_pack(bystander) == 0  # the other session went on
    kiln.wait_for_log(rf"\[{session}\] access .*exit=1 outcome=cut")
    unknown = run([*KILNPROXY, "kill", "deadbeef", "--config", str(kiln.config_path)],
                  env=kiln.server_env(), check=False)  # fmt: skip
    assert unknown.returncode == 2
    assert unknown.stderr.decode().strip() == "kilnproxy: error: no session deadbeef"


def test_a_worker_crashing_after_boot_is_restarted_with_backoff(new_world: Factory) -> None:
    fault = {"PYTHONPATH": str(Path(__file__).parents[1] / "fault_injection"),
             "KILNPROXY_TEST_CRASH_AFTER_READY": "1"}  # fmt: skip
    w = new_world({"workers": {"count": 2}}, env=fault)
    kiln = w.kiln
    time.sleep(6)
    slots = [int(i) for i in re.findall(r"started worker (\d+)", kiln.log())]
    # Every worker dies 0.5 s after READY. Each slot waits 0.1, 0.2, 0.4, 0.8, 1.6 s before
    # its next start, so a slot starts at most 7 times in 6 s; without backoff, or with a
    # crashing slot skipped for a fresh index, starts pile up and indices grow.
    assert set(slots) == {0, 1}, slots
    assert max(slots.count(0), slots.count(1)) <= 7, slots
    assert "died with status 1" in kiln.log()
    assert kiln.proc is not None and kiln.proc.poll() is None  # booted fine: no giving up


def test_a_worker_whose_channel_outlives_it_is_replaced_all_the_same(
    new_world: Factory, tmp_path: Path
) -> None:
    """A process the worker left behind holds the worker's end of its channel, so the master
    never reads EOF there: it reads what is left for LAST_WORDS only, then replaces the worker."""
    holder = tmp_path / "holder.pid"
    fault = {"PYTHONPATH": str(Path(__file__).parents[1] / "fault_injection"),
             "KILNPROXY_TEST_CHANNEL_HELD": str(holder)}  # fmt: skip
    w = new_world({"workers": {"count": 1}}, env=fault)
    kiln = w.kiln
    try:
        wait_until(lambda: holder.exists() and bool(holder.read_text()), 10, "the channel held")
        wait_until(lambda: kiln.log().count("started worker 0") == 2, 10, "a replacement")
        assert "worker 0 (pid " in kiln.log() and "died with status 1" in kiln.log()
        assert psutil.pid_exists(int(holder.read_text()))  # the channel was never closed
        wait_until(lambda: kiln.log().count(") ready") == 2, 10, "the replacement ready")
        done = kiln.ssh(w.alice, "git-upload-pack 'aviato/website'", input=b"0000")
        assert done.returncode == 0 and b"refs/heads/main" in done.stdout
    finally:
        if holder.exists() and holder.read_text():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(holder.read_text()), signal.SIGKILL)
