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
from kilnproxy.control import (
    CountsChanged,
    Offence,
    Offences,
    OthersChanged,
    Penalties,
    StartupTable,
)
from kilnproxy.control import WorkerMessage as Message
from kilnproxy.policy.admission import Refusal, TooManySessions
from kilnproxy.policy.penalty import Penalised, PenaltyEvent, TableFull
from kilnproxy.worker.admission import WorkerAdmission

NET = ipaddress.ip_network


def limits(**raw: Any) -> LimitSettings:
    return from_mapping({"limits": raw}, Path("/")).limits


class Rig:
    def __init__(self, table: StartupTable | None = None, slot: int = 0, **raw: Any) -> None:
        self.now = 1000.0
        self.refusals: Counter[Refusal] = Counter()
        self.sent: list[Message] = []
        self.master_reads = True  # False: as a master that is stopped, or whose loop is stuck
        self.admission = WorkerAdmission(
            limits(**raw), self.refused, clock=lambda: self.now, rng=random.Random(7),
            table=table, slot=slot,
        )  # fmt: skip

    def refused(self, reason: Refusal) -> None:
        self.refusals[reason] += 1

    def connect(self, host: str) -> Any:
        return self.admission.admit((host, 40000))

    def talking(self) -> None:
        """From now on, what changes is told the master (as once the control channel is up)."""
        self.admission.report_to(self.send)

    def send(self, message: Message) -> bool:
        if self.master_reads:
            self.sent.append(message)
        return self.master_reads


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
    """Two workers on one startup table, as the master's workers are: each decides on the
    other's connections as they are now, with no message in between."""
    table = StartupTable.create(slots=4)
    one = Rig(table, 0, max_startups="20:100:20", max_startups_per_source=3)
    two = Rig(table, 3, max_startups="20:100:20", max_startups_per_source=3)
    held = [one.connect("127.0.0.3"), two.connect("127.0.0.3")]
    held += [one.connect(f"127.0.1.{i}") for i in range(16)]
    assert all(held) and table.total() == 18
    assert two.connect("127.0.0.3") is not None  # 2 on the host and this one: 3
    assert one.connect("127.0.0.3") is None  # 3 from it: per source
    assert one.connect("127.0.0.5") is not None
    assert two.connect("127.0.0.4") is None  # 20 on the host: full
    held[-1].authenticated()
    held[-2].closed(PenaltyEvent.NOAUTH)
    assert table.total() == 18
    assert two.connect("127.0.0.4") is not None
    assert one.refusals == {Refusal.PER_SOURCE: 1} and two.refusals == {Refusal.FULL: 1}
    # A worker that is gone: the master clears its slot, and what it held is held no more.
    table.clear(0)
    assert table.total() == 3  # two's: two from 127.0.0.3, one from 127.0.0.4
    admitted = [two.connect("127.0.0.3") is not None for _ in range(2)]
    assert admitted == [True, False]  # one's from 127.0.0.3 no longer count
    table.clear(3)
    assert table.total() == 0


def test_sources_that_share_a_bucket_are_counted_together() -> None:
    """Only a hash collision makes a per-source count too high, never too low."""
    table = StartupTable.create(slots=1, buckets=1)
    rig = Rig(table, 0, max_startups_per_source=2)
    assert rig.connect("192.0.2.1") and rig.connect("198.51.100.1")
    assert rig.connect("203.0.113.1") is None
    assert rig.refusals == {Refusal.PER_SOURCE: 1}


def test_startups_are_counted_at_once_and_offences_told_once_per_pass() -> None:
    async def body() -> None:
        table = StartupTable.create(slots=2)
        rig = Rig(table, 1)
        a = rig.connect("192.0.2.1")  # before the channel is up
        rig.talking()
        b, c = rig.connect("192.0.2.1"), rig.connect("2001:db8::1")
        d = rig.connect("192.0.2.9")
        assert table.total() == 4  # in the table as admitted: no message to wait for
        assert table.from_source(table.buckets_of(NET("192.0.2.1/32"))) == 2
        d.authenticated()
        assert table.total() == 3
        a.closed(PenaltyEvent.NOAUTH)
        b.closed(PenaltyEvent.AUTHFAIL)
        c.authenticated()
        c.closed(PenaltyEvent.NOAUTH)  # authenticated: never penalised
        assert table.total() == 0 and rig.sent == []
        await next_pass()
        offences = (
            Offence(ipaddress.ip_address("192.0.2.1"), PenaltyEvent.NOAUTH),
            Offence(ipaddress.ip_address("192.0.2.1"), PenaltyEvent.AUTHFAIL),
        )
        assert rig.sent == [Offences(offences)]
        await next_pass()
        assert len(rig.sent) == 1  # nothing more

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
        rig.admission.others_changed(OthersChanged({"acme": 1}))
        rig.admission.open_session("acme")
        with pytest.raises(TooManySessions):
            rig.admission.open_session("acme")
        rig.admission.open_session("hooli")
        rig.admission.others_changed(OthersChanged({"acme": -1}))
        rig.admission.open_session("acme")
        rig.admission.close_session("hooli")
        await next_pass()
        assert rig.sent == [CountsChanged({"acme": 2})]
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


def test_while_the_master_reads_nothing_its_messages_are_held_merged_and_bounded(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stopped master must not make a worker pile up one message a pass: the counts are
    merged by account, offences kept up to a bound (the oldest dropped), and all of it told
    in one message each once the master reads again."""
    monkeypatch.setattr("kilnproxy.worker.admission.HELD_OFFENCES", 3)

    async def body() -> None:
        rig = Rig(max_sessions_per_account=50)
        rig.talking()
        rig.master_reads = False
        for n in range(5):
            rig.admission.open_session("acme")
            rig.admission.open_session("hooli")
            rig.admission.close_session("hooli")
            rig.connect(f"192.0.2.{n}").closed(PenaltyEvent.NOAUTH)
            await next_pass()
        rig.admission.resume()  # too soon: still held
        await next_pass()
        assert rig.sent == []
        rig.master_reads = True
        with caplog.at_level(logging.WARNING, logger="kilnproxy.admission"):
            rig.admission.resume()
            await next_pass()
        kept = tuple(
            Offence(ipaddress.ip_address(f"192.0.2.{n}"), PenaltyEvent.NOAUTH) for n in (2, 3, 4)
        )
        assert rig.sent == [CountsChanged({"acme": 5}), Offences(kept)]  # hooli's: nothing
        assert [r.getMessage() for r in caplog.records] == [
            "2 offence(s) were dropped, the oldest, while the master read nothing"
        ]
        rig.admission.close_session("acme")
        await next_pass()
        assert rig.sent[2:] == [CountsChanged({"acme": -1})]  # the held ones are gone

    asyncio.run(body())
