"""The intranet status server (SPEC 7), served by the master from its status board.

Bound to `[status] http` only (127.0.0.1:8022 by default), and answering a browser only under
an address or one of its own names (`named_host`). Every request is validated before it
reaches the board or a worker: a malformed one gets a 4xx with a one-line reason, never a 500.
What it asks of workers goes through `actions.WorkerActions`; a request that cannot be served
raises a `StatusError`, and STATUS below is the one place that says which HTTP status each gets.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import re
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from kilnproxy.config import StatusSettings, format_uptime
from kilnproxy.errors import OperatorError, os_reason
from kilnproxy.version import build_info
from master.actions import (
    NoSession,
    NoWorker,
    StatusError,
    WorkerActions,
    WorkerBusy,
    WorkerExited,
    WorkerFailed,
    WorkerTimeout,
)
from master.board import StatusBoard, fast_path_summary
from master.metrics import MasterCollector

SESSION_ID = re.compile(r"[0-9a-f]{8}")
KEEPALIVE = 15.0
SEND_WITHIN = 30.0  # seconds for a client to take a whole response, or its connection goes
IN_FLIGHT = 32  # requests under way at once; past them, 503 at once
SHUTDOWN_WITHIN = 1.0  # seconds the master's exit waits for requests under way (SPEC 6)
STATIC = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}
BOARD: web.AppKey[StatusBoard] = web.AppKey("board")
ACTIONS: web.AppKey[WorkerActions] = web.AppKey("actions")
REGISTRY: web.AppKey[CollectorRegistry] = web.AppKey("registry")
NAMES: web.AppKey[frozenset[str]] = web.AppKey("names")
REFUSED: web.AppKey[set[str]] = web.AppKey("refused")  # names refused and logged
REFUSED_LOGGED = 32
log = logging.getLogger("kilnproxy.master")


@dataclass
class Traffic:
    """The server's own state: requests under way, and the last `GET /connections` body with
    the table version and wall-clock second it was made for."""

    in_flight: int = 0
    connections: tuple[int, int, bytes] = (-1, 0, b"")


TRAFFIC: web.AppKey[Traffic] = web.AppKey("traffic")

STATUS: dict[type[StatusError], int] = {
    NoSession: 404,
    NoWorker: 404,
    WorkerTimeout: 503,
    WorkerBusy: 503,
    WorkerExited: 503,
    WorkerFailed: 503,
}


@web.middleware
async def delivered(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A response is taken by its client within SEND_WITHIN seconds, or its connection is
    dropped: aiohttp has no write timeout, and a client that stops reading would hold what it
    asked for in the master's memory for good (`/connections` of 20,000 sessions is 8 MB), and
    hold up the master's exit. At most IN_FLIGHT requests are under way at once: past them,
    even /metrics gets 503 until one is done (SEND_WITHIN at the most), which is better than a
    master that holds every stalled reader's answer."""
    traffic = request.app[TRAFFIC]
    if traffic.in_flight >= IN_FLIGHT:
        raise web.HTTPServiceUnavailable(text=f"{IN_FLIGHT} requests under way; try again\n")
    traffic.in_flight += 1
    try:
        response = await handler(request)
        if response.prepared:
            return response
        try:
            async with asyncio.timeout(SEND_WITHIN):
                await response.prepare(request)
                await response.write_eof()
        except TimeoutError:
            if request.transport is not None:
                request.transport.abort()
        except ConnectionError:
            pass  # the client left (a tab closed, a scrape given up): aiohttp says nothing either
        # Sent, or given up: aiohttp's own write_eof then either finds it sent, or is refused
        # by the aborted transport (quietly, as a client gone). Keep the abort: without it, that
        # second write would wait on the stalled client again, for ever.
        return response
    finally:
        traffic.in_flight -= 1


@web.middleware
async def status_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A StatusError as its HTTP status: JSON `{"error": ...}` under /debug/ (read by scripts),
    one line of text elsewhere (the dashboard shows it, like aiohttp's own 4xx)."""
    try:
        return await handler(request)
    except StatusError as exc:
        status = STATUS[type(exc)]
        if request.path.startswith("/debug/"):
            return web.json_response({"error": str(exc)}, status=status)
        return web.Response(text=f"{exc}\n", status=status)


# -- the names it answers to: a guard against DNS rebinding ----------------------------------------


def host_name(header: str) -> str:
    """The host of a Host header, without its port: lower case, without a final dot."""
    if header.startswith("[") and "]" in header:  # [::1]:8022
        return header[1 : header.index("]")]
    host = header.rpartition(":")[0] if header.count(":") == 1 else header
    return host.lower().removesuffix(".")


def answers_to(host: str, names: frozenset[str]) -> bool:
    """Whether the status page answers to `host` (a Host header's `host_name`): an IP address,
    localhost (and RFC 6761's names under it, which browsers resolve to loopback), or one of
    `names`."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return host == "localhost" or host.endswith(".localhost") or host in names
    return True


def own_names(settings: StatusSettings, hostname: str) -> frozenset[str]:
    """The names it answers to besides addresses: [status] hosts, this machine's name (as
    `hostname` gives it, and its first label), and the name [status] http binds, if one."""
    machine = hostname.lower().removesuffix(".")
    return frozenset({*settings.hosts, machine, machine.partition(".")[0],
                      host_name(settings.http.host)})  # fmt: skip


@web.middleware
async def named_host(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A request must name this page. Under DNS rebinding, another site's page has its own
    name resolve to this host's address: the browser then takes the status page for that
    site's, and would let it read who is connected (and start heap traces, end sessions: to a
    plain-HTTP page that is not localhost, a browser sends no Sec-Fetch-Site for `same_site`
    to go by). Only the Host header tells the two apart, so every request is held to it,
    scripts' too; one without a Host header (HTTP/1.0) comes from no browser."""
    host = request.headers.get("Host")
    if host is not None:
        name = host_name(host)
        if not answers_to(name, request.app[NAMES]):
            _log_refused(request.app[REFUSED], name)
            raise web.HTTPMisdirectedRequest(
                text=f"this status page does not answer to the name {name!r}: "
                "[status] hosts lists the names it answers to\n"
            )
    return await handler(request)


def _log_refused(logged: set[str], name: str) -> None:
    """Once a name, for the operator whose scraper or bookmark uses a name not yet listed; at
    most REFUSED_LOGGED names, whatever a rebinding page tries."""
    if name not in logged and len(logged) < REFUSED_LOGGED:
        logged.add(name)
        log.warning("status page: refused a request for the name %r; if it is this host's, "
                    "add it to [status] hosts", name[:100])  # fmt: skip


@web.middleware
async def same_site(request: web.Request, handler: Handler) -> web.StreamResponse:
    """What acts on a worker (a dump, a heap trace, a session ended) is done for the status
    page itself or a script, never for another site's page the operator has open: an `<img>`
    elsewhere pointing at /debug/workers/0/heap?seconds=3600 would start an hour of tracing
    (a DELETE from elsewhere is refused by the browser itself). `from_elsewhere` says."""
    acts = request.path.startswith("/debug/workers/") or request.method not in ("GET", "HEAD")
    if acts and from_elsewhere(request.headers, request.host):
        raise web.HTTPForbidden(text="only from the status page itself, or a script\n")
    return await handler(request)


def from_elsewhere(headers: Mapping[str, str], host: str) -> bool:
    """Whether a browser says the request comes from another site's page: Sec-Fetch-Site,
    which browsers send only to localhost and HTTPS; else the Referer, which they send to
    plain HTTP too, naming another host than the page's (`host`: the Host header). A script
    sends neither; nor does a page that hides its address (referrerpolicy="no-referrer"),
    which nothing tells from a script."""
    site = headers.get("Sec-Fetch-Site")
    if site is not None:
        return site not in ("same-origin", "none")
    referer = headers.get("Referer")
    if referer is None:
        return False
    try:
        return urlsplit(referer).netloc.lower() != host.lower()
    except ValueError:  # no browser sends one it cannot parse
        return True


STATIC_DIR = Path(__file__).with_name("static")


def _asset(name: str) -> bytes:
    # Beside this module, not `importlib.resources.files("master")`: with an editable install
    # whose tests/ is on the path (pytest), `master` is a namespace package that includes
    # tests/master, and resources may look there.
    return (STATIC_DIR / name).read_bytes()


def _number(text: str, what: str, digits: int) -> int:
    """A whole number of at most `digits` ASCII digits (int("²") fails, "-1" is not one)."""
    if not (text.isascii() and text.isdigit()) or len(text) > digits:
        raise web.HTTPBadRequest(text=f"{what} must be a number, not {text!r}\n")
    return int(text)


def _worker_index(request: web.Request) -> int:
    return _number(request.match_info["index"], "worker", 4)


async def dashboard(request: web.Request) -> web.Response:
    return web.Response(body=_asset("dashboard.html"), content_type="text/html")


async def static(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in STATIC:
        raise web.HTTPNotFound(text="no such asset\n")
    return web.Response(body=_asset(name), content_type=STATIC[name])


async def info(request: web.Request) -> web.Response:
    board = request.app[BOARD]
    stamp = build_info()
    now = time.time()
    return web.json_response({
        "version": stamp.version,
        "commit": stamp.commit,
        "commit_count": stamp.commit_count,
        "build_date": stamp.build_date,
        "started_at": board.started_at,
        "now": now,
        "uptime": format_uptime(now - board.started_at),
        "workers": len(board.serving()),
        "fast_path": fast_path_summary(board.fast_path()),
    })  # fmt: skip


async def connections(request: web.Request) -> web.Response:
    """The table as JSON, made once a second while it does not change, whoever asks: each
    open dashboard asks every second, and 20,000 rows take the master's loop 0.2 s."""
    now, table, traffic = time.time(), request.app[BOARD].table, request.app[TRAFFIC]
    version, second, body = traffic.connections
    if (version, second) != (table.version, int(now)):
        body = json.dumps([row.as_json(now) for row in table.rows()]).encode()
        traffic.connections = (table.version, int(now), body)
    return web.Response(body=body, content_type="application/json")


async def end_session(request: web.Request) -> web.Response:
    session = request.match_info["session"]
    if not SESSION_ID.fullmatch(session):
        raise web.HTTPBadRequest(text="a session id is 8 hex characters\n")
    request.app[ACTIONS].end_session(session)
    return web.json_response({"killed": session})


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[REGISTRY])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def _pid(request: web.Request) -> int | None:
    """`?pid=N`: which of the slot's workers (one draining beside its replacement, say)."""
    text = request.query.get("pid")
    return None if text is None else _number(text, "pid", 10)


async def tasks(request: web.Request) -> web.Response:
    actions = request.app[ACTIONS]
    return web.json_response(await actions.dump_tasks(_worker_index(request), _pid(request)))


async def heap(request: web.Request) -> web.Response:
    query = request.query
    try:
        top = int(query.get("top", "25"))
        seconds = float(query.get("seconds", "60"))
    except ValueError:
        raise web.HTTPBadRequest(text="top and seconds must be numbers\n") from None
    if not (1 <= top <= 500 and 1 <= seconds <= 3600):
        raise web.HTTPBadRequest(text="top is 1-500, seconds 1-3600\n")
    stop = query.get("stop") in ("1", "true", "yes")
    peek = query.get("peek") in ("1", "true", "yes")
    index = _worker_index(request)
    profile = await request.app[ACTIONS].profile_heap(
        index, top, seconds, stop, peek, _pid(request)
    )
    return web.json_response(profile)


async def memory(request: web.Request) -> web.Response:
    try:
        since = float(request.query.get("since", "0"))
    except ValueError:
        raise web.HTTPBadRequest(text="since must be a number\n") from None
    workers = request.app[BOARD].memory.snapshot(time.time(), since)
    return web.json_response({"interval": 1, "workers": workers})


def application(
    board: StatusBoard, actions: WorkerActions, names: frozenset[str] = frozenset()
) -> web.Application:
    """The status server; `names`: what it answers to besides addresses and localhost."""
    middlewares = [delivered, named_host, same_site, status_errors]
    app = web.Application(client_max_size=64 * 1024, middlewares=middlewares)
    app[BOARD] = board
    app[TRAFFIC] = Traffic()
    app[NAMES] = names
    app[REFUSED] = set()
    app[ACTIONS] = actions
    registry = CollectorRegistry(auto_describe=True)
    registry.register(MasterCollector(board))
    app[REGISTRY] = registry
    app.router.add_get("/", dashboard)
    app.router.add_get("/static/{name}", static)
    app.router.add_get("/info", info)
    app.router.add_get("/connections", connections)
    app.router.add_delete("/connections/{session}", end_session)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/debug/workers/{index}/tasks", tasks)
    app.router.add_get("/debug/workers/{index}/heap", heap)
    app.router.add_get("/debug/memory", memory)
    return app


async def start(
    board: StatusBoard, actions: WorkerActions, settings: StatusSettings
) -> web.AppRunner:
    # A connection is closed after KEEPALIVE seconds without a whole request (aiohttp's
    # default is an hour), so that idle or half-sent ones cannot pile up in the master.
    app = application(board, actions, own_names(settings, socket.gethostname()))
    runner = web.AppRunner(app, access_log=None, handle_signals=False, keepalive_timeout=KEEPALIVE,
                           shutdown_timeout=SHUTDOWN_WITHIN)  # fmt: skip
    await runner.setup()
    address = settings.http
    try:
        await web.TCPSite(runner, address.host, address.port, reuse_address=True).start()
    except OSError as exc:  # in use, not this host's address, a name that does not resolve
        await runner.cleanup()
        raise OperatorError(f"cannot listen on [status] http {address}: {os_reason(exc)}") from None
    return runner
