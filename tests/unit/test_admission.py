"""The accept-time and session-time admission decisions of SPEC 4b, on a fake clock and a seeded
random source: OpenSSH's MaxStartups random early drop, PerSourceMaxStartups over netblocks, the
bucket a source is counted in host-wide, the per-account session cap, and the refusal log limit."""

from __future__ import annotations

import ipaddress
import random
from collections import Counter

import pytest

from kilnproxy.errors import client_line
from kilnproxy.policy.admission import (
    BUCKETS_PER_SOURCE,
    AccountSessions,
    IPAddress,
    Netblock,
    NetblockSize,
    Refusal,
    RefusalLog,
    StartupGate,
    StartupLimits,
    TooManySessions,
    admit,
    netblock_of,
    parse_exempt,
    parse_max_startups,
    parse_netblock_size,
    source_address,
    source_buckets,
)

TRIALS = 20_000


def addr(text: str) -> IPAddress:
    return ipaddress.ip_address(text)


def gate(spec: str = "10:30:100", per_source: int = 0, seed: int = 7) -> StartupGate:
    return StartupGate(parse_max_startups(spec), per_source, random.Random(seed))


# -- settings --------------------------------------------------------------------------------------


def test_max_startups_forms() -> None:
    assert parse_max_startups("10:30:100") == StartupLimits(10, 30, 100)
    assert parse_max_startups(" 5:100:5 ") == StartupLimits(5, 100, 5)
    assert parse_max_startups("50") == StartupLimits(50, 100, 50)
    assert str(StartupLimits()) == "10:30:100"


@pytest.mark.parametrize(
    "text", ["", "10:30", "10:30:100:1", "0:30:100", "100:30:10", "10:0:100", "10:101:100", "a"]
)
def test_bad_max_startups(text: str) -> None:
    with pytest.raises(ValueError):
        parse_max_startups(text)


def test_netblock_sizes() -> None:
    assert parse_netblock_size("32:128") == NetblockSize(32, 128)
    assert parse_netblock_size("24:64") == NetblockSize(24, 64)
    assert parse_netblock_size("16") == NetblockSize(16, 128)
    assert str(NetblockSize(24, 48)) == "24:48"
    for bad in ("33:128", "24:129", "24/64", "-1:64", ":64", "24:"):
        with pytest.raises(ValueError):
            parse_netblock_size(bad)


def test_exempt_list_is_strict() -> None:
    assert parse_exempt(["192.0.2.0/24", "2001:db8::/32", "198.51.100.7"]) == (
        ipaddress.ip_network("192.0.2.0/24"),
        ipaddress.ip_network("2001:db8::/32"),
        ipaddress.ip_network("198.51.100.7/32"),
    )
    for bad in ("192.0.2.1/24", "192.0.2.0/33", "192.0.2.*", "example.com"):
        with pytest.raises(ValueError, match="is not a CIDR"):
            parse_exempt([bad])


# -- sources ---------------------------------------------------------------------------------------


def test_source_address_unmaps_ipv4_and_drops_the_zone() -> None:
    assert source_address("192.0.2.9") == addr("192.0.2.9")
    assert source_address("::ffff:192.0.2.9") == addr("192.0.2.9")
    assert source_address("fe80::1%eth0") == addr("fe80::1")
    assert source_address("2001:db8::1") == addr("2001:db8::1")
    assert source_address("") is None
    assert source_address("/run/kilnproxy.sock") is None


def test_netblocks_group_sources() -> None:
    size = NetblockSize(24, 64)
    assert str(netblock_of(addr("192.0.2.201"), size)) == "192.0.2.0/24"
    assert str(netblock_of(addr("2001:db8:1:2:aaaa::1"), size)) == "2001:db8:1:2::/64"
    assert str(netblock_of(addr("192.0.2.201"), NetblockSize())) == "192.0.2.201/32"
    assert str(netblock_of(addr("2001:db8::5"), NetblockSize())) == "2001:db8::5/128"
    assert str(netblock_of(addr("203.0.113.9"), NetblockSize(0, 0))) == "0.0.0.0/0"
    assert str(netblock_of(addr("2001:db8::5"), NetblockSize(0, 0))) == "::/0"


# -- random early drop -----------------------------------------------------------------------------


def test_drop_percent_rises_linearly_from_rate_at_start_to_all_at_full() -> None:
    startups = gate()
    # sshd's integer arithmetic: rate + (100 - rate) * (n - start) / (full - start), truncated.
    expected = {0: 0, 9: 0, 10: 30, 11: 30, 13: 32, 55: 65, 99: 99, 100: 100, 500: 100}
    assert {n: startups.drop_percent(n) for n in expected} == expected


def _drop_rate(startups_gate: StartupGate, startups: int) -> float:
    decisions = [startups_gate.decide(startups) for _ in range(TRIALS)]
    assert set(decisions) <= {None, Refusal.RANDOM_EARLY_DROP}
    return decisions.count(Refusal.RANDOM_EARLY_DROP) / TRIALS


@pytest.mark.parametrize(("startups", "expected"), [(10, 0.30), (55, 0.65), (99, 0.99)])
def test_random_early_drop_matches_its_probability(startups: int, expected: float) -> None:
    # 20,000 draws: a standard deviation under 0.0035, so 0.015 is over four of them.
    assert _drop_rate(gate(seed=startups), startups) == pytest.approx(expected, abs=0.015)


def test_below_start_all_accepted_from_full_on_all_refused() -> None:
    startups = gate()
    assert {startups.decide(n) for n in range(10) for _ in range(200)} == {None}
    assert {startups.decide(n) for n in (100, 101, 10_000)} == {Refusal.FULL}


def test_the_single_number_form_is_a_hard_limit() -> None:
    startups = gate("20")
    assert {startups.decide(19) for _ in range(1000)} == {None}
    assert startups.decide(20) is Refusal.FULL


def test_a_rate_of_100_drops_everything_from_start() -> None:
    startups = gate("5:100:50")
    assert startups.decide(4) is None
    assert {startups.decide(5) for _ in range(100)} == {Refusal.RANDOM_EARLY_DROP}


def test_the_same_seed_makes_the_same_decisions() -> None:
    first, second = gate(seed=42), gate(seed=42)
    assert [first.decide(50) for _ in range(500)] == [second.decide(50) for _ in range(500)]


# -- per source ------------------------------------------------------------------------------------


def _fill(counter: Counter[Netblock], hosts: list[str], size: NetblockSize) -> None:
    for host in hosts:
        counter[netblock_of(addr(host), size)] += 1


@pytest.mark.parametrize(
    ("inside", "same_block", "other_block"),
    [
        ([f"192.0.2.{i}" for i in range(1, 11)], "192.0.2.200", "192.0.3.1"),
        ([f"2001:db8:1:2::{i:x}" for i in range(1, 11)], "2001:db8:1:2:ffff::9", "2001:db8:1:3::1"),
    ],
)
def test_per_source_limit_groups_by_netblock(
    inside: list[str], same_block: str, other_block: str
) -> None:
    size = NetblockSize(24, 64)
    own: Counter[Netblock] = Counter()
    _fill(own, inside[:9], size)
    startups = gate(per_source=10)
    source = netblock_of(addr(inside[9]), size)
    assert startups.decide(own.total(), own[source]) is None  # the 10th is in
    own[source] += 1
    for host in (same_block, other_block):
        block = netblock_of(addr(host), size)
        verdict = startups.decide(own.total(), own[block])
        assert verdict is (Refusal.PER_SOURCE if host == same_block else None)


def test_per_source_zero_is_no_limit() -> None:
    assert gate(per_source=0).decide(5, 5000) is None


def test_full_is_reported_before_per_source() -> None:
    assert gate(per_source=1).decide(100, 50) is Refusal.FULL


class _Penalised:
    """A penalty table that refuses one address."""

    def __init__(self, refused: IPAddress) -> None:
        self.refused = refused

    def refusal(self, address: IPAddress, now: float) -> Refusal | None:
        return Refusal.PENALTY if address == self.refused else None


def test_admit_asks_penalties_first_then_the_gate() -> None:
    startups = gate(per_source=2)
    penalties = _Penalised(addr("192.0.2.66"))

    def verdict(address: IPAddress | None, startups_now: int, source: int) -> Refusal | None:
        return admit(
            address,
            0.0,
            gate=startups,
            penalties=penalties,
            startups=startups_now,
            source_startups=source,
        )

    assert verdict(addr("192.0.2.66"), 0, 0) is Refusal.PENALTY
    assert verdict(addr("192.0.2.67"), 0, 0) is None
    assert verdict(addr("192.0.2.67"), 3, 2) is Refusal.PER_SOURCE
    # No address, no source: only the host-wide count applies.
    assert verdict(None, 3, 2) is None
    assert verdict(None, 100, 0) is Refusal.FULL


# -- sessions per account --------------------------------------------------------------------------


def test_account_session_cap() -> None:
    sessions = AccountSessions(cap=2)
    sessions.open("acme")
    sessions.open("acme")
    with pytest.raises(TooManySessions) as refused:
        sessions.open("acme")
    assert refused.value.exit_status == 1
    assert client_line(refused.value.message, "3f9c2a1b") == (
        "kilnproxy: too many concurrent sessions for account 'acme' (session 3f9c2a1b)\n"
    )
    sessions.open("hooli")  # another account is not affected
    sessions.close("acme")
    sessions.open("acme")
    assert sessions.statistics() == {"acme": 2, "hooli": 1}


def test_account_cap_counts_the_rest_of_the_host() -> None:
    sessions = AccountSessions(cap=3)
    sessions.open("acme", elsewhere=1)
    with pytest.raises(TooManySessions):
        sessions.open("acme", elsewhere=2)
    assert sessions.of("acme") == 1


def test_account_cap_zero_is_unlimited_and_closing_forgets() -> None:
    sessions = AccountSessions(cap=0)
    for _ in range(1000):
        sessions.open("acme", elsewhere=10_000)
    for _ in range(1000):
        sessions.close("acme")
    assert sessions.statistics() == {}
    with pytest.raises(ValueError, match="no open session"):
        sessions.close("acme")


# -- refusal log -----------------------------------------------------------------------------------


def test_refusal_log_holds_back_a_flood_and_counts_it() -> None:
    log = RefusalLog(burst=3, period=60.0)
    assert [log.should_log(Refusal.PENALTY, 0.0) for _ in range(5)] == [0, 0, 0, None, None]
    assert log.should_log(Refusal.FULL, 0.0) == 0  # each reason has its own budget
    assert log.should_log(Refusal.PENALTY, 10.0) is None  # half a line refilled
    assert log.should_log(Refusal.PENALTY, 20.0) == 3  # one line, naming the three held back
    assert log.should_log(Refusal.PENALTY, 20.0) is None
    assert [log.should_log(Refusal.PENALTY, 1000.0) for _ in range(4)] == [1, 0, 0, None]


def test_a_source_has_the_same_buckets_on_every_process_of_the_host() -> None:
    """The same netblock and key give the same two buckets (no per-process hash seed); another
    key scatters sources anew, so a client cannot aim at a victim's buckets; sources spread,
    and two sources seldom share both."""
    key, other_key = bytes(range(16)), bytes(16)
    net = ipaddress.ip_network("192.0.2.0/24")
    assert source_buckets(net, key, 4096) == source_buckets(ipaddress.ip_network("192.0.2.0/24"),
                                                            bytes(range(16)), 4096)  # fmt: skip
    sources = [ipaddress.ip_network(f"10.0.{i // 256}.{i % 256}/32") for i in range(1000)]
    buckets = [source_buckets(s, key, 4096) for s in sources]
    assert all(len(b) == BUCKETS_PER_SOURCE and all(0 <= x < 4096 for x in b) for b in buckets)
    firsts, seconds = {b[0] for b in buckets}, {b[1] for b in buckets}
    assert len(firsts) > 850 and len(seconds) > 850  # about 890 expected of 1000 in 4096
    assert len({frozenset(b) for b in buckets}) == 1000  # no two sources share both
    assert buckets != [source_buckets(s, other_key, 4096) for s in sources]
    # The version and the prefix length are part of the source: ::/128 is not 0.0.0.0/32.
    v4, v6 = ipaddress.ip_network("0.0.0.0/32"), ipaddress.ip_network("::/128")
    assert len({source_buckets(n, key, 1 << 30) for n in (v4, v6)}) == 2
    assert len(source_buckets(v4, key, 1)) == 1  # one bucket in all: counted once
