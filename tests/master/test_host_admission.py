"""The host's side of admission, fed as the supervisor feeds it (no processes): every worker is
told what the others hold, a worker that leaves takes its counts with it, offences become
penalties for every worker."""

from __future__ import annotations

import ipaddress

from kilnproxy.control import CountsChanged, Offence, Offences, OthersChanged, Penalties
from kilnproxy.policy.admission import StartupCounts
from kilnproxy.policy.penalty import Penalised, PenaltyEvent, PenaltySettings
from master.admission import AdmissionStats, HostAdmission

A, B = ipaddress.ip_network("192.0.2.1/32"), ipaddress.ip_network("198.51.100.7/32")
ATTACKER = ipaddress.ip_address("203.0.113.9")


class Clock:
    def __init__(self) -> None:
        self.now = 5000.0

    def __call__(self) -> float:
        return self.now


def test_each_worker_hears_the_others_summed_once_per_pass() -> None:
    host = HostAdmission(PenaltySettings())
    assert host.joined(100) == [OthersChanged(StartupCounts(), {})]
    host.joined(101)
    host.joined(102)
    host.changed(100, CountsChanged(StartupCounts(2, {A: 2}), {"acme": 1}))
    host.changed(101, CountsChanged(StartupCounts(1, {B: 1}), {}))
    host.changed(100, CountsChanged(StartupCounts(-1, {A: -1}), {"acme": -1}))
    told = host.outbox()
    assert told == {
        100: OthersChanged(StartupCounts(1, {B: 1}), {}),
        101: OthersChanged(StartupCounts(1, {A: 1}), {}),  # acme's session came and went
        102: OthersChanged(StartupCounts(2, {A: 1, B: 1}), {}),
    }
    assert host.outbox() == {}
    assert host.statistics().unauthenticated == 2
    # A newcomer is told all of it at once.
    host.changed(101, CountsChanged(StartupCounts(), {"acme": 2}))
    assert host.joined(103)[0] == OthersChanged(StartupCounts(2, {A: 1, B: 1}), {"acme": 2})


def test_a_worker_that_left_takes_its_counts_and_says_nothing_more() -> None:
    host = HostAdmission(PenaltySettings())
    host.joined(100)
    host.joined(101)
    host.changed(100, CountsChanged(StartupCounts(3, {A: 3}), {"acme": 1}))
    host.outbox()
    host.left(100)
    assert host.outbox() == {101: OthersChanged(StartupCounts(-3, {A: -3}), {"acme": -1})}
    host.changed(100, CountsChanged(StartupCounts(-3, {A: -3}), {}))  # read after it exited
    host.left(100)
    assert host.outbox() == {}
    assert host.statistics().unauthenticated == 0


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
