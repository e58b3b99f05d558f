"""The read side against a fake supervisor: each StatusError gets its HTTP status and body, and
the status socket its one-line error (the real master is in test_status_http and test_master)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from kilnproxy.control import SessionStats
from kilnproxy.errors import OperatorError
from kilnproxy.status_socket import serve
from master.actions import (
    NoSession,
    NoWorker,
    StatusError,
    WorkerBusy,
    WorkerExited,
    WorkerFailed,
    WorkerTimeout,
)
from master.board import StatusBoard
from master.http import STATUS, TRAFFIC, application
from master.status import StatusAnswers


class FakeActions:
    """A supervisor whose every answer is `error`, or a fixed one when error is None."""

    def __init__(self, error: StatusError | None) -> None:
        self.error = error
        self.ended: list[str] = []

    def end_session(self, session: str) -> None:
        if self.error is not None:
            raise self.error
        self.ended.append(session)

    async def dump_tasks(self, index: int, pid: int | None = None) -> dict[str, Any]:
        if self.error is not None:
            raise self.error
        return {"tasks": [], "sessions": [], "index": index, "pid": pid}

    async def profile_heap(
        self, index: int, top: int, seconds: float, stop: bool, peek: bool, pid: int | None = None
    ) -> dict[str, Any]:
        if self.error is not None:
            raise self.error
        return {"tracing": not stop, "top": top, "seconds": seconds, "peek": peek}


async def fetch(
    actions: FakeActions,
    method: str,
    path: str,
    site: str | None = None,
    referer: str | None = None,
) -> tuple[int, str, str]:
    """`referer` may name the page's own origin as {origin}."""
    headers = {"Sec-Fetch-Site": site} if site else {}
    async with TestClient(TestServer(application(StatusBoard(), actions))) as client:
        if referer is not None:
            headers["Referer"] = referer.format(origin=f"http://{client.host}:{client.port}")
        response = await client.request(method, path, headers=headers)
        return response.status, response.content_type, await response.text()


ERRORS = [
    (NoSession("0badf00d"), 404, "no session 0badf00d"),
    (NoWorker(7), 404, "no worker 7"),
    (WorkerTimeout(0, 10.0), 503, "worker 0 did not answer in 10s"),
    (WorkerExited(0), 503, "worker 0 exited"),
    (WorkerBusy(0), 503, "worker 0 is answering another request; try again"),
    (WorkerFailed("worker 0 failed: boom"), 503, "worker 0 failed: boom"),
]


def test_every_status_error_has_its_http_status() -> None:
    assert set(STATUS) == {type(error) for error, _, _ in ERRORS}


@pytest.mark.parametrize(("error", "status", "message"), ERRORS, ids=str)
def test_debug_endpoints_answer_json_errors(error: StatusError, status: int, message: str) -> None:
    for path in ("/debug/workers/0/tasks", "/debug/workers/0/heap?top=3"):
        got = asyncio.run(fetch(FakeActions(error), "GET", path))
        assert got == (status, "application/json", json.dumps({"error": message}))


def test_a_worker_index_is_ascii_digits() -> None:
    for index in ("%C2%B2", "%D9%A1", "-1", "12345"):  # ², Arabic-Indic 1
        status, _, text = asyncio.run(
            fetch(FakeActions(None), "GET", f"/debug/workers/{index}/tasks")
        )
        assert status == 400 and text.startswith("worker must be a number"), (index, text)


def test_what_acts_on_a_worker_is_not_done_for_another_sites_page() -> None:
    """A browser names where a request comes from; scripts (curl) send no such header."""
    acting = [("GET", "/debug/workers/0/heap"), ("GET", "/debug/workers/0/tasks"),
              ("DELETE", "/connections/0badf00d")]  # fmt: skip
    for method, path in acting:
        for site, status in (("cross-site", 403), ("same-site", 403), ("same-origin", 200),
                             ("none", 200), (None, 200)):  # fmt: skip
            got = asyncio.run(fetch(FakeActions(None), method, path, site))
            assert got[0] == status, (method, path, site, got)
        # Over plain HTTP by another address a browser sends no Sec-Fetch-Site: its Referer
        # says where the page is (an <img> on an intranet wiki, say).
        for referer, status in (("http://wiki.internal/page", 403), ("{origin}/", 200),
                                ("http://[::1/", 403)):  # fmt: skip
            got = asyncio.run(fetch(FakeActions(None), method, path, referer=referer))
            assert got[0] == status, (method, path, referer, got)
    assert asyncio.run(fetch(FakeActions(None), "GET", "/info", "cross-site"))[0] == 200


def test_ending_an_unknown_session_is_a_404_line_the_dashboard_shows() -> None:
    got = asyncio.run(fetch(FakeActions(NoSession("0badf00d")), "DELETE", "/connections/0badf00d"))
    assert got == (404, "text/plain", "no session 0badf00d\n")


def test_answers_when_nothing_fails() -> None:
    actions = FakeActions(None)
    status, _, text = asyncio.run(fetch(actions, "DELETE", "/connections/0badf00d"))
    assert (status, json.loads(text), actions.ended) == (200, {"killed": "0badf00d"}, ["0badf00d"])
    status, _, text = asyncio.run(fetch(actions, "GET", "/debug/workers/3/heap?stop=1&seconds=5"))
    assert json.loads(text) == {"tracing": False, "top": 25, "seconds": 5.0, "peek": False}
    status, _, text = asyncio.run(fetch(actions, "GET", "/debug/workers/12/tasks"))
    assert (status, json.loads(text)["index"]) == (200, 12)
    status, _, text = asyncio.run(fetch(actions, "GET", "/debug/workers/1/tasks?pid=4321"))
    assert (status, json.loads(text)["pid"]) == (200, 4321)
    for pid in ("x", "-1", "\u00b2", "12345678901"):
        status, _, text = asyncio.run(fetch(actions, "GET", f"/debug/workers/1/tasks?pid={pid}"))
        assert status == 400 and text.startswith("pid must be a number"), (pid, text)


def ask_socket(path: Path, actions: FakeActions, *lines: bytes) -> list[dict[str, Any]]:
    async def exchange() -> list[dict[str, Any]]:
        server = await serve(path, StatusAnswers(StatusBoard(), actions).answer)
        replies = []
        for line in lines:
            reader, writer = await asyncio.open_unix_connection(path)
            writer.write(line)
            replies.append(json.loads(await reader.readline()))
            writer.close()
            await writer.wait_closed()
        server.close()
        await server.wait_closed()
        return replies

    return asyncio.run(exchange())


def test_the_status_socket_says_each_error_in_one_line(tmp_path: Path) -> None:
    replies = ask_socket(
        tmp_path / "status.sock",
        FakeActions(NoSession("0badf00d")),
        b'{"command": "kill", "session": "0badf00d"}\n',
        b'{"command": "reboot"}\n',
        b"{}\n",
        b"[1]\n",
        b"nonsense\n",
        b'{"command": "connections"}\n',
        b"x" * 100_000 + b"\n",  # over the reader's limit: a bad request, not a traceback
        b"[" * 5000 + b"\n",  # nested past the JSON parser's recursion
    )
    assert replies[:4] == [
        {"error": "no session 0badf00d"},
        {"error": "unknown command 'reboot'"},
        {"error": "unknown command None"},
        {"error": "bad request: not an object"},
    ]
    assert replies[4]["error"].startswith("bad request: ")
    assert replies[5] == {"connections": []}
    assert replies[6]["error"].startswith("bad request: ")
    assert replies[7] == {"error": "bad request: nested too deep"}


def test_a_status_client_that_reads_nothing_does_not_hold_its_reply(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After the socket's timeout the reply is dropped, not kept until the client reads it."""
    monkeypatch.setattr("kilnproxy.status_socket.TIMEOUT", 0.2)
    big = {"rows": "r" * (8 << 20)}

    async def handler(request: object) -> dict[str, Any]:
        return big

    async def exchange() -> int:
        path = tmp_path / "status.sock"
        server = await serve(path, handler)
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(path))
            client.sendall(b'{"command": "status"}\n')
            await asyncio.sleep(1)  # reads nothing past the timeout
            client.settimeout(5)
            received = 0
            while chunk := client.recv(1 << 20):  # then all there is, until the end
                received += len(chunk)
        server.close()
        await server.wait_closed()
        return received

    assert asyncio.run(exchange()) < len(json.dumps(big))


def test_the_status_reply_lists_no_worker_before_any_started(tmp_path: Path) -> None:
    (reply,) = ask_socket(tmp_path / "status.sock", FakeActions(None), b'{"command": "status"}\n')
    assert reply["workers"] == [] and reply["generation"] == 0
    assert set(reply) == {
        "version", "started_at", "uptime", "master_pid", "generation", "fast_path", "workers",
        "unauthenticated", "penalised_sources",
    }  # fmt: skip
    assert (reply["unauthenticated"], reply["penalised_sources"]) == (0, 0)
    assert reply["fast_path"] == "none"


def test_a_stale_status_socket_is_replaced_and_removed_as_the_server_closes(tmp_path: Path) -> None:
    """One whose server is gone (a master killed with SIGKILL) is taken over; the file is
    removed at the end only while it is still ours."""
    path = tmp_path / "status.sock"
    with socket.socket(socket.AF_UNIX) as dead:
        dead.bind(str(path))  # a socket file nobody listens on

    async def handler(request: object) -> dict[str, Any]:
        return {"ok": True}

    async def body() -> None:
        listening = await serve(path, handler)
        with pytest.raises(OperatorError, match="is in use"):
            await serve(path, handler)
        listening.close()
        await listening.wait_closed()
        assert not path.exists()
        again = await serve(path, handler)
        path.unlink()
        path.write_text("another's\n")  # put there since: left alone
        again.close()
        await again.wait_closed()
        assert path.read_text() == "another's\n"

    asyncio.run(body())


def big_rows(count: int, size: int) -> list[SessionStats]:
    return [
        SessionStats(
            session=f"{n:08x}",
            remote_addr="127.0.0.1:1",
            login="g" * size,
            account="aviato",
            user="alice",
            key_name="k",
            key_fingerprint="SHA256:x",
            repo="aviato/website",
            vcs="git",
            verb="git-upload-pack",
            backend="local",
            started_at=1.0,
            duration=0.0,
            bytes_in=1,
            bytes_out=2,
            state="authenticated",
        )
        for n in range(count)
    ]


def test_a_page_client_that_reads_nothing_is_dropped_and_holds_up_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """aiohttp has no write timeout: a client that asks for /connections and reads nothing
    would hold the body in the master's memory for good. It gets SEND_WITHIN seconds, then its
    connection goes; a client reading meanwhile is answered all the same."""
    monkeypatch.setattr("master.http.SEND_WITHIN", 2.0)
    board = StatusBoard()
    board.table.update(100, 0, big_rows(40, 1 << 20))  # 40 MB of JSON: past any socket buffer

    async def exchange() -> tuple[int, int, int]:
        async with TestClient(TestServer(application(board, FakeActions(None)))) as client:
            reader, writer = await asyncio.open_connection(
                client.host, client.port, limit=1024
            )  # reads at most a few KiB, then lets the server's writes pile up
            writer.write(b"GET /connections HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            await asyncio.sleep(0.2)
            answered = len(await (await client.get("/connections")).read())
            await asyncio.sleep(2.5)  # past SEND_WITHIN
            received = 0
            while chunk := await reader.read(1 << 20):
                received += len(chunk)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
            return answered, received, client.app[TRAFFIC].in_flight if client.app else -1

    answered, received, in_flight = asyncio.run(exchange())
    assert answered > 40 << 20  # all of it, to the client that reads
    assert received < answered / 2  # the rest was dropped with the connection
    assert in_flight == 0


def test_requests_past_the_limit_are_refused_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("master.http.IN_FLIGHT", 2)
    stalled = asyncio.Event()

    class Stalling(FakeActions):
        async def dump_tasks(self, index: int, pid: int | None = None) -> dict[str, Any]:
            await stalled.wait()
            return await super().dump_tasks(index, pid)

    async def exchange() -> list[int]:
        async with TestClient(TestServer(application(StatusBoard(), Stalling(None)))) as client:
            held = [asyncio.create_task(client.get(f"/debug/workers/{n}/tasks")) for n in (0, 1)]
            await asyncio.sleep(0.2)
            refused = await client.get("/info")
            stalled.set()
            statuses = [refused.status] + [(await each).status for each in held]
            statuses.append((await client.get("/info")).status)
            return statuses

    assert asyncio.run(exchange()) == [503, 200, 200, 200]


def test_connections_are_made_once_a_second_while_the_table_does_not_change() -> None:
    """Within one wall-clock second an unchanged table is the same body (its durations too,
    which a body made anew would have moved on); a change is seen at once."""
    board = StatusBoard()
    board.table.update(100, 0, big_rows(2, 8))

    async def exchange() -> tuple[bytes, bytes, list[str]]:
        async with TestClient(TestServer(application(board, FakeActions(None)))) as client:
            await asyncio.sleep(1.05 - time.time() % 1)  # early in a second: not across its end
            first = await (await client.get("/connections")).read()
            await asyncio.sleep(0.01)
            again = await (await client.get("/connections")).read()
            board.table.remove(100, "00000000")
            changed = await (await client.get("/connections")).json()
            return first, again, [row["session"] for row in changed]

    first, again, changed = asyncio.run(exchange())
    assert first == again
    assert [row["session"] for row in json.loads(first)] == ["00000000", "00000001"]
    assert changed == ["00000001"]


def test_a_client_that_leaves_before_its_answer_is_no_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A dashboard tab closed, a scrape given up while its answer was made: nothing to log.
    (The master's server, unlike aiohttp's test server, lets a handler finish.)"""
    answered = asyncio.Event()

    class Slow(FakeActions):
        async def dump_tasks(self, index: int, pid: int | None = None) -> dict[str, Any]:
            await asyncio.sleep(0.3)
            answered.set()
            return await super().dump_tasks(index, pid)

    async def exchange() -> None:
        runner = web.AppRunner(application(StatusBoard(), Slow(None)), handle_signals=False)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        try:
            _, writer = await asyncio.open_connection(*runner.addresses[0][:2])
            writer.write(b"GET /debug/workers/0/tasks HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.close()  # gone before the answer
            await asyncio.wait_for(answered.wait(), 5)
            await asyncio.sleep(0.2)  # the answer is written to nobody
        finally:
            await runner.cleanup()

    with caplog.at_level(logging.DEBUG, logger="aiohttp"):
        asyncio.run(exchange())
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
