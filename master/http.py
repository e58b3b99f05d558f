"""The intranet status server (SPEC 7), served by the master from what its workers report.

Bound to `[status] http` only (127.0.0.1:8022 by default). Every request is validated before it
reaches the master: a malformed one gets a 4xx with a one-line reason, never a 500.
"""

from __future__ import annotations

import re
import time
from importlib import resources
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from kilnproxy.config import Address, format_uptime
from kilnproxy.version import build_info
from master.metrics import MasterCollector

if TYPE_CHECKING:
    from master.arbiter import Master

SESSION_ID = re.compile(r"[0-9a-f]{8}")
STATIC = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}
MASTER: web.AppKey[Master] = web.AppKey("master")
REGISTRY: web.AppKey[CollectorRegistry] = web.AppKey("registry")


def _asset(name: str) -> bytes:
    return resources.files("master").joinpath("static", name).read_bytes()


def _worker_index(request: web.Request) -> int:
    text = request.match_info["index"]
    if not text.isdigit() or len(text) > 4:
        raise web.HTTPBadRequest(text=f"worker must be a number, not {text!r}\n")
    return int(text)


def _reply(answer: dict[str, Any]) -> web.Response:
    if "error" in answer:
        status = 404 if str(answer["error"]).startswith("no worker") else 503
        return web.json_response({"error": answer["error"]}, status=status)
    return web.json_response(answer.get("data"))


async def dashboard(request: web.Request) -> web.Response:
    return web.Response(body=_asset("dashboard.html"), content_type="text/html")


async def static(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in STATIC:
        raise web.HTTPNotFound(text="no such asset\n")
    return web.Response(body=_asset(name), content_type=STATIC[name])


async def info(request: web.Request) -> web.Response:
    master = request.app[MASTER]
    stamp = build_info()
    now = time.time()
    return web.json_response({
        "version": stamp.version,
        "commit": stamp.commit,
        "commit_count": stamp.commit_count,
        "build_date": stamp.build_date,
        "started_at": master.started_at,
        "now": now,
        "uptime": format_uptime(now - master.started_at),
        "workers": len([w for w in master.workers if w.serving]),
    })  # fmt: skip


async def connections(request: web.Request) -> web.Response:
    now = time.time()
    rows = [row | {"duration": round(now - float(row["started_at"]), 3)}
            for row in request.app[MASTER].table.rows()]  # fmt: skip
    return web.json_response(rows)


async def end_session(request: web.Request) -> web.Response:
    session = request.match_info["session"]
    if not SESSION_ID.fullmatch(session):
        raise web.HTTPBadRequest(text="a session id is 8 hex characters\n")
    answer = request.app[MASTER].kill(session)
    if "error" in answer:
        raise web.HTTPNotFound(text=f"{answer['error']}\n")
    return web.json_response(answer)


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[REGISTRY])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def tasks(request: web.Request) -> web.Response:
    return _reply(await request.app[MASTER].ask(_worker_index(request), "tasks"))


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
    answer = await request.app[MASTER].ask(
        _worker_index(request), "heap", top=top, seconds=seconds, stop=stop, peek=peek
    )
    return _reply(answer)


async def memory(request: web.Request) -> web.Response:
    try:
        since = float(request.query.get("since", "0"))
    except ValueError:
        raise web.HTTPBadRequest(text="since must be a number\n") from None
    return web.json_response({"interval": 1, "workers": request.app[MASTER].memory.snapshot(since)})


def application(master: Master) -> web.Application:
    app = web.Application(client_max_size=64 * 1024)
    app[MASTER] = master
    registry = CollectorRegistry(auto_describe=True)
    registry.register(MasterCollector(master))
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


async def start(master: Master, address: Address) -> web.AppRunner:
    runner = web.AppRunner(application(master), access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, address.host, address.port, reuse_address=True).start()
    return runner
