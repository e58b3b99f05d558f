from __future__ import annotations

import ipaddress
import os
import tomllib
from pathlib import Path

import pytest

from kilnproxy.config import (
    README_BEGIN,
    README_END,
    Address,
    declarations,
    format_duration,
    from_mapping,
    load,
    parse_address,
    parse_duration,
    parse_size,
    reference,
    with_reference,
)
from kilnproxy.errors import OperatorError
from kilnproxy.policy import algorithms
from kilnproxy.policy.admission import NetblockSize, StartupLimits
from kilnproxy.policy.penalty import Overflow, PenaltySettings


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("10m", 600), ("6h", 21600), ("1h30m", 5400), ("500ms", 0.5), ("1d", 86400)],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds
    assert parse_duration(format_duration(seconds)) == seconds


BAD_DURATIONS = ["", "30", "0s", "10 m", "m10", "1.5s", "-1s", "10x", "1h 2m", "367d"]


@pytest.mark.parametrize("text", [*BAD_DURATIONS, "9" * 20 + "s", "\u0661\u0660s"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize(
    ("text", "size"), [("512KiB", 524288), ("2MiB", 2 << 20), ("65536B", 65536), ("1GiB", 1 << 30)]
)
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "512", "512K", "512 KiB", "1.5MiB", "-1KiB", "KiB"])
def test_bad_sizes(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


def test_addresses() -> None:
    assert parse_address("127.0.0.1:2222") == Address("127.0.0.1", 2222)
    assert parse_address("[::1]:22") == Address("::1", 22)
    assert str(Address("::1", 22)) == "[::1]:22"
    for bad in ("localhost", ":22", "1.2.3.4:99999", "::1:22"):
        with pytest.raises(ValueError):
            parse_address(bad)


def test_defaults_and_relative_paths(tmp_path: Path) -> None:
    config = from_mapping({}, tmp_path)
    assert config.ssh.listen == (Address("127.0.0.1", 2222),)
    assert config.ssh.host_keys == (tmp_path / "ssh_host_ed25519_key",)
    assert config.status.http == Address("127.0.0.1", 8022)
    assert config.status.socket == tmp_path / "kilnproxy.sock"
    assert config.directory.url == f"sqlite:{tmp_path / 'kilnproxy.db'}"
    assert (config.timeouts.login_grace, config.timeouts.idle) == (30, 600)
    assert (config.timeouts.max_session, config.timeouts.drain, config.timeouts.dial) == (
        21600, 600, 10,
    )  # fmt: skip
    assert config.workers.count >= 1
    assert config.log.format == "text" and config.log.file is None


def test_every_setting_has_help_and_a_valid_default(tmp_path: Path) -> None:
    items = list(declarations())
    assert len(items) >= 20
    for _, item in items:
        assert item.metadata["help"].endswith(".")
        item.metadata["parser"](item.metadata["default"], tmp_path)


def test_load_reads_home_file_or_explicit_path(tmp_path: Path) -> None:
    (tmp_path / "kilnproxy.toml").write_text('[ssh]\nlisten = ["0.0.0.0:22"]\n')
    config = load(None, {"KILNPROXY_HOME": str(tmp_path)})
    assert config.ssh.listen == (Address("0.0.0.0", 22),)
    assert config.source == tmp_path / "kilnproxy.toml"
    other = tmp_path / "other.toml"
    other.write_text('[log]\nformat = "json"\n')
    assert load(str(other), {"KILNPROXY_HOME": str(tmp_path)}).log.format == "json"
    with pytest.raises(OperatorError, match="cannot read config"):
        load(str(tmp_path / "missing.toml"), {"KILNPROXY_HOME": str(tmp_path)})


def test_the_algorithm_names_are_those_the_pinned_asyncssh_knows() -> None:
    """The configuration checks names against `kilnproxy.algorithms`, where the master reads
    it too (it never imports asyncssh): the lists must be asyncssh's own."""
    from asyncssh.encryption import get_encryption_algs
    from asyncssh.kex import get_kex_algs
    from asyncssh.mac import get_mac_algs

    def names(algs: list[bytes]) -> frozenset[str]:
        return frozenset(alg.decode("ascii") for alg in algs)

    assert names(get_kex_algs()) == algorithms.KEX
    assert names(get_encryption_algs()) == algorithms.CIPHERS
    assert names(get_mac_algs()) == algorithms.MACS


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"ssh": {"listen": []}}, r"\[ssh\] listen: at least one address"),
        ({"ssh": {"listen": "127.0.0.1:22"}}, r"\[ssh\] listen: expected a list of strings"),
        ({"workers": {"count": True}}, r"\[workers\] count"),
        ({"ssh": {"fast_path": "no"}}, r"\[ssh\] fast_path: expected true or false, got 'no'"),
        ({"ssh": {"fast_path": 0}}, r"\[ssh\] fast_path: expected true or false, got 0"),
        ({"log": {"format": "xml"}}, r"\[log\] format: 'xml' is not one of text, json"),
        ({"directory": {"url": "mysql://x"}}, r"\[directory\] url: .mysql://x. is not a"),
        ({"ssh": 3}, r"\[ssh\] must be a table"),
        ({"backend_ssh": {"window": "16KiB"}}, r"\[backend_ssh\] window: '16KiB' must be from"),
        ({"backend_ssh": {"window": 65536}}, r"\[backend_ssh\] window: expected a string"),
        ({"timeouts": {"drain_notice": "-3s"}}, r"\[timeouts\] drain_notice: '-3s' is not a"),
        ({"timeouts": {"drain": "0s"}}, r"\[timeouts\] drain: '0s' must be longer than zero"),
        (
            {"timeouts": {"drain_notice": "3s"}},
            r"\[timeouts\] drain_notice: .* needs \[ssh\] proxy",
        ),
        ({"limits": {"max_startups": "10:30"}}, r"\[limits\] max_startups: '10:30' is not"),
        ({"limits": {"max_startups": "100:30:10"}}, r"max_startups: .* start must be at least 1"),
        ({"limits": {"max_startups": "10:0:100"}}, r"max_startups: .* rate is a percentage"),
        ({"limits": {"max_startups": 10}}, r"\[limits\] max_startups: expected a string"),
        ({"limits": {"max_startups_per_source": -1}}, r"max_startups_per_source: expected a"),
        ({"limits": {"max_sessions_per_account": "5"}}, r"max_sessions_per_account: expected"),
        ({"limits": {"penalties": "yes"}}, r"\[limits\] penalties: expected true or false"),
        ({"limits": {"penalty_authfail": "5"}}, r"penalty_authfail: '5' is not a duration"),
        ({"limits": {"penalty_max": "0s"}}, r"penalty_max: '0s' must be longer than zero"),
        ({"limits": {"penalty_netblock": "33:128"}}, r"penalty_netblock: '33:128': at most 32"),
        ({"limits": {"penalty_netblock": "24/64"}}, r"penalty_netblock: '24/64' is not a"),
        ({"limits": {"penalty_exempt": ["192.0.2.1/24"]}}, r"penalty_exempt: '192.0.2.1/24' is"),
        ({"limits": {"penalty_exempt": "192.0.2.0/24"}}, r"penalty_exempt: expected a list"),
        ({"limits": {"penalty_max_sources6": 0}}, r"penalty_max_sources6: expected a whole"),
        ({"limits": {"penalty_overflow": "deny"}}, r"penalty_overflow: 'deny' is not one of"),
        (
            {"limits": {"penalty_min": "10m", "penalty_max": "5m"}},
            r"\[limits\] penalty_max must be longer than penalty_min",
        ),
        ({"limits": {"max_startup": "10:30:100"}}, r"unknown setting max_startup in \[limits\]"),
        ({"ssh": {"kex_algs": ["curve25519-sha265"]}}, r"kex_algs: unknown key exchange 'curve"),
        ({"ssh": {"encryption_algs": ["rot13"]}}, r"encryption_algs: unknown cipher 'rot13'"),
        ({"ssh": {"fallback_encryption_algs": ["x"]}}, r"fallback_encryption_algs: unknown ciph"),
        ({"ssh": {"mac_algs": [""]}}, r"\[ssh\] mac_algs: unknown MAC ''"),
        ({"ssh": {"backlog": 1 << 62}}, r"\[ssh\] backlog: \d+ is more than 65535"),
        ({"workers": {"count": 100_000_000}}, r"\[workers\] count: 100000000 is more than 1024"),
        ({"limits": {"max_startups_per_source": 1 << 40}}, r"per_source: \d+ is more than 2147"),
        ({"ssh": {"host_keys": ["a", ""]}}, r"\[ssh\] host_keys: a path cannot be empty"),
        ({"log": {"file": "a\0b"}}, r"\[log\] file: 'a\\x00b': a path has no NUL"),
        ({"directory": {"url": "sqlite:a\0b"}}, r"\[directory\] url: .* is not a directory URL"),
        ({"status": {"hosts": ["kiln 01"]}}, r"\[status\] hosts: 'kiln 01' is not a host name"),
        ({"status": {"hosts": ["-kiln.corp"]}}, r"\[status\] hosts: '-kiln.corp' is not a host"),
        ({"status": {"hosts": ["kiln..corp"]}}, r"\[status\] hosts: 'kiln..corp' is not a host"),
        ({"status": {"hosts": [""]}}, r"\[status\] hosts: '' is not a host name"),
        ({"status": {"hosts": ["a" * 64]}}, r"\[status\] hosts: 'a+' is not a host name"),
        ({"status": {"hosts": "kiln.corp"}}, r"\[status\] hosts: expected a list of strings"),
        (
            {"ssh": {"fallback_encryption_algs": "aes128-ctr"}},
            r"\[ssh\] fallback_encryption_algs: expected a list of strings",
        ),
    ],
)
def test_bad_values(tmp_path: Path, raw: dict[str, object], message: str) -> None:
    with pytest.raises(OperatorError, match=message) as refused:
        from_mapping(raw, tmp_path)
    assert "\n" not in str(refused.value)


def test_limits(tmp_path: Path) -> None:
    defaults = from_mapping({}, tmp_path).limits
    assert defaults.max_startups == StartupLimits(10, 30, 100)
    assert (defaults.max_startups_per_source, defaults.max_sessions_per_account) == (10, 0)
    assert defaults.penalty_settings() == PenaltySettings()  # OpenSSH's defaults, both sides
    raw = {
        "max_startups": "20:50:60",
        "max_startups_per_source": 0,
        "max_sessions_per_account": 25,
        "penalties": False,
        "penalty_noauth": "0s",
        "penalty_grace_exceeded": "20s",
        "penalty_min": "0s",
        "penalty_max": "1h",
        "penalty_netblock": "24:64",
        "penalty_exempt": ["10.0.0.0/8", "2001:db8::/32"],
        "penalty_max_sources6": 1000,
        "penalty_overflow6": "deny-all",
    }
    limits = from_mapping({"limits": raw}, tmp_path).limits
    assert limits.max_startups == StartupLimits(20, 50, 60)
    assert (limits.max_startups_per_source, limits.max_sessions_per_account) == (0, 25)
    assert limits.penalty_settings() == PenaltySettings(
        enabled=False,
        noauth=0.0,
        grace_exceeded=20.0,
        min=0.0,
        max=3600.0,
        netblock=NetblockSize(24, 64),
        exempt=(ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8::/32")),
        max_sources6=1000,
        overflow6=Overflow.DENY_ALL,
    )


def test_the_reference_is_every_default_as_toml(tmp_path: Path) -> None:
    """`kilnproxy config` and the README print the reference: loaded, it is the defaults."""
    text = reference()
    raw = tomllib.loads(text)
    declared = {(section, item.name) for section, item in declarations()}
    assert {(section, name) for section, table in raw.items() for name in table} == declared
    assert from_mapping(raw, tmp_path) == from_mapping({}, tmp_path)
    assert max(len(line) for line in text.splitlines()) <= 100
    assert "# Channel window on the backend leg" in text  # help is a comment above its setting


def test_readme_shows_every_setting_as_declared() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert readme == with_reference(readme), (
        "README.md's configuration block differs from the settings of kilnproxy/config.py: "
        "run `make readme`"
    )


def test_with_reference_replaces_only_the_block_between_the_markers() -> None:
    readme = f"# Title\n\n{README_BEGIN}\n```toml\n[old]\n```\n{README_END}\n\nMore.\n"
    updated = with_reference(readme)
    assert updated == (
        f"# Title\n\n{README_BEGIN}\n```toml\n{reference()}```\n{README_END}\n\nMore.\n"
    )
    assert with_reference(updated) == updated
    with pytest.raises(ValueError, match="lacks the lines"):
        with_reference("# Title\n")


@pytest.mark.parametrize(("text", "seconds"), [("0s", 0.0), ("0ms", 0.0), ("3s", 3.0)])
def test_a_drain_notice_may_be_none(tmp_path: Path, text: str, seconds: float) -> None:
    ssh = {"proxy_protocol": "require", "proxy_allowed": ["10.0.0.5/32"]}
    config = from_mapping({"timeouts": {"drain_notice": text}, "ssh": ssh}, tmp_path)
    assert config.timeouts.drain_notice == seconds


def test_fallback_ciphers_may_be_none(tmp_path: Path) -> None:
    """Unlike `encryption_algs`: `[]` offers every client `encryption_algs` alone."""
    config = from_mapping({"ssh": {"fallback_encryption_algs": []}}, tmp_path)
    assert config.ssh.fallback_encryption_algs == ()
    with pytest.raises(OperatorError, match=r"\[ssh\] encryption_algs: at least one name"):
        from_mapping({"ssh": {"encryption_algs": []}}, tmp_path)


def test_status_host_names_are_kept_as_dns_compares_them(tmp_path: Path) -> None:
    hosts = ["Kiln-01.Corp.", "status.kiln-01.corp", "10.0.0.5"]
    config = from_mapping({"status": {"hosts": hosts}}, tmp_path)
    assert config.status.hosts == ("kiln-01.corp", "status.kiln-01.corp", "10.0.0.5")
    assert from_mapping({}, tmp_path).status.hosts == ()
    assert from_mapping({}, tmp_path).fixed_until_restart(config) == ["[status] hosts"]


def test_a_file_saved_with_a_bom_or_behind_a_closed_door(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Some editors save UTF-8 with a byte order mark, which TOML does not take: it is read
    past. A KILNPROXY_HOME the user may not enter is one line, not an internal error."""
    (tmp_path / "kilnproxy.toml").write_bytes("\ufeff[workers]\ncount = 3\n".encode())
    assert load(None, {"KILNPROXY_HOME": str(tmp_path)}).workers.count == 3

    def denied(self: Path) -> bool:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "exists", denied)
    with pytest.raises(OperatorError, match=r"cannot read config .*kilnproxy.toml: Permission"):
        load(None, {"KILNPROXY_HOME": str(tmp_path)})


def test_a_home_whose_name_is_not_utf8_is_one_line() -> None:
    """Its paths go into the directory as text (the local backend's base): not an internal
    error at the first admin command."""
    with pytest.raises(OperatorError) as refused:
        load(None, {"KILNPROXY_HOME": os.fsdecode(b"/srv/h\xffme")})
    assert str(refused.value) == "KILNPROXY_HOME b'/srv/h\\xffme' is not UTF-8"


def test_auto_workers_are_one_per_cpu_this_process_may_run_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A container's CPU set or `taskset`, not every CPU of the machine."""
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {3})
    monkeypatch.setattr("os.cpu_count", lambda: 64)
    assert from_mapping({"workers": {"count": "auto"}}, tmp_path).workers.count == 1
