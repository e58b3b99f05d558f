"""Configuration (SPEC 8): every setting declared once, loaded from one TOML file.

Each setting is a field of a frozen section dataclass; its metadata holds the parser, the default
as it would be written in the file, and the help text. The loader, `kilnproxy config` and the
README's configuration block (`reference`; `make readme` writes it, a unit test compares) all read
these declarations. Loading has no side effects: it reads one file and returns a value.
This module must never import asyncssh (the master loads configuration too).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import re
import textwrap
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import unquote

from kilnproxy.errors import OperatorError
from kilnproxy.policy import algorithms
from kilnproxy.policy.admission import (
    NetblockSize,
    StartupLimits,
    parse_max_startups,
    parse_netblock_size,
)
from kilnproxy.policy.penalty import Overflow, PenaltySettings

CONFIG_NAME = "kilnproxy.toml"


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class Address(NamedTuple):
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


Parser = Callable[[object, Path], object]


def setting(parser: Parser, default: object, help: str) -> Any:
    """Declare one setting: how to parse it, its default as written in TOML, and its help."""
    return field(metadata={"parser": parser, "default": default, "help": help})


# -- parsers: each takes the raw TOML value and KILNPROXY_HOME, returns the typed value ----------

_DURATION_PART = re.compile(r"([0-9]+)(ms|s|m|h|d)")
MAX_DURATION = 366 * 86400.0  # past a year a wait is a mistake (and too long for a timer)
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """`30s`, `10m`, `6h`, `1h30m`, `500ms` to seconds; anything else is an error."""
    text = text.strip()
    parts = list(_DURATION_PART.finditer(text))
    if not parts or "".join(p.group(0) for p in parts) != text:
        raise ValueError(f"{text!r} is not a duration like 30s, 10m or 6h")
    seconds = sum(int(p.group(1)) * _UNIT_SECONDS[p.group(2)] for p in parts)
    if seconds <= 0:
        raise ValueError(f"{text!r} must be longer than zero")
    if seconds > MAX_DURATION:
        raise ValueError(f"{text!r} is longer than a year (366d)")
    return seconds


def format_duration(seconds: float) -> str:
    """The inverse of parse_duration for whole seconds, e.g. 600 -> `10m`, 5410 -> `1h30m10s`."""
    whole = int(seconds)
    if whole != seconds or whole == 0:
        return f"{round(seconds * 1000)}ms"
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    out = (f"{hours}h" if hours else "") + (f"{minutes}m" if minutes else "")
    return out + (f"{secs}s" if secs else "")


_SIZE = re.compile(r"([0-9]+)(B|KiB|MiB|GiB)")
_UNIT_BYTES = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}


def parse_size(text: str) -> int:
    """`512KiB`, `2MiB`, `65536B` to bytes; anything else is an error."""
    match = _SIZE.fullmatch(text.strip())
    if not match:
        raise ValueError(f"{text!r} is not a size like 512KiB or 2MiB")
    return int(match.group(1)) * _UNIT_BYTES[match.group(2)]


def format_uptime(seconds: float) -> str:
    """`167h10m2s`: how `kilnproxy status` and /info show how long the server has run."""
    return format_duration(max(1, int(seconds)))


def parse_address(text: str) -> Address:
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:([0-9]+)|([^:\[\]]+):([0-9]+)", text.strip())
    if not match:
        raise ValueError(f"{text!r} is not an address like 127.0.0.1:2222 or [::1]:2222")
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4))
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} is out of range")
    return Address(host, port)


def _string(raw: object) -> str:
    if not isinstance(raw, str):
        raise ValueError(f"expected a string, got {raw!r}")
    return raw


def _string_list(raw: object) -> list[str]:
    if not isinstance(raw, list) or not all(isinstance(item, str) for item in raw):
        raise ValueError(f"expected a list of strings, got {raw!r}")
    return list(raw)


def duration(raw: object, home: Path) -> float:
    return parse_duration(_string(raw))


def duration_or_zero(raw: object, home: Path) -> float:
    """A duration, or `0s` for none."""
    text = _string(raw).strip()
    return 0.0 if re.fullmatch(r"0+(ms|s|m|h|d)", text) else parse_duration(text)


def address(raw: object, home: Path) -> Address:
    return parse_address(_string(raw))


def addresses(raw: object, home: Path) -> tuple[Address, ...]:
    items = _string_list(raw)
    if not items:
        raise ValueError("at least one address is needed")
    return tuple(parse_address(item) for item in items)


def _path(text: str) -> str:
    if not text:
        raise ValueError("a path cannot be empty")
    if "\0" in text:
        raise ValueError(f"{text!r}: a path has no NUL character")
    return text


def path(raw: object, home: Path) -> Path:
    return home / _path(_string(raw))


def optional_path(raw: object, home: Path) -> Path | None:
    return home / _path(_string(raw)) if _string(raw) else None


def paths(raw: object, home: Path) -> tuple[Path, ...]:
    items = _string_list(raw)
    if not items:
        raise ValueError("at least one path is needed")
    return tuple(home / _path(item) for item in items)


def names(raw: object, home: Path) -> tuple[str, ...]:
    items = _string_list(raw)
    if not items:
        raise ValueError("at least one name is needed")
    return tuple(items)


def names_or_none(raw: object, home: Path) -> tuple[str, ...]:
    """A list of names that may be empty (`[]`: none)."""
    return tuple(_string_list(raw))


_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def is_host_name(name: str) -> bool:
    """Whether `name` is a DNS host name (RFC 1123), without a final dot."""
    return len(name) <= 253 and all(_HOST_LABEL.fullmatch(label) for label in name.split("."))


def host_names(raw: object, home: Path) -> tuple[str, ...]:
    """DNS names (RFC 1123), lower case and without a final dot; the list may be empty."""
    listed = []
    for item in _string_list(raw):
        name = item.strip().lower().removesuffix(".")
        if not is_host_name(name):
            raise ValueError(f"{item!r} is not a host name")
        listed.append(name)
    return tuple(listed)


def algorithm_names(known: frozenset[str], what: str, none: bool = False) -> Parser:
    """A list of SSH algorithm names, each one asyncssh knows (`policy.algorithms`); `none`: the
    list may be empty."""

    def parse(raw: object, home: Path) -> tuple[str, ...]:
        listed = names_or_none(raw, home) if none else names(raw, home)
        unknown = [name for name in listed if name not in known]
        if unknown:
            raise ValueError(f"unknown {what} {unknown[0]!r}")
        return listed

    return parse


def networks(raw: object, home: Path) -> tuple[Network, ...]:
    """CIDRs like `10.0.0.0/8` or `2001:db8::/32`; a bare address is one host."""
    out = []
    for item in _string_list(raw):
        try:
            out.append(ipaddress.ip_network(item.strip()))
        except ValueError as exc:  # host bits set, or not an address: say which entry
            raise ValueError(f"{item!r} is not a network like 10.0.0.0/8 ({exc})") from None
    return tuple(out)


def window_size(raw: object, home: Path) -> int:
    """An SSH channel window: at least one 32 KiB packet, at most what the protocol carries."""
    size = parse_size(_string(raw))
    if not 32 << 10 <= size < 1 << 32:
        raise ValueError(f"{raw!r} must be from 32KiB to under 4GiB")
    return size


def boolean(raw: object, home: Path) -> bool:
    if not isinstance(raw, bool):
        raise ValueError(f"expected true or false, got {raw!r}")
    return raw


INT_MAX = (1 << 31) - 1  # what a C int holds (listen()'s backlog is one)
MAX_WORKERS = 1024


def positive_int(raw: object, home: Path, most: int = INT_MAX) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < 1:
        raise ValueError(f"expected a whole number of at least 1, got {raw!r}")
    if raw > most:
        raise ValueError(f"{raw} is more than {most}")
    return raw


def growth_factor(raw: object, home: Path) -> float:
    """A factor over a baseline, from 1.1 up; 0 for never."""
    if isinstance(raw, bool) or not isinstance(raw, int | float) or not (raw == 0 or raw >= 1.1):
        raise ValueError(f"expected a factor of at least 1.1, or 0 for never, got {raw!r}")
    return float(raw)


def worker_count(raw: object, home: Path) -> int:
    if raw == "auto":  # the CPUs this process may run on: a container's or taskset's, say
        return len(os.sched_getaffinity(0))
    return positive_int(raw, home, MAX_WORKERS)


def listen_backlog(raw: object, home: Path) -> int:
    """Linux caps a listen backlog at net.core.somaxconn, itself at most 65535."""
    return positive_int(raw, home, 65535)


_USERINFO = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://([^@/?#]*)@")


def url_secrets(url: str) -> list[str]:
    """The passwords a libpq URL carries, in its user part or as `?password=`, raw and
    percent-decoded, longest first. libpq ends the user part at the first `@` or `/`."""
    found = []
    userinfo = _USERINFO.match(url)
    if userinfo and ":" in userinfo.group(1):
        found.append(userinfo.group(1).partition(":")[2])
    _, _, query = url.partition("?")
    for pair in query.split("&"):
        key, sep, value = pair.partition("=")
        if sep and unquote(key) == "password":
            found.append(value)
    secrets = {text for raw in found for text in (raw, unquote(raw)) if text}
    return sorted(secrets, key=len, reverse=True)


def scrub(text: str, url: str) -> str:
    """`text` (an error message, a log line, the URL itself) with the URL's passwords as ***."""
    for secret in url_secrets(url):
        text = text.replace(secret, "***")
    return text


def directory_url(raw: object, home: Path) -> str:
    """`sqlite:PATH` (relative to KILNPROXY_HOME) or a libpq URL, kept as written: libpq parses
    it when the directory is opened, with the PG* environment and ~/.pgpass (SPEC 8)."""
    text = _string(raw)
    if text.startswith(("postgresql://", "postgres://")):
        if any(c.isspace() or ord(c) < 32 for c in text):
            raise ValueError(f"{scrub(text, text)!r}: a URL has no spaces or control characters")
        return text
    scheme, sep, rest = text.partition(":")
    if scheme != "sqlite" or not sep or not rest or "\0" in rest:
        raise ValueError(
            f"{scrub(text, text)!r} is not a directory URL like sqlite:kilnproxy.db "
            "or postgresql://USER@HOST:5432/DBNAME"
        )
    return f"sqlite:{home / rest}"


def count(raw: object, home: Path) -> int:
    """A whole number where 0 means no limit."""
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < 0:
        raise ValueError(f"expected a whole number, 0 for no limit, got {raw!r}")
    if raw > INT_MAX:
        raise ValueError(f"{raw} is more than {INT_MAX}")
    return raw


def max_startups(raw: object, home: Path) -> StartupLimits:
    return parse_max_startups(_string(raw))


def netblock_size(raw: object, home: Path) -> NetblockSize:
    return parse_netblock_size(_string(raw))


def overflow(raw: object, home: Path) -> Overflow:
    return Overflow(choice(*(mode.value for mode in Overflow))(raw, home))


def choice(*allowed: str) -> Parser:
    def parse(raw: object, home: Path) -> str:
        text = _string(raw)
        if text not in allowed:
            raise ValueError(f"{text!r} is not one of {', '.join(allowed)}")
        return text

    return parse


# -- the settings --------------------------------------------------------------------------------

# The algorithm policy of SPEC 3. Strict key exchange (kex-strict-s-v00@openssh.com) is added
# by asyncssh itself whenever both sides offer it.
DEFAULT_KEX = [
    "mlkem768x25519-sha256",
    "curve25519-sha256",
    "curve25519-sha256@libssh.org",
    "diffie-hellman-group16-sha512",
    "diffie-hellman-group18-sha512",
]
# AES-GCM for every client that has it: the client picks the cipher (its first that the server
# offers), and OpenSSH clients pick chacha20-poly1305 (then AES-CTR) whenever it is offered. Both
# are AEAD and equally strong, but ChaCha20-Poly1305 costs kilnproxy 1.6-1.7x the CPU of AES-GCM
# per byte relayed, even on the fast path (README). Clients without AES-GCM (Dropbear as Debian 12
# ships it, paramiko before 3.5) are offered the fallback ciphers too: kilnproxy reads the
# client's KEXINIT before it sends its own (kilnproxy/ssh/kex_offer.py).
DEFAULT_CIPHERS = [
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
]
DEFAULT_FALLBACK_CIPHERS = [
    "chacha20-poly1305@openssh.com",
    "aes128-ctr",
    "aes256-ctr",
]
DEFAULT_MACS = [
    "hmac-sha2-256-etm@openssh.com",
    "hmac-sha2-512-etm@openssh.com",
    "umac-128-etm@openssh.com",
]


@dataclass(frozen=True)
class SshSettings:
    listen: tuple[Address, ...] = setting(
        addresses, ["127.0.0.1:2222"], "Addresses to accept SSH on."
    )
    host_keys: tuple[Path, ...] = setting(
        paths, ["ssh_host_ed25519_key"], "Host private keys; a missing ed25519 key is generated."
    )
    backlog: int = setting(listen_backlog, 1024, "Listen backlog of the SSH socket.")
    kex_algs: tuple[str, ...] = setting(
        algorithm_names(algorithms.KEX, "key exchange"),
        DEFAULT_KEX,
        "Key exchange algorithms offered.",
    )
    encryption_algs: tuple[str, ...] = setting(
        algorithm_names(algorithms.CIPHERS, "cipher"),
        DEFAULT_CIPHERS,
        "Ciphers offered to every client (the client's order decides which).",
    )
    fallback_encryption_algs: tuple[str, ...] = setting(
        algorithm_names(algorithms.CIPHERS, "cipher", none=True),
        DEFAULT_FALLBACK_CIPHERS,
        "Ciphers offered, after encryption_algs, only to a client that has none of those "
        "(kilnproxy reads the client's offer before it sends its own); empty: never.",
    )
    mac_algs: tuple[str, ...] = setting(
        algorithm_names(algorithms.MACS, "MAC"), DEFAULT_MACS, "MACs offered (encrypt-then-MAC)."
    )
    max_channels: int = setting(positive_int, 10, "Concurrent channels on one connection.")
    max_auth_tries: int = setting(
        positive_int,
        6,
        "Public keys a client may offer per connection; at the next, it is "
        "disconnected (OpenSSH's MaxAuthTries).",
    )
    fast_path: bool = setting(
        boolean,
        True,
        "kilnproxy's per-packet path for the pinned asyncssh (kilnproxy/ssh/fast_path.py): the "
        "same data on the wire for less CPU. Any other asyncssh version runs stock, with a "
        "warning; false runs stock asyncssh always.",
    )
    proxy_protocol: str = setting(
        choice("off", "optional", "require"),
        "off",
        "PROXY protocol (v1 and v2) from a load balancer: `optional` also serves clients that "
        "connect directly, `require` closes every connection without a header.",
    )
    proxy_allowed: tuple[Network, ...] = setting(
        networks, [], "Networks (CIDR) of the load balancers that may send a PROXY header."
    )
    proxy_timeout: float = setting(
        duration, "5s", "How long a connection may take to send its whole PROXY header."
    )

    def problem(self) -> str | None:
        """What is wrong across settings of this section, if anything."""
        if self.proxy_protocol != "off" and not self.proxy_allowed:
            return (
                f"proxy_allowed: the load balancers' networks are needed when "
                f"proxy_protocol is {self.proxy_protocol!r}"
            )
        return None


@dataclass(frozen=True)
class LimitSettings:
    """Admission (SPEC 4b): OpenSSH's semantics and defaults, but for max_startups_per_source
    (OpenSSH has no such limit by default)."""

    max_startups: StartupLimits = setting(
        max_startups,
        "10:30:100",
        "OpenSSH's MaxStartups over all workers of the host: from `start` unauthenticated "
        "connections on, a new one is dropped with probability `rate`% rising linearly to 100% "
        "at `full`.",
    )
    max_startups_per_source: int = setting(
        count, 10, "Unauthenticated connections from one source netblock; 0: no limit."
    )
    max_sessions_per_account: int = setting(
        count, 0, "Concurrent sessions of one account on this host; 0: no cap."
    )
    penalties: bool = setting(
        boolean,
        True,
        "Refuse sources that end connections badly for a while (OpenSSH's PerSourcePenalties).",
    )
    penalty_authfail: float = setting(
        duration_or_zero, "5s", "Penalty for leaving after failed authentication; 0s: none."
    )
    penalty_noauth: float = setting(
        duration_or_zero, "1s", "Penalty for leaving without trying to authenticate; 0s: none."
    )
    penalty_grace_exceeded: float = setting(
        duration_or_zero, "10s", "Penalty for not authenticating within login_grace; 0s: none."
    )
    penalty_min: float = setting(
        duration_or_zero,
        "15s",
        "A source is refused once more penalty than this has built up; 0s: at its first penalty.",
    )
    penalty_max: float = setting(duration, "10m", "The most penalty a source can build up.")
    penalty_netblock: NetblockSize = setting(
        netblock_size,
        "32:128",
        "Leading bits of an IPv4:IPv6 address that make one source, for penalties and "
        "max_startups_per_source (OpenSSH's PerSourceNetBlockSize).",
    )
    penalty_exempt: tuple[Network, ...] = setting(
        networks, [], "CIDRs never penalised, e.g. a load balancer's health checks."
    )
    penalty_max_sources4: int = setting(
        positive_int, 65536, "IPv4 netblocks tracked for penalties, penalised or not."
    )
    penalty_max_sources6: int = setting(
        positive_int, 65536, "IPv6 netblocks tracked for penalties, penalised or not."
    )
    penalty_overflow: Overflow = setting(
        overflow,
        "permissive",
        "When the IPv4 table is full: `permissive` forgets the penalty closest to expiry, "
        "`deny-all` refuses every non-exempt IPv4 source until one expires.",
    )
    penalty_overflow6: Overflow = setting(overflow, "permissive", "The same for the IPv6 table.")

    def problem(self) -> str | None:
        """What is wrong across settings of this section, if anything."""
        if self.penalty_max <= self.penalty_min:
            return "penalty_max must be longer than penalty_min"
        return None

    def penalty_settings(self) -> PenaltySettings:
        return PenaltySettings(
            enabled=self.penalties,
            authfail=self.penalty_authfail,
            noauth=self.penalty_noauth,
            grace_exceeded=self.penalty_grace_exceeded,
            min=self.penalty_min,
            max=self.penalty_max,
            netblock=self.penalty_netblock,
            exempt=self.penalty_exempt,
            max_sources4=self.penalty_max_sources4,
            max_sources6=self.penalty_max_sources6,
            overflow4=self.penalty_overflow,
            overflow6=self.penalty_overflow6,
        )


@dataclass(frozen=True)
class WorkerSettings:
    count: int = setting(
        worker_count,
        "auto",
        "Worker processes; `auto` is one per CPU it may run on (its CPU affinity).",
    )
    recycle_rss_factor: float = setting(
        growth_factor,
        2.0,
        "Replace a worker gracefully (one step of a rolling restart: its replacement is ready "
        "before it drains) once its RSS has stayed above this many times its RSS just after "
        "start for 10s while the host has no pre-auth flood (at most 10 unauthenticated "
        "connections per worker); one at a time. What a flood leaves mapped is given back "
        "this way. 0: never.",
    )


@dataclass(frozen=True)
class TimeoutSettings:
    login_grace: float = setting(duration, "30s", "From TCP accept to authenticated.")
    dial: float = setting(duration, "10s", "Connecting to a backend, handshake included.")
    idle: float = setting(duration, "10m", "A session without a byte in either direction.")
    max_session: float = setting(duration, "6h", "The longest any session may last.")
    drain: float = setting(
        duration,
        "10m",
        "How long a stop (TERM) waits before cutting sessions. A worker replaced (HUP, TTOU, "
        "recycled) cuts none: it waits for its sessions, by max_session at the latest.",
    )
    drain_notice: float = setting(
        duration_or_zero,
        "0s",
        "On TERM, how long to go on serving while failing load-balancer health checks (PROXY "
        "LOCAL connections are closed) before the listener closes: above HAProxy's fall x "
        "inter, so that no connection is queued on a closing socket. Needs proxy_protocol.",
    )


@dataclass(frozen=True)
class DirectorySettings:
    url: str = setting(
        directory_url,
        "sqlite:kilnproxy.db",
        "Where accounts, keys, repos live: sqlite:PATH, or a PostgreSQL URL "
        "postgresql://USER@HOST:5432/DBNAME shared by several proxy hosts (libpq's own: "
        "?sslmode=, PG* variables and ~/.pgpass apply; keep the password out of this file).",
    )
    pool_size: int = setting(
        positive_int, 4, "PostgreSQL connections per worker, for concurrent lookups."
    )


@dataclass(frozen=True)
class BackendSshSettings:
    key: Path = setting(path, "backend_id_ed25519", "The proxy's own key for ssh:// backends.")
    known_hosts: Path = setting(path, "backend_known_hosts", "Host keys of the ssh:// backends.")
    max_sessions_per_connection: int = setting(
        positive_int, 8, "Channels on one pooled backend connection."
    )
    pool_idle: float = setting(
        duration, "60s", "How long an idle pooled backend connection stays open."
    )
    keepalive: float = setting(
        duration,
        "15s",
        "How often a silent pooled backend connection is asked whether the storage is still "
        "there; three unanswered asks close it, and its sessions are told the storage is "
        "unavailable (a storage server that froze is found within 3 to 4 times this).",
    )
    window: int = setting(
        window_size,
        "512KiB",
        "Channel window on the backend leg: what a storage server may send ahead of us. It caps "
        "one transfer at window/RTT (512KiB: 1 GB/s at 0.5 ms); a smaller one makes the storage "
        "sshd send fewer, fuller packets, which costs us less CPU per byte.",
    )


@dataclass(frozen=True)
class BackendAgentSettings:
    """The proxy's side of agent:// backends (`kilnproxy agent` on the storage servers)."""

    ca: Path = setting(
        path, "agent_ca.pem", "CA certificate(s) the agents' certificates must be signed by."
    )
    cert: Path = setting(
        path, "proxy_cert.pem", "The proxy's client certificate, shown to every agent."
    )
    key: Path = setting(path, "proxy_key.pem", "The private key of the proxy's certificate.")
    max_sessions_per_connection: int = setting(
        positive_int, 16, "Sessions multiplexed on one pooled agent connection."
    )
    pool_idle: float = setting(
        duration, "60s", "How long an idle pooled agent connection stays open."
    )
    keepalive: float = setting(
        duration,
        "15s",
        "How often a silent agent connection is pinged; three unanswered pings close it, and "
        "its sessions are told the storage is unavailable.",
    )
    window: int = setting(
        window_size,
        "1MiB",
        "Per session, how much output an agent may send ahead of us (flow control).",
    )


@dataclass(frozen=True)
class AgentSettings:
    """`kilnproxy agent`, the storage agent: what it serves, to whom."""

    listen: tuple[Address, ...] = setting(
        addresses, ["127.0.0.1:9422"], "Addresses the agent accepts TLS on."
    )
    base: Path = setting(
        path,
        "repos",
        "The only directory whose repositories the agent serves (symlinks that "
        "lead out of it are refused).",
    )
    ca: Path = setting(
        path, "proxy_ca.pem", "CA certificate(s) that sign the proxies' client certificates."
    )
    cert: Path = setting(path, "agent_cert.pem", "The agent's server certificate.")
    key: Path = setting(path, "agent_key.pem", "The private key of the agent's certificate.")
    window: int = setting(
        window_size,
        "1MiB",
        "Per session, how much input a proxy may send ahead of the command (flow control).",
    )
    max_handshakes: int = setting(
        positive_int,
        256,
        "TLS handshakes under way at once (each holds about 300 KiB until it ends or "
        "[timeouts] dial passes); a connection beyond them is closed at once.",
    )
    max_commands: int = setting(
        count,
        1024,
        "Commands running at once, for all proxies; one more is refused (its client is told "
        "its storage is unavailable, try again later). 0: no cap.",
    )


@dataclass(frozen=True)
class StatusSettings:
    http: Address = setting(address, "127.0.0.1:8022", "Intranet HTTP status page.")
    socket: Path = setting(path, "kilnproxy.sock", "Unix status socket for the CLI (mode 0600).")
    hosts: tuple[str, ...] = setting(
        host_names, [], "Names the status page answers to (browsers, scripts, Prometheus), "
        "besides its addresses, localhost and this machine's name: another name, as in a DNS "
        "rebinding attack, gets 421.",
    )  # fmt: skip


@dataclass(frozen=True)
class LogSettings:
    format: str = setting(choice("text", "json"), "text", "Log line format: text or json.")
    level: str = setting(
        choice("debug", "info", "warning", "error"),
        "info",
        "Lowest level logged: debug, info, warning or error.",
    )
    file: Path | None = setting(optional_path, "", "Log file; empty means standard error.")


@dataclass(frozen=True)
class Config:
    home: Path
    source: Path | None
    ssh: SshSettings
    limits: LimitSettings
    workers: WorkerSettings
    timeouts: TimeoutSettings
    directory: DirectorySettings
    backend_ssh: BackendSshSettings
    backend_agent: BackendAgentSettings
    agent: AgentSettings
    status: StatusSettings
    log: LogSettings
    # The file's text as it was read (None: no file). The master starts each worker with its
    # own, not with the file as it may be by then: a change is in force at a HUP, on every
    # worker alike, and one saved with a mistake stops no worker that must be replaced.
    text: str | None = None

    def fixed_until_restart(self, reloaded: Config) -> list[str]:
        """The settings `reloaded` changes that a HUP cannot apply: the master holds the
        sockets they name from its start (the listening ones are the workers' too), and its
        status server the names it answers to."""
        kept = {
            "[ssh] listen": (self.ssh.listen, reloaded.ssh.listen),
            "[ssh] backlog": (self.ssh.backlog, reloaded.ssh.backlog),
            "[status] http": (self.status.http, reloaded.status.http),
            "[status] socket": (self.status.socket, reloaded.status.socket),
            "[status] hosts": (self.status.hosts, reloaded.status.hosts),
        }
        return [name for name, (now, then) in kept.items() if now != then]

    def problem(self) -> str | None:
        """What is wrong across sections, if anything."""
        if self.timeouts.drain_notice and self.ssh.proxy_protocol == "off":
            return (
                "[timeouts] drain_notice: a drain notice fails a load balancer's health checks, "
                "which arrive with a PROXY header: it needs [ssh] proxy_protocol"
            )
        return None


_SECTIONS: dict[str, type[Any]] = {
    "ssh": SshSettings,
    "limits": LimitSettings,
    "workers": WorkerSettings,
    "timeouts": TimeoutSettings,
    "directory": DirectorySettings,
    "backend_ssh": BackendSshSettings,
    "backend_agent": BackendAgentSettings,
    "agent": AgentSettings,
    "status": StatusSettings,
    "log": LogSettings,
}


def declarations() -> Iterator[tuple[str, dataclasses.Field[Any]]]:
    """Every declared setting as (section, field), in declaration order."""
    for section, cls in _SECTIONS.items():
        for item in dataclasses.fields(cls):
            yield section, item


# -- the reference: what `kilnproxy config` prints and the README shows ----------------------------

README_BEGIN = "<!-- generated from kilnproxy/config.py by `make readme`: edit it there -->"
README_END = "<!-- end of the generated configuration -->"
_WIDTH = 100


def _toml_lines(name: str, default: object) -> list[str]:
    """`name = default` in TOML (JSON's strings and arrays are TOML's): long arrays one per line."""
    line = f"{name} = {json.dumps(default)}"
    if len(line) <= _WIDTH or not isinstance(default, list):
        return [line]
    return [f"{name} = [", *(f"    {json.dumps(item)}," for item in default), "]"]


def reference() -> str:
    """Every setting as a TOML file of the defaults, each after its help as a comment."""
    lines: list[str] = []
    current = ""
    for section, item in declarations():
        if section != current:
            lines += ["", f"[{section}]"] if lines else [f"[{section}]"]
            current = section
        lines += textwrap.wrap(
            item.metadata["help"], _WIDTH, initial_indent="# ", subsequent_indent="# "
        )
        lines += _toml_lines(item.name, item.metadata["default"])
    return "\n".join(lines) + "\n"


def with_reference(readme: str) -> str:
    """The README with the reference as the TOML block between its two markers."""
    before, begin, rest = readme.partition(README_BEGIN + "\n")
    _, end, after = rest.partition(README_END)
    if not begin or not end:
        raise ValueError(f"the README lacks the lines {README_BEGIN} and {README_END}")
    return f"{before}{begin}```toml\n{reference()}```\n{end}{after}"


def home_from_env(environ: dict[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    home = Path(env.get("KILNPROXY_HOME") or "var").absolute()
    try:  # its paths are written into the directory (the local backend's base) as text
        str(home).encode()
    except UnicodeEncodeError:
        raise OperatorError(f"KILNPROXY_HOME {os.fsencode(home)!r} is not UTF-8") from None
    return home


def config_path(explicit: str | None, home: Path) -> Path | None:
    """--config if given, else $KILNPROXY_HOME/kilnproxy.toml if it exists, else no file."""
    if explicit == "":  # `--config "$UNSET"`: not the default file, which may be another's
        raise OperatorError("--config needs a path")
    if explicit:
        return Path(explicit).absolute()
    default = home / CONFIG_NAME
    try:
        return default if default.exists() else None
    except OSError as exc:  # a KILNPROXY_HOME this user may not enter
        raise OperatorError(f"cannot read config {default}: {exc.strerror}") from None


MAX_CONFIG = 1 << 20  # bytes: a config file is a few KiB; /dev/zero is not one


def _read_config(path: Path) -> str:
    with path.open("rb") as file:
        data = file.read(MAX_CONFIG + 1)
    if len(data) > MAX_CONFIG:
        raise OperatorError(f"config {path} is over {MAX_CONFIG >> 20} MiB: not a config file")
    return data.decode().removeprefix("\ufeff")  # a BOM, as some editors save UTF-8


def load(
    explicit: str | None = None, environ: dict[str, str] | None = None, text: str | None = None
) -> Config:
    """Read and validate the configuration; raise OperatorError with one clear line. With
    `text`, that is the file's content (read by the master), and the file is not read."""
    home = home_from_env(environ)
    if text is None:
        source = config_path(explicit, home)
        try:
            text = _read_config(source) if source is not None else None
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else str(exc)
            raise OperatorError(f"cannot read config {source}: {reason}") from None
    else:
        source = Path(explicit).absolute() if explicit else None
    raw: dict[str, Any] = {}
    if text is not None:
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise OperatorError(f"{source}: not valid TOML: {exc}") from None
    return dataclasses.replace(from_mapping(raw, home, source), text=text)


def from_mapping(raw: dict[str, Any], home: Path, source: Path | None = None) -> Config:
    where = f"{source}: " if source else ""
    unknown = set(raw) - set(_SECTIONS)
    if unknown:
        raise OperatorError(f"{where}unknown section [{sorted(unknown)[0]}]")
    sections: dict[str, Any] = {}
    for name, cls in _SECTIONS.items():
        table = raw.get(name, {})
        if not isinstance(table, dict):
            raise OperatorError(f"{where}[{name}] must be a table")
        known = {f.name for f in dataclasses.fields(cls)}
        extra = set(table) - known
        if extra:
            raise OperatorError(f"{where}unknown setting {sorted(extra)[0]} in [{name}]")
        values = {}
        for item in dataclasses.fields(cls):
            value = table.get(item.name, item.metadata["default"])
            try:
                values[item.name] = item.metadata["parser"](value, home)
            except ValueError as exc:
                raise OperatorError(f"{where}[{name}] {item.name}: {exc}") from None
        section = cls(**values)
        problem = section.problem() if hasattr(section, "problem") else None
        if problem:
            raise OperatorError(f"{where}[{name}] {problem}")
        sections[name] = section
    config = Config(home=home, source=source, **sections)
    problem = config.problem()
    if problem:
        raise OperatorError(f"{where}{problem}")
    return config
