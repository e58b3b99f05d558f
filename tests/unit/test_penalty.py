"""Per-source penalties on OpenSSH's model (SPEC 4b), on a fake clock: events add up, activate
past `min`, cap at `max`, expire; netblocks group sources; exempt CIDRs; a bounded table with
both overflow modes; and a worker's view, fed only the box's notices, refuses what the box does."""

from __future__ import annotations

import dataclasses
import ipaddress
import random

from kilnproxy.policy.admission import IPAddress, NetblockSize, Refusal, parse_exempt
from kilnproxy.policy.penalty import (
    Deadlines,
    Lifted,
    Overflow,
    Penalised,
    PenaltyBox,
    PenaltyEvent,
    PenaltySettings,
    PenaltyStatistics,
    PenaltyView,
    TableFull,
    event_for,
)

AUTHFAIL, NOAUTH, GRACE = PenaltyEvent.AUTHFAIL, PenaltyEvent.NOAUTH, PenaltyEvent.GRACE_EXCEEDED


def addr(text: str) -> IPAddress:
    return ipaddress.ip_address(text)


def box(**changes: object) -> PenaltyBox:
    return PenaltyBox(dataclasses.replace(PenaltySettings(), **changes))  # type: ignore[arg-type]


def test_defaults_are_openssh_s() -> None:
    settings = PenaltySettings()
    assert (settings.authfail, settings.noauth, settings.grace_exceeded) == (5, 1, 10)
    assert (settings.min, settings.max) == (15, 600)
    assert (settings.max_sources4, settings.max_sources6) == (65536, 65536)
    assert settings.overflow4 is settings.overflow6 is Overflow.PERMISSIVE
    assert settings.netblock == NetblockSize(32, 128) and settings.exempt == ()


def test_how_a_connection_ended_is_one_event() -> None:
    assert event_for(attempted=True, grace_expired=False) is AUTHFAIL
    assert event_for(attempted=False, grace_expired=False) is NOAUTH
    assert event_for(attempted=True, grace_expired=True) is GRACE
    assert event_for(attempted=False, grace_expired=True) is GRACE


def test_penalties_accumulate_and_refuse_only_past_min() -> None:
    penalties, source = box(), addr("192.0.2.7")
    for _ in range(3):
        assert penalties.record(source, AUTHFAIL, 100.0) == ()  # 15 s: not more than min
    assert penalties.refusal(source, 100.0) is None
    notices = penalties.record(source, AUTHFAIL, 100.0)
    assert notices == (Penalised(ipaddress.ip_network("192.0.2.7/32"), 120.0, AUTHFAIL),)
    assert penalties.refusal(source, 100.0) is Refusal.PENALTY
    assert penalties.refusal(addr("192.0.2.8"), 100.0) is None
    assert penalties.statistics(100.0).penalised == 1


def test_seconds_add_to_what_is_left_not_to_now() -> None:
    penalties, source = box(), addr("192.0.2.7")
    penalties.record(source, GRACE, 0.0)  # until 10
    penalties.record(source, AUTHFAIL, 4.0)  # until 15 (from now it would be 9)
    assert penalties.refusal(source, 4.0) is None  # 11 s left
    # Until 25: 21 s left, past min. Counted from now it would be 14 s, and no refusal.
    notices = penalties.record(source, GRACE, 4.0)
    assert notices == (Penalised(ipaddress.ip_network("192.0.2.7/32"), 25.0, GRACE),)


def test_a_penalty_left_to_decay_never_activates() -> None:
    penalties, source = box(), addr("192.0.2.7")
    for second in range(0, 600, 6):  # 5 s every 6 s: the debt never builds up
        assert penalties.record(source, AUTHFAIL, float(second)) == ()
        assert penalties.refusal(source, float(second)) is None


def test_penalties_are_capped_at_max_and_expire() -> None:
    penalties, source = box(), addr("2001:db8::7")
    for _ in range(500):
        notices = penalties.record(source, GRACE, 50.0)
    assert notices == (Penalised(ipaddress.ip_network("2001:db8::7/128"), 650.0, GRACE),)
    assert penalties.refusal(source, 649.0) is Refusal.PENALTY
    # Active until it expires, though less than min is left by then; at the deadline still.
    assert penalties.refusal(source, 650.0) is Refusal.PENALTY
    assert penalties.refusal(source, 650.001) is None
    assert penalties.statistics(650.001) == PenaltyStatistics(0, 0, 0, ())


def test_a_single_event_above_max_is_cut_to_max() -> None:
    penalties, source = box(grace_exceeded=3600.0), addr("192.0.2.7")
    (notice,) = penalties.record(source, GRACE, 0.0)
    assert isinstance(notice, Penalised) and notice.until == 600.0


def test_netblocks_share_one_penalty() -> None:
    penalties = box(netblock=NetblockSize(24, 64))
    for host in ("192.0.2.1", "192.0.2.2", "192.0.2.3", "192.0.2.4"):
        penalties.record(addr(host), AUTHFAIL, 0.0)
    for host in ("2001:db8:1:2::1", "2001:db8:1:2:ffff::2"):
        penalties.record(addr(host), GRACE, 0.0)
    assert penalties.refusal(addr("192.0.2.250"), 1.0) is Refusal.PENALTY
    assert penalties.refusal(addr("192.0.3.1"), 1.0) is None
    assert penalties.refusal(addr("2001:db8:1:2:abcd::1"), 1.0) is Refusal.PENALTY
    assert penalties.refusal(addr("2001:db8:1:3::1"), 1.0) is None
    stats = penalties.statistics(1.0)
    assert (stats.tracked4, stats.tracked6, stats.penalised) == (1, 1, 2)


def test_exempt_sources_are_never_penalised() -> None:
    exempt = parse_exempt(["192.0.2.0/28", "2001:db8::/32"])
    penalties = box(exempt=exempt, netblock=NetblockSize(24, 64))
    for _ in range(10):
        assert penalties.record(addr("192.0.2.5"), GRACE, 0.0) == ()
        assert penalties.record(addr("2001:db8::5"), GRACE, 0.0) == ()
    assert penalties.statistics(0.0).tracked4 == 0
    # Exemption is by address: a neighbour outside the list penalises the /24, the exempt one
    # still gets in.
    penalties.record(addr("192.0.2.100"), GRACE, 0.0)
    penalties.record(addr("192.0.2.100"), GRACE, 0.0)
    assert penalties.refusal(addr("192.0.2.101"), 0.0) is Refusal.PENALTY
    assert penalties.refusal(addr("192.0.2.5"), 0.0) is None


def test_disabled_or_zero_penalties_record_nothing() -> None:
    off = box(enabled=False)
    assert off.record(addr("192.0.2.1"), GRACE, 0.0) == ()
    assert off.refusal(addr("192.0.2.1"), 0.0) is None
    no_noauth = box(noauth=0.0)
    for _ in range(100):
        assert no_noauth.record(addr("192.0.2.1"), NOAUTH, 0.0) == ()
    assert no_noauth.statistics(0.0).tracked4 == 0


def test_min_zero_refuses_at_the_first_penalty() -> None:
    penalties = box(min=0.0)
    assert penalties.record(addr("192.0.2.1"), NOAUTH, 0.0) != ()
    assert penalties.refusal(addr("192.0.2.1"), 0.5) is Refusal.PENALTY


# -- the bounded table -----------------------------------------------------------------------------


def test_permissive_overflow_forgets_the_soonest_to_expire() -> None:
    penalties = box(max_sources4=3, grace_exceeded=25.0)  # one grace event is a penalty
    first, second, third = (addr(f"192.0.2.{i}") for i in (1, 2, 3))
    penalties.record(second, GRACE, 0.0)  # until 25
    penalties.record(first, GRACE, 5.0)  # until 30
    penalties.record(third, GRACE, 10.0)  # until 35
    # A fourth source, with 1 s: it is the soonest to expire, so it is the one dropped (as in
    # sshd, which evicts after inserting).
    assert penalties.record(addr("192.0.2.9"), NOAUTH, 10.0) == ()
    assert penalties.statistics(10.0).tracked4 == 3
    notices = penalties.record(addr("192.0.2.10"), GRACE, 10.0)  # until 35
    assert notices == (
        Penalised(ipaddress.ip_network("192.0.2.10/32"), 35.0, GRACE),
        Lifted(ipaddress.ip_network("192.0.2.2/32")),
    )
    assert penalties.refusal(second, 10.0) is None
    assert penalties.refusal(first, 10.0) is Refusal.PENALTY
    assert penalties.statistics(10.0) == PenaltyStatistics(3, 0, 3, ())
    # The IPv6 table is separate.
    penalties.record(addr("2001:db8::1"), NOAUTH, 10.0)
    assert penalties.statistics(10.0).tracked6 == 1


def test_deny_all_overflow_refuses_the_family_until_one_expires() -> None:
    penalties = box(max_sources4=2, overflow4=Overflow.DENY_ALL)
    assert penalties.record(addr("192.0.2.1"), NOAUTH, 0.0) == ()  # until 1, inactive
    notices = penalties.record(addr("192.0.2.2"), AUTHFAIL, 0.0)  # until 5, inactive
    assert notices == (TableFull(4, 1.0),)
    assert penalties.refusal(addr("203.0.113.1"), 0.5) is Refusal.PENALTY_TABLE_FULL
    assert penalties.refusal(addr("2001:db8::1"), 0.5) is None  # IPv6 is not affected
    assert penalties.statistics(0.5).table_full == (4,)
    # While full, no event is taken, not even for a netblock already tracked.
    assert penalties.record(addr("192.0.2.2"), GRACE, 0.5) == ()
    assert penalties.record(addr("192.0.2.3"), GRACE, 0.5) == ()
    assert penalties.refusal(addr("203.0.113.1"), 1.0) is Refusal.PENALTY_TABLE_FULL
    assert penalties.refusal(addr("203.0.113.1"), 1.5) is None
    assert penalties.statistics(1.5).table_full == ()


def test_deny_all_spares_exempt_sources() -> None:
    penalties = box(
        max_sources4=1, overflow4=Overflow.DENY_ALL, exempt=parse_exempt(["10.0.0.0/8"])
    )
    penalties.record(addr("192.0.2.1"), GRACE, 0.0)
    assert penalties.refusal(addr("192.0.2.99"), 1.0) is Refusal.PENALTY_TABLE_FULL
    assert penalties.refusal(addr("10.1.2.3"), 1.0) is None


def test_expiry_is_swept_from_a_large_table() -> None:
    penalties = box()
    for i in range(5000):  # a new source every millisecond, each with 10 s
        penalties.record(ipaddress.IPv4Address(0x0A000000 + i), GRACE, i / 1000)
    assert penalties.statistics(4.999).tracked4 == 5000
    assert penalties.statistics(12.5).tracked4 == 2500  # those recorded from 2.5 s on
    assert penalties.statistics(200.0).tracked4 == 0


# -- deadlines -------------------------------------------------------------------------------------


def test_deadlines_expire_in_order_and_keep_the_heap_bounded() -> None:
    deadlines: Deadlines[str] = Deadlines()
    for i in range(10_000):
        deadlines.set("again", float(i))  # one key moved 10,000 times
    deadlines.set("early", 5.0)
    deadlines.set("late", 20_000.0)
    assert len(deadlines) == 3 and deadlines.heap_size <= 2 * 3 + 64 + 1
    assert deadlines.pop_expired(5.0) == []  # at its deadline a key is still in force
    assert deadlines.pop_expired(5.5) == ["early"]
    assert deadlines.soonest() == ("again", 9999.0)
    assert deadlines.pop_expired(30_000.0) == ["again", "late"]
    assert len(deadlines) == 0 and deadlines.soonest() is None


# -- the worker's view -----------------------------------------------------------------------------


def test_a_view_fed_the_notices_refuses_what_the_box_refuses() -> None:
    settings = dataclasses.replace(
        PenaltySettings(),
        netblock=NetblockSize(24, 64),
        max_sources4=10,
        max_sources6=4,
        overflow6=Overflow.DENY_ALL,
        exempt=parse_exempt(["192.0.2.128/25"]),
    )
    rng = random.Random(2024)
    penalties, view = PenaltyBox(settings), PenaltyView(settings)
    sources = [addr(f"192.0.{i}.{i * 5 % 256}") for i in range(1, 40)]
    sources += [addr(f"2001:db8:{i}::1") for i in range(1, 15)]
    sources += [addr("192.0.2.200"), addr("192.0.2.20")]
    now, refused, kinds = 0.0, 0, set()
    for _ in range(4000):
        now += rng.choice((0.0, 0.01, 0.1, 1.0))
        source = rng.choice(sources[:6] if rng.random() < 0.5 else sources)  # some are busy
        for notice in penalties.record(source, rng.choice(list(PenaltyEvent)), now):
            view.apply(notice)
            kinds.add(type(notice))
        probe = rng.choice(sources)
        verdict = penalties.refusal(probe, now)
        assert view.refusal(probe, now) is verdict
        refused += verdict is not None
        if rng.random() < 0.01:  # a worker started late catches up from sync()
            late = PenaltyView(settings)
            for notice in penalties.sync(now):
                late.apply(notice)
            assert all(late.refusal(s, now) is penalties.refusal(s, now) for s in sources)
    assert kinds == {Penalised, Lifted, TableFull}
    assert 400 < refused < 3600  # the walk went through both states, often
    view.expire(now)
    assert len(view) == penalties.statistics(now).penalised
