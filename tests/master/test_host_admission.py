"""The host's side of admission, fed as the supervisor feeds it (no processes): every worker is
told the sessions the others hold, a worker that leaves takes its counts with it (its slot of
the startup table too), offences become penalties for every worker."""

from __future__ import annotations

import ipaddress

from kilnproxy.control import CountsChanged, Offence, Offences, OthersChanged, Penalties
from kilnproxy.policy.penalty import Penalised, PenaltyEvent, PenaltySettings
from master.admission import AdmissionStats, HostAdmission

A, B = ipaddress.ip_network("192.0.2.1/32"), ipaddress.ip_network("198.51.100.7/32")
ATTACKER = ipaddress.ip_address("203.0.113.9")


class Clock:
    def __init__(self) -> None:
        self.now = 5000.0

    def __call__(self) -> float:
        return self.now


def test_each_worker_hears_the_others_sessions_summed_once_per_pass() -> None:
    host = HostAdmission(PenaltySettings())
    assert host.joined(100) == [OthersChanged({})]
    host.joined(101)
    host.joined(102)
    host.changed(100, CountsChanged({"acme": 1}))
    host.changed(101, CountsChanged({"hooli": 1}))
    host.changed(100, CountsChanged({"acme": -1}))
    assert host.outbox() == {
        100: OthersChanged({"hooli": 1}),
        102: OthersChanged({"hooli": 1}),  # acme's session came and went
    }
    assert host.outbox() == {}
    # A newcomer is told all of it at once.
    host.changed(101, CountsChanged({"acme": 2}))
    assert host.joined(103)[0] == OthersChanged({"acme": 2, "hooli": 1})


def test_a_worker_that_left_takes_its_sessions_and_says_nothing_more() -> None:
    host = HostAdmission(PenaltySettings())
    host.joined(100)
    host.joined(101)
    host.changed(100, CountsChanged({"acme": 1}))
    host.outbox()
    host.left(100)
    assert host.outbox() == {101: OthersChanged({"acme": -1})}
    host.changed(100, CountsChanged({"acme": -1}))  # after it exited
    host.left(100)
    assert host.outbox() == {}


def test_slots_of_the_startup_table_are_never_shared_and_cleared_when_left() -> None:
    """A draining worker keeps its slot until it exits; its replacement gets another; the
    slot of a worker that is gone (SIGKILLed included) is zeroed before it is given again."""
    host = HostAdmission(PenaltySettings(), slots=3)
    table = host.table
    old, other = host.claim_slot(), host.claim_slot()
    assert (old, other) == (0, 1)
    host.joined(100, old)
    host.joined(101, other)
    table.add(0, table.buckets_of(A), 4)  # as worker 100 would: it holds four from A
    table.add(1, table.buckets_of(B), 1)
    assert host.statistics().unauthenticated == 5
    replacement = host.claim_slot()  # old drains beside it: not old's slot
    assert replacement == 2 and host.claim_slot() is None
    host.joined(102, replacement)
    host.left(100)  # exited, or was killed, holding its four
    assert host.statistics().unauthenticated == 1
    assert table.from_source(table.buckets_of(A)) == 0
    assert host.claim_slot() == 0
    host.release_slot(0)  # a spawn that failed gives its slot back
    host.left(101)
    host.left(102)
    assert [host.claim_slot() for _ in range(4)] == [0, 1, 2, None]
    assert table.total() == 0


def test_offences_become_penalties_for_every_worker() -> None:
    clock = Clock()
    host = HostAdmission(PenaltySettings(), clock)
    failed = Offences((Offence(ATTACKER, PenaltyEvent.AUTHFAIL),))
    assert host.offences(failed) == []  # 5s: not over min (15s) yet
    clock.now += 1
    assert host.offences(failed) == []
    clock.now += 1
    assert host.offences(failed) == []
    (penalties,) = host.offences(failed)  # 5 + 4 + 4 + 5 = 18s left: over 15s
    netblock = ipaddress.ip_network("203.0.113.9/32")
    assert penalties == Penalties((Penalised(netblock, clock.now + 18.0, PenaltyEvent.AUTHFAIL),))
    assert host.statistics() == AdmissionStats(unauthenticated=0, penalised=1, tracked=1)
    # A worker that starts now is told of it.
    assert host.joined(104)[1:] == [penalties]
    clock.now += 19
    assert host.statistics().penalised == 0


def test_a_reload_with_new_penalty_settings_starts_a_new_table() -> None:
    host = HostAdmission(PenaltySettings(min=0.0))
    host.offences(Offences((Offence(ATTACKER, PenaltyEvent.NOAUTH),)))
    assert host.statistics().penalised == 1
    host.reconfigure(PenaltySettings(min=0.0))  # the same: kept
    assert host.statistics().penalised == 1
    host.reconfigure(PenaltySettings(min=0.0, noauth=2.0))
    assert host.statistics() == AdmissionStats(0, 0, 0)
