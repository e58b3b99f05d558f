"""The status page answers a browser only under its own names (a guard against DNS rebinding):
the pure parts, then the middleware through the real aiohttp application."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer
from test_status_errors import FakeActions

from kilnproxy.config import from_mapping
from master.board import StatusBoard
from master.http import answers_to, application, host_name, own_names

NAMES = frozenset({"kiln-01.corp", "kiln-01"})


@pytest.mark.parametrize(
    ("header", "host"),
    [
        ("127.0.0.1:8022", "127.0.0.1"),
        ("127.0.0.1", "127.0.0.1"),
        ("[::1]:8022", "::1"),
        ("[::1]", "::1"),
        ("Kiln-01.Corp.:8022", "kiln-01.corp"),
        ("localhost", "localhost"),
        ("evil.example:8022:1", "evil.example:8022:1"),
    ],
)
def test_host_name(header: str, host: str) -> None:
    assert host_name(header) == host


def test_what_it_answers_to() -> None:
    for host in ("127.0.0.1", "10.9.8.7", "::1", "fe80::1", "localhost", "kiln.localhost",
                 "kiln-01.corp", "kiln-01"):  # fmt: skip
        assert answers_to(host, NAMES), host
    for host in ("evil.example", "kiln-01.corp.evil.example", "localhost.evil", "", "10.9.8"):
        assert not answers_to(host, NAMES), host


def test_its_own_names(tmp_path: Path) -> None:
    raw = {"status": {"http": "status.kiln-01.corp:8022", "hosts": ["kiln.example"]}}
    settings = from_mapping(raw, tmp_path).status
    assert own_names(settings, "Kiln-01.Corp") == {
        "kiln.example", "kiln-01.corp", "kiln-01", "status.kiln-01.corp",
    }  # fmt: skip


async def status_of(method: str, path: str, headers: dict[str, str]) -> tuple[int, str]:
    app = application(StatusBoard(), FakeActions(None), NAMES)
    async with TestClient(TestServer(app)) as client:
        response = await client.request(method, path, headers=headers)
        return response.status, await response.text()


REQUESTS = [("GET", "/"), ("GET", "/connections"), ("GET", "/info"), ("GET", "/metrics"),
            ("GET", "/debug/workers/0/tasks"), ("DELETE", "/connections/0badf00d")]  # fmt: skip


def test_a_browser_is_refused_under_another_sites_name() -> None:
    """Rebinding makes the page same-origin to the attacker's: Sec-Fetch-Site says so, and
    only the Host header tells them apart."""
    for site in ("same-origin", "none", "cross-site"):
        for method, path in REQUESTS:
            headers = {"Host": "rebound.evil.example:8022", "Sec-Fetch-Site": site}
            status, text = asyncio.run(status_of(method, path, headers))
            assert status == 421, (site, method, path, status)
            assert text == ("this status page does not answer to the name "
                            "'rebound.evil.example': [status] hosts lists the names it "
                            "answers to\n")  # fmt: skip


def test_a_browser_under_an_address_or_its_names_is_served() -> None:
    for host in ("10.1.2.3:8022", "[::1]:8022", "localhost:8022", "KILN-01.corp:8022", "kiln-01"):
        for method, path in REQUESTS:
            headers = {"Host": host, "Sec-Fetch-Site": "same-origin"}
            assert asyncio.run(status_of(method, path, headers))[0] == 200, (host, path)


def test_a_script_may_use_any_name() -> None:
    """curl and Prometheus send no Sec-Fetch-Site: no page of another site is behind them."""
    for method, path in REQUESTS:
        headers = {"Host": "kiln-01.other-name.example:8022"}
        assert asyncio.run(status_of(method, path, headers))[0] == 200, path
