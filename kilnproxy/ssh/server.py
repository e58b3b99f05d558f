"""The SSH surface of SPEC 3: host keys, the algorithm policy, and the listening acceptor.

Owns the asyncssh options, so that policy lives in one place. Everything per connection is in
`session`; everything per channel in `relay`; accepting (admission, PROXY headers) in
`proxy_accept`.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from functools import partial
from pathlib import Path
from typing import Any

import asyncssh
from asyncssh.constants import MSG_CHANNEL_CLOSE
from asyncssh.encryption import get_encryption_algs
from asyncssh.packet import SSHPacket

from kilnproxy.config import Config
from kilnproxy.errors import OperatorError
from kilnproxy.ssh.keys import policy_problem, write_new_key
from kilnproxy.ssh.proxy_accept import Address, ProxyListener
from kilnproxy.ssh.services import Startup
from kilnproxy.ssh.session import Session, SessionHost
from kilnproxy.ssh.signatures import ALLOWED_SIGNATURES, SIGNATURE_ALGS

log = logging.getLogger("kilnproxy.server")


def ensure_host_keys(paths: tuple[Path, ...]) -> list[str]:
    """Generate an ed25519 key at each configured path that does not exist yet (SPEC 8)."""
    made = []
    for path in paths:
        if path.exists():
            continue
        key = write_new_key(path, "kilnproxy host key")
        made.append(f"generated host key {path} ({key.get_fingerprint()})")
    return made


def load_host_keys(paths: tuple[Path, ...]) -> list[asyncssh.SSHKeyPair]:
    """Read the host keys; an RSA host key signs with rsa-sha2-256/512 only, never SHA-1.

    A key pair per signature algorithm: asyncssh sets the algorithm a connection negotiated on
    the key pair it chose (`set_sig_algorithm`), and signs when the client's key exchange comes,
    a round trip later. One RSA pair shared by every connection of a worker would sign one
    client's exchange with the algorithm another client negotiated meanwhile (OpenSSH's
    rsa-sha2-512, Go's rsa-sha2-256), and its handshake would fail. A pair whose algorithm is
    the one negotiated is never changed."""
    keys = []
    for path in paths:
        try:
            key = asyncssh.read_private_key(path)
            problem = policy_problem(key)  # what a client's key may not be, a host key neither
            if problem is not None:
                raise OperatorError(f"host key {path}: {problem}")
            (loaded,) = asyncssh.load_keypairs([key])
            for alg in loaded.host_key_algorithms:
                if alg in ALLOWED_SIGNATURES:
                    (pair,) = asyncssh.load_keypairs([key])
                    pair.set_sig_algorithm(alg)
                    pair.host_key_algorithms = [alg]
                    keys.append(pair)
        except OSError as exc:
            raise OperatorError(f"cannot read host key {path}: {exc.strerror}") from None
        except (asyncssh.KeyImportError, ValueError) as exc:
            raise OperatorError(f"host key {path} is not a usable private key: {exc}") from None
    return keys


def serving_options(config: Config) -> asyncssh.SSHServerConnectionOptions:
    """The host keys read and the options built: what a worker serves with, and what `serve`,
    `demo` and a HUP check first (OperatorError: no worker could start with them)."""
    return server_options(config, load_host_keys(config.ssh.host_keys))


def server_options(
    config: Config, keys: list[asyncssh.SSHKeyPair]
) -> asyncssh.SSHServerConnectionOptions:
    if not any(pair.host_key_algorithms for pair in keys):
        raise OperatorError("no usable host key (ed25519, ecdsa or rsa)")
    ssh = config.ssh
    timeouts = config.timeouts
    known = {alg.decode("ascii") for alg in get_encryption_algs()}
    for alg in ssh.fallback_encryption_algs:
        if alg not in known:
            raise OperatorError(f"[ssh] fallback_encryption_algs: unknown cipher {alg!r}")
    try:
        return asyncssh.SSHServerConnectionOptions(
            server_host_keys=keys,
            kex_algs=list(ssh.kex_algs),
            # kex_offer adds ssh.fallback_encryption_algs for a client that has none of these.
            encryption_algs=list(ssh.encryption_algs),
            mac_algs=list(ssh.mac_algs),
            compression_algs=["none"],
            signature_algs=SIGNATURE_ALGS,
            server_version="kilnproxy",
            # Our own login-grace timer speaks first; this one is only a backstop.
            login_timeout=timeouts.login_grace + 10,
            allow_pty=False,
            # No pty, so no line editing: without this every channel call goes through
            # asyncssh's editor wrapper (`__getattr__` on each write of the hot path).
            line_editor=False,
            agent_forwarding=False,
            x11_forwarding=False,
            password_auth=False,
            kbdint_auth=False,
            host_based_auth=False,
            # Public keys only (SPEC 3), whatever gssapi and keytab the host has; and no
            # hostname lookup when the options are built.
            gss_host=None,
            gss_kex=False,
            gss_auth=False,
            encoding=None,
            keepalive_interval=0,
        )
    except (ValueError, asyncssh.Error) as exc:
        raise OperatorError(f"[ssh] algorithm settings: {exc}") from None


async def listen(
    sock: socket.socket, host: SessionHost, options: asyncssh.SSHServerConnectionOptions
) -> asyncssh.SSHAcceptor:
    """Serve on an already bound socket (the master's, or one of systemd's).

    `ProxyListener` accepts instead of asyncio's server, so that admission closes a refused
    connection before asyncssh sends a byte (its own server sends the banner at once), and
    hands each admitted one on, after its PROXY header when the protocol is on.
    """
    ssh = host.config.ssh
    # What asyncssh.listen does once per listener: the options every connection shares.
    options = await asyncssh.SSHServerConnectionOptions.construct(
        options, server_factory=lambda: Session(host)
    )
    sock.listen(ssh.backlog)
    listener = ProxyListener(
        sock,
        ssh,
        partial(_serve_accepted, options),
        host.services.admission.admit,
        lambda: host.failing_health_checks,
        host.services.metrics.refused,
    )
    await listener.start_serving()
    return asyncssh.SSHAcceptor(listener, options)


# What `env` requests may leave on a channel: the one variable kilnproxy passes on, no longer
# than any value `policy.commands.git_protocol` accepts. asyncssh keeps every one it is sent,
# each up to a packet (256 KiB), for as long as the channel lasts.
KEPT_ENV = b"GIT_PROTOCOL"
KEPT_ENV_MAX = 256
# The connection's write buffer: past WRITE_HIGH bytes that the client has not taken, it is not
# read from, and every command's output waits, until it is down to WRITE_LOW. A client's window
# bounds nothing here, since the client sets it; asyncssh itself ignores the transport's pause.
# Above any one flush of the relay (256 KiB), so that a client that keeps up never meets it.
WRITE_HIGH, WRITE_LOW = 4 << 20, 1 << 20


class _Channel(asyncssh.SSHServerChannel[bytes]):
    """asyncssh's session channel, keeping of the client's `env` requests only KEPT_ENV, and
    handing the session every command, UTF-8 or not."""

    def _process_env_request(self, packet: SSHPacket) -> bool:
        name = packet.get_string()
        value = packet.get_string()
        packet.check_end()
        if name != KEPT_ENV or len(value) > KEPT_ENV_MAX:
            return False  # refused (OpenSSH's SendEnv LANG LC_* among them: clients go on)
        self._env[name] = value
        return True

    def _process_exec_request(self, packet: SSHPacket) -> bool:
        """A command that is not UTF-8 goes to the session like any other, which refuses it as
        malformed (SPEC 3: a line, exit 128); asyncssh refuses the request, telling nothing."""
        command = packet.get_string()
        packet.check_end()
        return self._start_session(command=command.decode("utf-8", "surrogateescape"))

    def _process_client_close(self, pkttype: int, pktid: int, packet: SSHPacket) -> None:
        """The client closed its channel: it takes nothing more. asyncssh ends the channel only
        once it has passed on what the client sent before, which it holds while the relay
        reads nothing (the command's stdin is full); and the command, blocked on output the
        client no longer takes, would never read again. So what it holds is dropped, and the
        channel ends now: its command is aborted as it ends, whatever it was given."""
        self._process_close(pkttype, pktid, packet)
        if self._recv_state == "close_pending":
            self._discard_recv()

    # Dispatched by packet type from this table, not by method name (asyncssh's own is a dict).
    _packet_handlers = {  # noqa: RUF012
        **asyncssh.SSHServerChannel._packet_handlers,
        MSG_CHANNEL_CLOSE: _process_client_close,
    }


class _Connection(asyncssh.SSHServerConnection):
    """asyncssh's server connection, without the copy of its options made at each login,
    with its channels' `env` kept to what kilnproxy uses, and with back-pressure on its
    writes: asyncssh's `pause_writing` does nothing, and a client that advertises a large
    window and then reads nothing would have a clone's whole pack buffered for it."""

    def create_server_channel(
        self, encoding: str | None = "", errors: str = "", window: int = 0, max_pktsize: int = 0
    ) -> asyncssh.SSHServerChannel[Any]:
        channel = super().create_server_channel(encoding, errors, window, max_pktsize)
        channel.__class__ = _Channel  # the same object, with the env rule above
        return channel

    def pause_writing(self) -> None:
        self._backlogged(True)

    def resume_writing(self) -> None:
        self._backlogged(False)

    def _backlogged(self, backlogged: bool) -> None:
        transport = self._transport
        if transport is not None and not transport.is_closing():
            if backlogged:
                transport.pause_reading()
            else:
                transport.resume_reading()
        owner = self.get_owner()
        if isinstance(owner, Session):
            owner.client_backlogged(backlogged)

    async def reload_config(self) -> None:
        """Keep the listener's options: asyncssh rebuilds them at the first userauth request,
        for `Match` blocks of an OpenSSH-style server config file, in a thread of the default
        executor. kilnproxy never gives asyncssh such a file (`server_options`), so the rebuild
        is an equal copy: about 4 KiB held for the life of each connection, and a round trip
        through a thread on every login (issue 13)."""


async def _serve_accepted(
    options: asyncssh.SSHServerConnectionOptions,
    sock: socket.socket,
    source: Address | None,
    startup: Startup,
    health_check: bool,
    accepted_at: float,
) -> None:
    """Run SSH on a connection `ProxyListener` accepted, as asyncssh.listen's own server
    would; the client's address from the header goes along as the connection's
    `proxy_source`, which the session takes for its remote address, its admission `startup`,
    which the session ends, and when it was accepted, which its login grace runs from."""
    loop = asyncio.get_running_loop()

    def connection() -> asyncssh.SSHServerConnection:
        conn = _Connection(loop, options)
        conn.set_extra_info(startup=startup, accepted_at=accepted_at)
        if source is not None:
            conn.set_extra_info(proxy_source=source)
        if health_check:  # the session logs it at debug level only: it is no client's
            conn.set_extra_info(health_check=True)
        return conn

    transport, _ = await loop.connect_accepted_socket(connection, sock)
    transport.set_write_buffer_limits(high=WRITE_HIGH, low=WRITE_LOW)
