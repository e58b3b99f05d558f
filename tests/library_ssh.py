"""An ssh(1)-like command for git's GIT_SSH_COMMAND over an SSH library: paramiko or libssh2.

    python tests/library_ssh.py --library paramiko|libssh2 --key KEY --known-hosts FILE \\
        [-o SendEnv=GIT_PROTOCOL] [-p PORT] USER@HOST COMMAND

It connects with the library's own default algorithms (it sets nothing but the key and the host
key to expect, from an OpenSSH known_hosts file), runs COMMAND, relays stdin, stdout and stderr,
and exits with the command's exit status: the way a program built on the library reaches a git
server. libssh2 is reached through ssh2-python, whose wheel carries its own libssh2. Any other
`-o` option git passes is ignored, as it would not change what the library offers.
"""

from __future__ import annotations

import argparse
import base64
import os
import select
import socket
import sys
import threading
from pathlib import Path
from typing import Any

CHUNK = 65536


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="library_ssh")
    parser.add_argument("--library", choices=("paramiko", "libssh2"), required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--known-hosts", required=True)
    parser.add_argument("-o", dest="options", action="append", default=[])
    parser.add_argument("-p", dest="port", type=int, default=22)
    parser.add_argument("destination")
    parser.add_argument("command")
    return parser.parse_args(argv)


def known_host_key(path: str, host: str, port: int) -> tuple[str, bytes]:
    """The key type and blob that known_hosts holds for HOST:PORT."""
    name = host if port == 22 else f"[{host}]:{port}"
    for line in Path(path).read_text().splitlines():
        fields = line.split()
        if len(fields) >= 3 and name in fields[0].split(","):
            return fields[1], base64.b64decode(fields[2])
    raise SystemExit(f"library_ssh: no key for {name} in {path}")


def sent_environment(options: list[str]) -> dict[str, str]:
    """What `-o SendEnv=NAME` asks to send (git asks for GIT_PROTOCOL), where it is set."""
    names = [o.partition("=")[2] for o in options if o.lower().startswith("sendenv=")]
    return {name: os.environ[name] for name in names if name in os.environ}


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


# -- paramiko ------------------------------------------------------------------------------------


def run_paramiko(args: argparse.Namespace, user: str, host: str) -> int:
    import paramiko

    client = paramiko.SSHClient()
    client.load_host_keys(args.known_hosts)
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect(host, args.port, user, key_filename=args.key, look_for_keys=False,
                   allow_agent=False, timeout=30)  # fmt: skip
    transport = client.get_transport()
    assert transport is not None
    channel = transport.open_session()
    for name, value in sent_environment(args.options).items():
        channel.set_environment_variable(name, value)
    channel.exec_command(args.command)

    def send_stdin() -> None:
        while data := os.read(0, CHUNK):
            channel.sendall(data)
        channel.shutdown_write()

    def copy_stderr() -> None:
        while data := channel.recv_stderr(CHUNK):
            write_all(2, data)

    threads = [threading.Thread(target=f, daemon=True) for f in (send_stdin, copy_stderr)]
    for thread in threads:
        thread.start()
    while data := channel.recv(CHUNK):
        write_all(1, data)
    status: int = channel.recv_exit_status()
    threads[1].join(10)
    client.close()
    return status


# -- libssh2 -------------------------------------------------------------------------------------


def run_libssh2(args: argparse.Namespace, user: str, host: str) -> int:
    from ssh2.session import Session

    sock = socket.create_connection((host, args.port), timeout=30)
    session = Session()
    session.handshake(sock)
    blob, _ = session.hostkey()
    if blob != known_host_key(args.known_hosts, host, args.port)[1]:
        raise SystemExit(f"library_ssh: host key of {host}:{args.port} does not match")
    session.userauth_publickey_fromfile(user, args.key)
    channel = session.open_session()
    for name, value in sent_environment(args.options).items():
        channel.setenv(name, value)
    channel.execute(args.command)
    # libssh2 is not for two threads at once: one loop, non-blocking, relays both ways.
    session.set_blocking(False)
    relay_libssh2(session, channel, sock)
    session.set_blocking(True)
    channel.close()
    channel.wait_closed()
    status: int = channel.get_exit_status()
    return status


def relay_libssh2(session: Any, channel: Any, sock: socket.socket) -> None:
    from ssh2.error_codes import LIBSSH2_ERROR_EAGAIN as EAGAIN
    from ssh2.session import LIBSSH2_SESSION_BLOCK_OUTBOUND

    pending, stdin_open, eof_sent = b"", True, False
    while True:
        moved = False
        for read, fd in ((channel.read, 1), (channel.read_stderr, 2)):
            size, data = read(CHUNK)
            if size > 0:
                write_all(fd, data)
                moved = True
        if pending:
            rc, written = channel.write(pending)
            if rc != EAGAIN and written > 0:
                pending, moved = pending[written:], True
        elif stdin_open and select.select([0], [], [], 0)[0]:
            pending, moved = os.read(0, CHUNK), True
            stdin_open = bool(pending)
        elif not stdin_open and not eof_sent:
            eof_sent = channel.send_eof() != EAGAIN
        if channel.eof() and not moved:
            return
        if not moved:  # wait for what libssh2 waits for, and for stdin
            blocked = session.block_directions()
            readers: list[socket.socket | int] = [sock]
            readers += [0] if stdin_open and not pending else []
            writers = [sock] if blocked & LIBSSH2_SESSION_BLOCK_OUTBOUND else []
            select.select(readers, writers, [], 0.2)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    user, _, host = args.destination.rpartition("@")
    run = run_paramiko if args.library == "paramiko" else run_libssh2
    return run(args, user or "git", host)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
