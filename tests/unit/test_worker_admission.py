"""A worker's admission, driven as the listener, the sessions and the master drive it: what it
decides at accept, and what it tells the master, once per pass of the event loop."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from kilnproxy.config import LimitSettings, from_mapping
from kilnproxy.control import CountsChanged, Offence, Offences, OthersChanged, Penalties
from kilnproxy.control import WorkerMessage as Message
from kilnproxy.policy.admission import Refusal, StartupCounts, TooManySessions
from kilnproxy.policy.penalty import Penalised, PenaltyEvent, TableFull
from kilnproxy.worker.admission import WorkerAdmission

NET = ipaddress.ip_network


def limits(**raw: Any) -> LimitSettings:
    return from_mapping({"limits": raw}, Path("/")).limits


class Rig:
    def __init__(self, **raw: Any) -> None:
        self.now = 1000.0
        self.refusals: Counter[Refusal] = Counter()
        self.sent: list[Message] = []
        self.admission = WorkerAdmission(
            limits(**raw), self.refused, clock=lambda: self.now, rng=random.Random(7)
        )

    def refused(self, reason: Refusal) -> None:
        self.refusals[reason] += 1

    def connect(self, host: str) -> Any:
        return self.admission.admit((host, 40000))

    def talking(self) -> None:
        """From now on, what changes is told the master (as once the control channel is up)."""
        self.admission.report_to(self.sent.append)


async def next_pass() -> None:
    await asyncio.sleep(0)


def test_per_source_then_host_wide_limits_and_refusals_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rig = Rig(max_startups="15:100:15", max_startups_per_source=10)
    with caplog.at_level(logging.WARNING, logger="kilnproxy.admission"):
        held = [rig.connect("127.0.0.3") for _ in range(10)]
        assert all(held)
        assert [rig.connect("127.0.0.3") for _ in range(50)] == [None] * 50
        others = [rig.connect(f"127.0.1.{i}") for i in range(5)]
        assert all(others)
        assert rig.connect("127.0.2.1") is None  # 15 in flight: full
    assert rig.refusals == {Refusal.PER_SOURCE: 50, Refusal.FULL: 1}
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == (
        "refused connection from 127.0.0.3:40000: max_startups_per_source: "
        "10 unauthenticated from 127.0.0.3/32"
    )
    assert len(lines) == 6  # five of the flood, then the first of another reason
    assert lines[-1].endswith("max_startups: 15 unauthenticated connections, full at 15")
    held[0].authenticated()
    held[1].closed(PenaltyEvent.NOAUTH)
    held[1].closed(PenaltyEvent.NOAUTH)  # once only
    assert rig.connect("127.0.0.3") is not None
    assert rig.connect("127.0.0.3") is not None
    assert rig.connect("127.0.0.3") is None


def test_the_rest_of_the_host_counts_too() -> None:
    rig = Rig(max_startups="20:100:20", max_startups_per_source=3)
    rig.admission.others_changed(OthersChanged(StartupCounts(19, {NET("127.0.0.3/32"): 2}), {}))
    assert rig.connect("127.0.0.3") is not None  # 2 elsewhere and this one: 3
    assert rig.connect("127.0.0.4") is None  # 19 elsewhere, 1 here: full
    rig.admission.others_changed(OthersChanged(-StartupCounts(5, {NET("127.0.0.3/32"): 2}), {}))
    assert rig.connect("127.0.0.3") is not None
    assert rig.connect("127.0.0.3") is not None
    assert rig.connect("127.0.0.3") is None  # 3 of its own
    assert rig.refusals == {Refusal.FULL: 1, Refusal.PER_SOURCE: 1}


def test_what_changed_in_a_pass_is_one_message() -> None:
    async def body() -> None:
        rig = Rig()
        a = rig.connect("192.0.2.1")  # before the channel is up: told once it is
        rig.talking()
        b, c = rig.connect("192.0.2.1"), rig.connect("2001:db8::1")
        d = rig.connect("192.0.2.9")
        d.authenticated()  # in and out within the pass: nothing to say about it
        assert rig.sent == []
        await next_pass()
        both = StartupCounts(3, {NET("192.0.2.1/32"): 2, NET("2001:db8::1/128"): 1})
        assert rig.sent == [CountsChanged(both, {})]
        rig.sent.clear()
        a.closed(PenaltyEvent.NOAUTH)
        b.closed(PenaltyEvent.AUTHFAIL)
        c.authenticated()
        c.closed(PenaltyEvent.NOAUTH)  # authenticated: never penalised
        await next_pass()
        ended = StartupCounts(-3, {NET("192.0.2.1/32"): -2, NET("2001:db8::1/128"): -1})
        offences = (
            Offence(ipaddress.ip_address("192.0.2.1"), PenaltyEvent.NOAUTH),
            Offence(ipaddress.ip_address("192.0.2.1"), PenaltyEvent.AUTHFAIL),
        )
        assert rig.sent == [CountsChanged(ended, {}), Offences(offences)]
        await next_pass()
        assert len(rig.sent) == 2  # nothing more

    asyncio.run(body())


def test_exempt_sources_and_penalties_off_send_no_offences() -> None:
    async def body() -> None:
        for raw in ({"penalty_exempt": ["192.0.2.0/24"]}, {"penalties": False},
                    {"penalty_noauth": "0s"}):  # fmt: skip
            rig = Rig(**raw)
            rig.talking()
            rig.connect("192.0.2.1").closed(PenaltyEvent.NOAUTH)
            await next_pass()
            assert not any(isinstance(m, Offences) for m in rig.sent), raw

    asyncio.run(body())


def test_penalties_from_the_master_refuse_until_they_expire() -> None:
    rig = Rig(penalty_netblock="24:64")
    until = rig.now + 30
    rig.admission.penalties(
        Penalties((Penalised(NET("192.0.2.0/24"), until, PenaltyEvent.AUTHFAIL),))
    )
    assert rig.connect("192.0.2.200") is None
    assert rig.connect("192.0.3.1") is not None
    rig.now = until + 0.001
    assert rig.connect("192.0.2.200") is not None
    rig.admission.penalties(Penalties(table_full=(TableFull(6, rig.now + 5),)))
    assert rig.connect("2001:db8::1") is None
    assert rig.connect("192.0.2.201") is not None
    assert rig.refusals == {Refusal.PENALTY: 1, Refusal.PENALTY_TABLE_FULL: 1}


def test_sessions_per_account_across_the_host() -> None:
    async def body() -> None:
        rig = Rig(max_sessions_per_account=2)
        rig.talking()
        rig.admission.others_changed(OthersChanged(StartupCounts(), {"acme": 1}))
        rig.admission.open_session("acme")
        with pytest.raises(TooManySessions):
            rig.admission.open_session("acme")
        rig.admission.open_session("hooli")
        rig.admission.others_changed(OthersChanged(StartupCounts(), {"acme": -1}))
        rig.admission.open_session("acme")
        rig.admission.close_session("hooli")
        await next_pass()
        assert rig.sent == [CountsChanged(StartupCounts(), {"acme": 2})]
        assert rig.refusals == {Refusal.ACCOUNT_SESSIONS: 1}

    asyncio.run(body())


def test_without_a_cap_sessions_are_not_told() -> None:
    async def body() -> None:
        rig = Rig()
        rig.talking()
        for _ in range(100):
            rig.admission.open_session("acme")
        await next_pass()
        assert rig.sent == []

    asyncio.run(body())
