"""The socketpair protocol between the master and a worker: small, typed, versioned.

Every message is a frozen dataclass of this module, sent as one JSON object per line,
`{"v": 3, "kind": ..., <its fields>}`. Workers say `Ready` once they serve, a `Heartbeat` every
second (their `WorkerStats`, cumulative `MetricsSnapshot`, `PoolStats` and the `SessionStats` rows
that changed), `Draining` when they start draining on their own (a TERM sent to them),
`SessionClosed` when sessions end (those of one pass of its loop: 10,000 connections dropped at
once are one message, not 10,000), and a `Reply` to a request. The master says `Drain`, `Stop`
(fast), `KillSession`, `TaskDumpRequest` and `HeapProfileRequest`.

Admission (SPEC 4b) is host-wide, so it has messages of its own, sent as things change (at most
once per pass of the sender's event loop), not with the heartbeat: a worker's `CountsChanged`
(its sessions per account) and `Offences` (connections that ended badly); the master's
`OthersChanged` (the same counts, from the host's other workers) and `Penalties` (what changed in
the host's penalty table). Their fields are the admission policy's own records
(`kilnproxy.policy`): networks and addresses travel as text, enums by value. Unauthenticated
connections are not in messages, which would come too late for a burst of accepts: every worker
counts them in the `StartupTable`, memory that the master and its workers share.

Rule 1: a message is encoded and decoded here, once, at the edge. Decoding checks every field's
type, so the code on either side reads typed fields and never a raw dict (the one opaque part is
a reply's data, which the master forwards to the status page without reading it).
Rule 2: a line of another version, of an unknown kind, sent the wrong way or with a missing,
extra or ill-typed field is a `ProtocolError` for the reader: logged, and the channel is
considered broken. It never crashes the reader. Both sides ship together: change a message,
bump VERSION.
Rule 3: this module must never import asyncssh (the master imports it).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import errno
import fcntl
import ipaddress
import json
import logging
import mmap
import os
import signal
import socket
import struct
import time
import types
import typing
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self, TypeAlias, TypeVar

from kilnproxy.policy.admission import IPAddress, Netblock, source_buckets
from kilnproxy.policy.penalty import Lifted, Notice, Penalised, PenaltyEvent, TableFull

log = logging.getLogger("kilnproxy.control")

VERSION = 6
MAX_LINE = 4 * 1024 * 1024
# Penalty notices per `Penalties` message: 10,000 IPv6 ones are about 1 MiB, well under MAX_LINE
# (a host under attack holds tens of thousands, all told to every worker that joins).
NOTICES_PER_MESSAGE = 10_000
# The exit status of a worker that cannot start: the master must not retry it forever.
WORKER_BOOT_ERROR = 3
# Signals a worker acts on whose default action would end it: USR1 (reopen the log) and HUP (the
# master's, ignored). A worker is started with them blocked and unblocks them once its handlers
# are in, so that one sent while it boots (a log rotation's USR1 during a rolling restart) waits
# for it instead of killing it.
BOOT_HELD_SIGNALS = frozenset({signal.SIGUSR1, signal.SIGHUP})

# Seconds: from a sub-millisecond SQLite lookup to a slow backend handshake.
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ProtocolError(ValueError):
    """A line that is not a well-formed message of this version, for this end."""


# -- what a worker reports -------------------------------------------------------------------------


@dataclass(frozen=True)
class Histogram:
    """Latencies counted per bucket of BUCKETS (one more bucket for +Inf), and their sum."""

    counts: tuple[int, ...] = (0,) * (len(BUCKETS) + 1)
    total: float = 0.0

    def __post_init__(self) -> None:
        if len(self.counts) != len(BUCKETS) + 1:
            raise ValueError(f"a histogram has {len(BUCKETS) + 1} buckets, not {len(self.counts)}")

    def merge(self, other: Histogram) -> Histogram:
        counts = tuple(a + b for a, b in zip(self.counts, other.counts, strict=True))
        return Histogram(counts, self.total + other.total)


@dataclass(frozen=True)
class MetricsSnapshot:
    """A worker's counters since it started, cumulative; the master adds them up (SPEC 7)."""

    outcomes: Mapping[str, int] = field(default_factory=dict)  # ended sessions by outcome
    bytes_in: int = 0
    bytes_out: int = 0
    refusals: Mapping[str, int] = field(default_factory=dict)  # by admission.Refusal value
    # The histograms are the fields with a help text (the Prometheus family's).
    auth_lookup: Histogram = field(
        default=Histogram(), metadata={"help": "Directory lookup of a public key."}
    )
    route_lookup: Histogram = field(
        default=Histogram(), metadata={"help": "Directory lookup of a repository."}
    )
    backend_dial: Histogram = field(
        default=Histogram(),
        metadata={
            "help": "Dialing a backend (ssh:// or agent://), handshake included; failed "
            "dials are not counted."
        },
    )

    def merge(self, other: MetricsSnapshot) -> MetricsSnapshot:
        outcomes, refusals = Counter(self.outcomes), Counter(self.refusals)
        outcomes.update(other.outcomes)
        refusals.update(other.refusals)
        mine, theirs = self.latencies(), other.latencies()
        return dataclasses.replace(
            self,
            outcomes=dict(outcomes),
            refusals=dict(refusals),
            bytes_in=self.bytes_in + other.bytes_in,
            bytes_out=self.bytes_out + other.bytes_out,
            **{name: histogram.merge(theirs[name]) for name, histogram in mine.items()},
        )

    def latencies(self) -> dict[str, Histogram]:
        """Every histogram field by name, in declaration order."""
        return {name: getattr(self, name) for name in LATENCIES}


# The histograms' names and help texts, declared once: the fields above.
LATENCIES: dict[str, str] = {
    f.name: f.metadata["help"] for f in dataclasses.fields(MetricsSnapshot) if "help" in f.metadata
}


class FastPathState(enum.Enum):
    """Whether a worker runs kilnproxy/ssh/fast_path.py; /info, `kilnproxy status` and /metrics
    say it."""

    NOT_APPLIED = "not applied"  # `apply` has not run: stock asyncssh
    ON = "on"
    DISABLED = "disabled"  # `[ssh] fast_path = false`: stock asyncssh
    UNSUPPORTED = "unsupported"  # asyncssh is not the pinned version: stock asyncssh


@dataclass(frozen=True)
class WorkerStats:
    """A worker's `statistics()`: what the status page and the process title show."""

    index: int
    pid: int
    started_at: float
    sessions: int
    sessions_total: int
    tasks: int
    fds: int
    rss: int
    heap: int
    accepting: bool
    backend_connections: int
    fast_path: FastPathState


@dataclass(frozen=True)
class PoolStats:
    """One backend's pool of SSH connections in one worker."""

    connections: int
    channels: int
    dials: int


@dataclass(frozen=True)
class SessionStats:
    """One row of the connection table (SPEC 7)."""

    session: str
    remote_addr: str
    login: str
    account: str | None
    user: str | None
    key_name: str | None
    key_fingerprint: str | None
    repo: str | None
    vcs: str | None
    verb: str | None
    backend: str | None
    started_at: float
    duration: float
    bytes_in: int
    bytes_out: int
    state: str


# -- the messages ----------------------------------------------------------------------------------


class Kind(enum.Enum):
    # worker -> master
    READY = "ready"
    HEARTBEAT = "heartbeat"
    DRAINING = "draining"
    SESSION_CLOSE = "session_close"
    REPLY = "reply"
    # master -> worker
    DRAIN = "drain"
    DRAIN_NOTICE = "drain_notice"
    STOP = "stop"
    KILL_SESSION = "kill_session"
    TASK_DUMP = "task_dump"
    HEAP_PROFILE = "heap_profile"
    # admission, worker -> master
    COUNTS_CHANGED = "counts_changed"
    OFFENCES = "offences"
    # admission, master -> worker
    OTHERS_CHANGED = "others_changed"
    PENALTIES = "penalties"


@dataclass(frozen=True)
class Ready:
    kind: ClassVar[Kind] = Kind.READY
    pid: int


@dataclass(frozen=True)
class Heartbeat:
    kind: ClassVar[Kind] = Kind.HEARTBEAT
    stats: WorkerStats
    metrics: MetricsSnapshot
    pools: Mapping[str, PoolStats]  # by backend name
    sessions: tuple[SessionStats, ...]  # only the rows that changed since the last heartbeat


@dataclass(frozen=True)
class Draining:
    """The worker drains on its own (a TERM reached it): its replacement may start now."""

    kind: ClassVar[Kind] = Kind.DRAINING


@dataclass(frozen=True)
class SessionClosed:
    """The sessions that ended in one pass of the worker's loop."""

    kind: ClassVar[Kind] = Kind.SESSION_CLOSE
    sessions: tuple[str, ...]


@dataclass(frozen=True)
class Reply:
    """The answer to request `id`: its data (forwarded, never read, by the master) or an error."""

    kind: ClassVar[Kind] = Kind.REPLY
    id: int
    data: dict[str, Any] | None = None
    error: str | None = None

    def __post_init__(self) -> None:
        if (self.data is None) == (self.error is None):
            raise ValueError("a reply carries either data or an error")


@dataclass(frozen=True)
class Drain:
    """Stop accepting and let the sessions finish. `stopping`: the server stops (TERM), so the
    rest are cut at the drain timeout; else the worker is replaced (HUP, TTOU, its memory) and
    cuts no session (SPEC 6): each ends by itself, by `max_session` at the latest."""

    kind: ClassVar[Kind] = Kind.DRAIN
    stopping: bool


@dataclass(frozen=True)
class DrainNotice:
    """A drain is coming: go on serving, but fail the load balancer's health checks, so that
    it sends no more connections before the listening socket closes."""

    kind: ClassVar[Kind] = Kind.DRAIN_NOTICE


@dataclass(frozen=True)
class Stop:
    kind: ClassVar[Kind] = Kind.STOP


@dataclass(frozen=True)
class KillSession:
    kind: ClassVar[Kind] = Kind.KILL_SESSION
    session: str


@dataclass(frozen=True)
class TaskDumpRequest:
    kind: ClassVar[Kind] = Kind.TASK_DUMP
    id: int


@dataclass(frozen=True)
class HeapProfileRequest:
    kind: ClassVar[Kind] = Kind.HEAP_PROFILE
    id: int
    top: int
    seconds: float
    stop: bool
    peek: bool


# -- admission: host-wide counts and penalties ----------------------------------------------------


@dataclass(frozen=True)
class CountsChanged:
    """How this worker's sessions per account changed since it last said: negative counts are
    ones that ended. A worker's own counts are the sum of every change it sent."""

    kind: ClassVar[Kind] = Kind.COUNTS_CHANGED
    sessions: Mapping[str, int]  # by account


@dataclass(frozen=True)
class OthersChanged:
    """The same changes, from the host's other workers: a worker adds them to its view of the
    rest of the host. The first one a worker gets is that whole view."""

    kind: ClassVar[Kind] = Kind.OTHERS_CHANGED
    sessions: Mapping[str, int]


@dataclass(frozen=True)
class Offence:
    """A connection that ended before it authenticated, and how (the penalty's event)."""

    address: IPAddress
    event: PenaltyEvent


@dataclass(frozen=True)
class Offences:
    kind: ClassVar[Kind] = Kind.OFFENCES
    offences: tuple[Offence, ...]


@dataclass(frozen=True)
class Penalties:
    """What changed in the host's penalty table, applied in field order: penalised, then lifted,
    then table_full. That is the order `PenaltyBox` says them in; `of` cuts notices in any
    other order into several messages, so that every worker applies them as the box did, and
    cuts them every NOTICES_PER_MESSAGE."""

    kind: ClassVar[Kind] = Kind.PENALTIES
    penalised: tuple[Penalised, ...] = ()
    lifted: tuple[Lifted, ...] = ()
    table_full: tuple[TableFull, ...] = ()

    @classmethod
    def of(cls, notices: tuple[Notice, ...]) -> list[Penalties]:
        groups: list[tuple[list[Penalised], list[Lifted], list[TableFull]]] = [([], [], [])]
        for count, notice in enumerate(notices):
            if count and count % NOTICES_PER_MESSAGE == 0:
                groups.append(([], [], []))
            _, lifted, full = groups[-1]
            if isinstance(notice, Penalised):
                if lifted or full:  # after a later field: a message of its own
                    groups.append(([], [], []))
                groups[-1][0].append(notice)
            elif isinstance(notice, Lifted):
                if full:
                    groups.append(([], [], []))
                groups[-1][1].append(notice)
            else:
                full.append(notice)
        return [cls(tuple(p), tuple(lift), tuple(f)) for p, lift, f in groups if p or lift or f]

    def notices(self) -> tuple[Notice, ...]:
        return (*self.penalised, *self.lifted, *self.table_full)


WorkerMessage: TypeAlias = (
    Ready | Heartbeat | Draining | SessionClosed | Reply | CountsChanged | Offences
)
MasterMessage: TypeAlias = (
    Drain
    | DrainNotice
    | Stop
    | KillSession
    | TaskDumpRequest
    | HeapProfileRequest
    | OthersChanged
    | Penalties
)
Message: TypeAlias = WorkerMessage | MasterMessage


# -- encoding and decoding, once, here -------------------------------------------------------------

Decoder = Callable[[object, str], Any]


def _scalar(kind: type) -> Decoder:
    def decode(value: object, path: str) -> Any:
        # bool is an int to Python, never to us. An int is a fine float: a float field given an
        # int (seconds=60) is written as 60.
        if isinstance(value, bool) and kind is not bool:
            raise ProtocolError(f"{path}: bool is not {kind.__name__}")
        if kind is float and isinstance(value, int | float):
            return float(value)
        if not isinstance(value, kind):
            raise ProtocolError(f"{path}: {type(value).__name__} is not {kind.__name__}")
        return value

    return decode


def _enum(kind: type[enum.Enum]) -> Decoder:
    """An enum by its value."""

    def decode(value: object, path: str) -> Any:
        try:
            return kind(value)
        except (ValueError, TypeError):  # TypeError: a list or an object, unhashable
            raise ProtocolError(f"{path}: {value!r} is not a {kind.__name__}") from None

    return decode


def _optional(inner: Decoder) -> Decoder:
    return lambda value, path: None if value is None else inner(value, path)


def _sequence(item: Decoder) -> Decoder:
    def decode(value: object, path: str) -> tuple[Any, ...]:
        if not isinstance(value, list):
            raise ProtocolError(f"{path}: {type(value).__name__} is not a list")
        return tuple(item(v, f"{path}[{i}]") for i, v in enumerate(value))

    return decode


def _mapping(key: Decoder, item: Decoder) -> Decoder:
    def decode(value: object, path: str) -> dict[Any, Any]:
        if not isinstance(value, dict):
            raise ProtocolError(f"{path}: {type(value).__name__} is not an object")
        return {key(k, f"{path} key"): item(v, f"{path}.{k}") for k, v in value.items()}

    return decode


def _text(parse: Callable[[str], Any]) -> Decoder:
    """A value written as text (a network, an address), parsed strictly."""

    def decode(value: object, path: str) -> Any:
        if not isinstance(value, str):
            raise ProtocolError(f"{path}: {type(value).__name__} is not str")
        try:
            return parse(value)
        except ValueError as exc:
            raise ProtocolError(f"{path}: {exc}") from None

    return decode


def _network(text: str) -> Netblock:
    return ipaddress.ip_network(text, strict=True)  # host bits set: not one we sent


# Types that travel as text, by the type hint that declares them.
_TEXTS: dict[object, Decoder] = {Netblock: _text(_network), IPAddress: _text(ipaddress.ip_address)}


def _record(cls: type) -> Decoder:
    """A dataclass from an object with exactly its fields, each of its declared type."""
    hints = typing.get_type_hints(cls)
    decoders = {f.name: _decoder(hints[f.name]) for f in dataclasses.fields(cls)}

    def decode(value: object, path: str) -> Any:
        if not isinstance(value, dict):
            raise ProtocolError(f"{path}: {type(value).__name__} is not an object")
        if value.keys() != decoders.keys():
            missing, extra = decoders.keys() - value.keys(), value.keys() - decoders.keys()
            raise ProtocolError(f"{path}: missing {sorted(missing)}, unexpected {sorted(extra)}")
        fields = {name: decoders[name](value[name], f"{path}.{name}") for name in decoders}
        try:
            return cls(**fields)
        except ValueError as exc:  # its own checks (__post_init__)
            raise ProtocolError(f"{path}: {exc}") from None

    return decode


def _decoder(hint: Any) -> Decoder:
    """The decoder of one declared type; an undeclared shape is a bug, found at import."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return lambda value, path: value  # a reply's data: forwarded, never read
    if hint in (bool, int, float, str):
        return _scalar(hint)
    if hint in _TEXTS:
        return _TEXTS[hint]
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return _enum(hint)
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return _record(hint)
    if origin in (typing.Union, types.UnionType) and len(args) == 2 and type(None) in args:
        return _optional(_decoder(next(a for a in args if a is not type(None))))
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return _sequence(_decoder(args[0]))
    if origin in (dict, Mapping) and (args[0] is str or args[0] in _TEXTS):
        return _mapping(_decoder(args[0]), _decoder(args[1]))
    raise TypeError(f"no control codec for {hint!r}")


_MESSAGES: tuple[type[Message], ...] = typing.get_args(Message)
_DECODERS: dict[Kind, Decoder] = {cls.kind: _record(cls) for cls in _MESSAGES}


def _plain(value: object) -> Any:
    """A value as its JSON has it: records as objects, enums by value, networks and addresses
    as text (also as an object's keys)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, _ADDRESSES):
        return str(value)
    return value


_ADDRESSES = (ipaddress.IPv4Network, ipaddress.IPv6Network, ipaddress.IPv4Address,
              ipaddress.IPv6Address)  # fmt: skip


def encode(message: Message) -> bytes:
    body = _plain(message)
    return json.dumps({"v": VERSION, "kind": message.kind.value, **body}).encode() + b"\n"


def decode(line: bytes) -> Message:
    """One line as a message; ProtocolError if it is not one of this version."""
    try:
        data = json.loads(line)
    except (ValueError, RecursionError) as exc:  # RecursionError: "[[[[..." nested too deep
        raise ProtocolError(f"not JSON ({exc}): {line[:80]!r}") from None
    if not isinstance(data, dict) or data.pop("v", None) != VERSION:
        raise ProtocolError(f"not a version {VERSION} control message: {line[:80]!r}")
    try:
        kind = Kind(data.pop("kind", None))
    except ValueError:
        raise ProtocolError(f"no such kind of control message: {line[:80]!r}") from None
    message: Message = _DECODERS[kind](data, kind.value)
    return message


def from_worker(line: bytes) -> WorkerMessage:
    message = decode(line)
    if not isinstance(message, WorkerMessage):
        raise ProtocolError(f"a worker does not send {message.kind.value}")
    return message


def from_master(line: bytes) -> MasterMessage:
    message = decode(line)
    if not isinstance(message, MasterMessage):
        raise ProtocolError(f"the master does not send {message.kind.value}")
    return message


# -- the socketpair --------------------------------------------------------------------------------

Received = TypeVar("Received")


class Channel:
    """One end of the socketpair, as asyncio streams: `ToWorker` is the master's, `ToMaster` a
    worker's."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    @classmethod
    async def open(cls, sock: socket.socket) -> Self:
        reader, writer = await asyncio.open_unix_connection(sock=sock, limit=MAX_LINE)
        return cls(reader, writer)

    def send(self, message: Message) -> None:
        """Send `message`. One the other end could not read (over MAX_LINE, which would break
        the channel: a bug, since senders keep under it) is dropped, with an error line."""
        if self._writer.is_closing():
            return
        line = encode(message)
        if len(line) > MAX_LINE:
            log.error("control message %s of %d bytes not sent: over the channel's %d",
                      message.kind.value, len(line), MAX_LINE)  # fmt: skip
            return
        self._writer.write(line)

    async def close_sent(self, within: float) -> None:
        """Close once what was sent has been written (at most `within` seconds, for a peer
        that reads nothing): a process about to exit says its last words this way."""
        self._writer.close()
        with contextlib.suppress(TimeoutError, ConnectionError):
            async with asyncio.timeout(within):
                await self._writer.wait_closed()

    def backlog(self) -> int:
        """Bytes sent that the other end has not read yet (beyond the socket's own buffer)."""
        return self._writer.transport.get_write_buffer_size()

    async def _receive(self, decoder: Callable[[bytes], Received]) -> Received | None:
        """The next message, or None when the other end has gone or broke the protocol."""
        try:
            line = await self._reader.readline()
            return decoder(line) if line else None
        except ConnectionError as exc:
            # The other process died (a worker SIGKILLed while the master wrote to it): its
            # end says why (the master logs the worker's exit status); no protocol was broken.
            log.warning("control channel lost: %s", exc)
            return None
        except (asyncio.LimitOverrunError, ValueError) as exc:
            # ValueError: a ProtocolError, or a line over MAX_LINE (readline's own)
            log.error("control channel broken: %s", exc)
            return None

    def close(self) -> None:
        self._writer.close()


class ToWorker(Channel):
    """The master's end of a worker's socketpair."""

    async def receive(self) -> WorkerMessage | None:
        return await self._receive(from_worker)


class ToMaster(Channel):
    """A worker's end of its socketpair."""

    async def receive(self) -> MasterMessage | None:
        return await self._receive(from_master)


# -- the startup table: unauthenticated connections, in memory the whole host shares --------------


class StartupTable:
    """Every worker's unauthenticated connections (SPEC 4b), in all and by source (a
    count-min sketch: each source in two keyed buckets, `source_buckets`), in a memfd the
    master creates and every worker maps (its fd is passed like the listening ones).

    Messages tell the other workers too late: in a burst each worker would admit up to a limit
    before hearing of the others. Here each worker has a slot of its own (the master assigns
    one to each live process, a draining worker and its replacement never the same) and is the
    only writer of it; deciding sums every slot, so it sees the whole host as it is now. The
    read, the decision and the count of an admitted connection happen under an exclusive
    record lock (`exclusive`): two workers accepting in the same instant are decided one after
    the other, never both on the count that held before either. A record lock dies with its
    process (and is waited for 50 ms at most: a stopped holder must not stop every accept), and
    the master zeroes a dead worker's slot (`clear`) before it assigns it again.
    Taking a count away needs no lock: a stale count is a higher one, so it can only refuse.

    Layout, little-endian int32 after a header: one total per slot, then `buckets` rows of one
    cell per slot (a bucket's cells are together: a page a bucket for a decision, not one a
    slot).
    """

    MAGIC = b"KPST"
    HEADER = struct.Struct("<4sII16s")  # magic, slots, buckets, the buckets' hash key
    BUCKETS = 4096
    TOTALS_AT = 64
    LOCK_PATIENCE = 0.05  # seconds

    def __init__(self, fd: int, memory: mmap.mmap) -> None:
        magic, self.slots, self.buckets, self._key = self.HEADER.unpack_from(memory)
        cells_at, size = self._layout(self.slots, self.buckets)
        if magic != self.MAGIC or len(memory) != size:
            raise ValueError("not a kilnproxy startup table")
        self._fd = fd
        self._memory = memory
        self._warned = False
        words = memoryview(memory)
        self._totals = words[self.TOTALS_AT : self.TOTALS_AT + 4 * self.slots].cast("i")
        self._cells = words[cells_at:].cast("i")

    @classmethod
    def _layout(cls, slots: int, buckets: int) -> tuple[int, int]:
        """Where the cells start (a cache line after the totals), and the whole size."""
        cells_at = cls.TOTALS_AT + -(-4 * slots // 64) * 64
        return cells_at, cells_at + 4 * slots * buckets

    @classmethod
    def create(cls, slots: int, buckets: int = BUCKETS) -> StartupTable:
        """The master's: zeroed, with a fresh hash key (close-on-exec: passed on explicitly)."""
        _, size = cls._layout(slots, buckets)
        fd = os.memfd_create("kilnproxy-startups", os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        memory = mmap.mmap(fd, size)
        memory.write(bytes(size))  # every page now, not at the first flood
        cls.HEADER.pack_into(memory, 0, cls.MAGIC, slots, buckets, os.urandom(16))
        return cls(fd, memory)

    @classmethod
    def attach(cls, fd: int) -> StartupTable:
        """A worker's view of the master's table, from the fd it inherited."""
        memory = mmap.mmap(fd, os.fstat(fd).st_size)
        bytes(memory)  # map every page now: a flood later does not show as the worker's growth
        return cls(fd, memory)

    def fileno(self) -> int:
        return self._fd

    def buckets_of(self, netblock: Netblock) -> tuple[int, ...]:
        """The buckets a source is counted in (the same in every process of the host)."""
        return source_buckets(netblock, self._key, self.buckets)

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[bool]:
        """Decide and count with no other worker doing the same meanwhile (microseconds each);
        whether the lock was had. A worker stopped while it holds the lock (SIGSTOP, a
        debugger) must not stop every other worker's accepts until the master kills it: after
        `LOCK_PATIENCE` a worker goes on without, its counts then exact but for a race."""
        locked = self._lock()
        try:
            yield locked
        finally:
            if locked:
                fcntl.lockf(self._fd, fcntl.LOCK_UN)

    def _lock(self) -> bool:
        give_up = time.monotonic() + self.LOCK_PATIENCE
        while True:
            try:
                fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):  # not "another has it"
                    raise
            if time.monotonic() >= give_up:
                if not self._warned:
                    self._warned = True
                    log.warning("startup table locked over %.0f ms: deciding without the lock "
                                "(a worker stopped?)", 1000 * self.LOCK_PATIENCE)  # fmt: skip
                return False
            time.sleep(0.00005)

    def total(self) -> int:
        return sum(self._totals)

    def in_bucket(self, bucket: int) -> int:
        return sum(self._cells[bucket * self.slots : (bucket + 1) * self.slots])

    def from_source(self, buckets: tuple[int, ...]) -> int:
        """A source's unauthenticated connections, host-wide: the least of its buckets, each
        of which holds them and whatever other sources share it (never fewer than it has)."""
        return min(self.in_bucket(bucket) for bucket in buckets)

    def add(self, slot: int, buckets: tuple[int, ...], change: int) -> None:
        """Only slot's own worker calls this, so no write is ever lost."""
        self._totals[slot] += change
        for bucket in buckets:
            self._cells[bucket * self.slots + slot] += change

    def clear(self, slot: int) -> None:
        """The master's, once slot's worker is gone: what it held is held no more."""
        self._totals[slot] = 0
        self._cells[slot :: self.slots] = memoryview(bytes(4 * self.buckets)).cast("i")
