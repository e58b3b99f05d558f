"""The status page answers only under an address or its own names (a guard against DNS
rebinding): the pure parts, then the middleware through the real aiohttp application."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer
from test_status_errors import FakeActions

from kilnproxy.config import from_mapping
from master.board import StatusBoard
from master.http import REFUSED_LOGGED, answers_to, application, host_name, own_names

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


def test_a_request_under_another_name_is_refused() -> None:
    """Rebinding makes the page same-origin to the attacker's, and to a plain-HTTP page a
    browser sends no Sec-Fetch-Site at all: only the Host header tells them apart."""
    for site in ("same-origin", "none", "cross-site", None):
        for method, path in REQUESTS:
            headers = {"Host": "rebound.evil.example:8022"}
            if site is not None:
                headers["Sec-Fetch-Site"] = site
            status, text = asyncio.run(status_of(method, path, headers))
            assert status == 421, (site, method, path, status)
            assert text == ("this status page does not answer to the name "
                            "'rebound.evil.example': [status] hosts lists the names it "
                            "answers to\n")  # fmt: skip


def test_under_an_address_or_its_names_it_answers() -> None:
    for host in ("10.1.2.3:8022", "[::1]:8022", "localhost:8022", "KILN-01.corp:8022", "kiln-01"):
        for site in ("same-origin", None):
            for method, path in REQUESTS:
                headers = {"Host": host} | ({"Sec-Fetch-Site": site} if site else {})
                assert asyncio.run(status_of(method, path, headers))[0] == 200, (host, path)


def test_each_refused_name_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    async def refused(names: list[str]) -> list[int]:
        app = application(StatusBoard(), FakeActions(None), NAMES)
        async with TestClient(TestServer(app)) as client:
            return [(await client.get("/info", headers={"Host": name})).status for name in names]

    names = ["scraper.corp", "scraper.corp", *(f"n{i}.rebound.example" for i in range(40))]
    with caplog.at_level(logging.WARNING, logger="kilnproxy.master"):
        assert asyncio.run(refused(names)) == [421] * len(names)
    lines = [r.getMessage() for r in caplog.records if "refused a request" in r.getMessage()]
    assert lines[0] == ("status page: refused a request for the name 'scraper.corp'; if it is "
                        "this host's, add it to [status] hosts")  # fmt: skip
    assert len(lines) == REFUSED_LOGGED  # one for scraper.corp, then the first 31 others
