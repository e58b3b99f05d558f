"""The `kilnproxy` command: argument parsing and dispatch, nothing else.

Every subcommand takes `--config`; bad input is one line on stderr and exit status 2, never a
traceback (SPEC 2 and 8).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from kilnproxy.cli import admin
from kilnproxy.config import Config, format_duration, load, reference, scrub
from kilnproxy.errors import OperatorError, os_reason
from kilnproxy.version import build_info

Action = Callable[[argparse.Namespace, Config], int]
T = TypeVar("T")

# An admin command's whole conversation with the directory, in `[timeouts] dial`s: a database
# that accepts connections and never answers (stopped, or wedged) must not hang an operator.
ADMIN_DIALS = 6
# `serve`'s schema check (one connection, two statements): two dials, and well within
# systemd's TimeoutStartSec (60 s) whatever the dial, or a database that answers nothing would
# have the host killed and started again in a loop, instead of started to wait for it.
SERVE_CHECK_DIALS = 2
SERVE_CHECK_MOST = 30.0


class OneLineParser(argparse.ArgumentParser):
    """Errors on one line. A command's own parser (`intermixed`) takes its options between its
    positionals, as in `keys add OWNER NAME --config PATH -`: argparse's usual parsing has
    given up on an optional positional by the time an option comes before it."""

    def __init__(self, *args: Any, intermixed: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._intermixed = intermixed

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"kilnproxy: error: {message} (see {self.prog} --help)\n")

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        if not self._intermixed or (args is not None and "--" in args):  # `--`: all positional
            return super().parse_known_args(args, namespace)
        self._intermixed = False  # parse_known_intermixed_args calls back here, twice
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixed = True


def _print(lines: Sequence[str]) -> int:
    """Print the result of what was done. Output that cannot be written (standard output
    closed, a full disk) is said on stderr: the change itself stands."""
    if sys.stdout is None:
        print("kilnproxy: standard output is closed; the command's output is lost",
              file=sys.stderr)  # fmt: skip
        return 1
    try:
        for line in lines:
            print(line)
        sys.stdout.flush()
    except BrokenPipeError:  # what reads our output left early (`| head -1`): nothing to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nor at exit's flush
        return 141  # as a shell shows a process that SIGPIPE ended
    except OSError as exc:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nor at exit's flush
        print(f"kilnproxy: cannot write the command's output: {os_reason(exc)}",
              file=sys.stderr)  # fmt: skip
        return 1
    return 0


def _within(seconds: float, config: Config, work: Callable[[], T]) -> T:
    """Run `work`, which talks to the directory with blocking calls, for at most `seconds`.

    libpq has no read timeout of its own, and a server's statement_timeout cannot fire when
    the server is stopped; so the work runs in a daemon thread, and past the deadline the
    command gives up with one line (DirectoryUnreachable) and leaves the thread to the exit.
    """
    from kilnproxy.directory import DirectoryUnreachable

    outcome: list[T] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            outcome.append(work())
        except BaseException as exc:  # carried to the caller's thread, raised there
            failure.append(exc)

    thread = threading.Thread(target=run, name="directory", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        url = config.directory.url
        raise DirectoryUnreachable(
            f"directory {scrub(url, url)} did not answer within {format_duration(seconds)}"
        )
    if failure:
        raise failure[0]
    return outcome[0]


def _directory_action(work: Callable[..., list[str]], *names: str) -> Action:
    """An admin command: open the directory, run `work` with the named arguments, print."""

    def action(args: argparse.Namespace, config: Config) -> int:
        from kilnproxy.directory import directory_for

        def run() -> list[str]:
            directory = directory_for(config)
            try:
                return work(directory, *(getattr(args, n) for n in names))
            finally:
                directory.close()

        return _print(_within(ADMIN_DIALS * config.timeouts.dial, config, run))

    return action


def _serve(args: argparse.Namespace, config: Config) -> int:
    from kilnproxy.cli.backend_admin import ensure_backend_key
    from kilnproxy.directory import DirectoryUnreachable, check_schema
    from kilnproxy.logs import configure
    from kilnproxy.ssh.server import ensure_host_keys, serving_options
    from master.arbiter import HELD_SIGNALS, serve

    # Until the master's handlers are in place (checking the directory alone may take
    # 30 s), a log rotation's USR1, a HUP or a TTIN/TTOU must neither end nor stop it
    # (their default actions): they wait, blocked, and are acted on once it runs.
    signal.pthread_sigmask(signal.SIG_BLOCK, HELD_SIGNALS)
    # Before anything starts: a schema this kilnproxy does not speak is one line, exit 2. A
    # database that is down is no reason not to start: sessions are refused until it is back.
    try:
        _within(
            min(SERVE_CHECK_DIALS * config.timeouts.dial, SERVE_CHECK_MOST),
            config,
            lambda: check_schema(config.directory.url, config.home, config.timeouts.dial),
        )
    except DirectoryUnreachable as exc:
        print(f"kilnproxy: warning: {exc}; starting anyway", file=sys.stderr)
    configure(config.log.format, config.log.level, config.log.file)
    for line in ensure_host_keys(config.ssh.host_keys):
        print(line, file=sys.stderr)

    # What every worker would fail on is said once here, rather than by each worker's boot,
    # and a HUP is refused for it (SPEC 6: a reload that cannot apply changes nothing).
    def vet(config: Config) -> None:
        serving_options(config)

    vet(config)
    _, made = ensure_backend_key(config.backend_ssh.key)
    if made:
        print(f"generated backend key {config.backend_ssh.key}", file=sys.stderr)
    return serve(config, vet)


def _agent(args: argparse.Namespace, config: Config) -> int:
    from kilnproxy.agent.server import run as run_agent
    from kilnproxy.logs import configure

    configure(config.log.format, config.log.level, config.log.file)
    return run_agent(config)


def _pki_init(args: argparse.Namespace, config: Config) -> int:
    from kilnproxy.cli.pki import init_ca

    if not args.dir:  # Path("") is the current directory
        raise OperatorError("DIR must name the CA's directory")
    return _print(init_ca(Path(args.dir), args.name))


def _pki_issue(args: argparse.Namespace, config: Config) -> int:
    from kilnproxy.cli.pki import issue

    return _print(issue(Path(args.ca), args.kind, args.name, Path(args.out), args.days))


def _add_pki_commands(commands: Any, command: Command) -> None:
    pki = commands.add_parser("pki", help="certificates for agent:// backends").add_subparsers(
        dest="sub", required=True
    )
    sub = command(pki, "init", _pki_init, "make a CA (DIR/ca.pem, DIR/ca.key)")
    sub.add_argument("dir", metavar="DIR")
    sub.add_argument(
        "--name", help="the CA's common name (default: kilnproxy CA and a random suffix)"
    )
    sub = command(pki, "issue", _pki_issue, "issue an agent's or a proxy's certificate")
    sub.add_argument("out", metavar="OUT", help="writes OUT.pem and OUT.key")
    sub.add_argument("--ca", required=True, metavar="DIR", help="the CA made by `pki init`")
    sub.add_argument("--kind", required=True, choices=["agent", "proxy"])
    sub.add_argument(
        "--name", required=True, action="append",
        help="the agent's host name or address as backend URLs write it (repeatable), "
        "or the proxy's name",
    )  # fmt: skip
    sub.add_argument("--days", type=int, default=825, help="validity (default 825)")


def _backend_key(args: argparse.Namespace, config: Config) -> int:
    from kilnproxy.cli.backend_admin import show_key

    return _print(show_key(config))


def _backend_trust(args: argparse.Namespace, config: Config) -> int:
    from kilnproxy.cli.backend_admin import trust
    from kilnproxy.directory import directory_for

    def run() -> list[str]:
        directory = directory_for(config)
        try:
            return trust(directory, config, args.name, config.timeouts.dial)
        finally:
            directory.close()

    return _print(_within(ADMIN_DIALS * config.timeouts.dial, config, run))


def _keys_add(args: argparse.Namespace, config: Config) -> int:
    if args.stdin not in (None, "-"):  # a path where - goes: said as such, not as a choice
        raise OperatorError(f"a key file is given with --file {shlex.quote(args.stdin)}, or - "
                            "for standard input")  # fmt: skip
    if (args.source is None) == (args.stdin is None):
        raise OperatorError("give the key once: --file PUBKEY, or - for standard input")
    admin.split_owner(args.owner)  # a mistyped owner is said before any key is read
    args.key = admin.read_public_key(args.source)  # outside the directory's deadline
    return _directory_action(admin.add_key, "owner", "name", "key")(args, config)


def _db_upgrade(args: argparse.Namespace, config: Config) -> int:
    from kilnproxy.directory import upgrade_schema

    def run() -> list[str]:
        return upgrade_schema(config.directory.url, config.home, config.timeouts.dial)

    return _print(_within(ADMIN_DIALS * config.timeouts.dial, config, run))


def _version(args: argparse.Namespace, config: Config) -> int:
    return _print([build_info().version])


def _status_request(command: str) -> Action:
    def action(args: argparse.Namespace, config: Config) -> int:
        from kilnproxy.cli.statusview import render
        from kilnproxy.status_socket import request

        if command == "kill" and not re.fullmatch(r"[0-9a-f]{8}", args.session):
            raise OperatorError(f"{args.session!r} is no session id (8 hex digits, as listed "
                                "by kilnproxy connections)")  # fmt: skip
        reply = request(
            config.status.socket,
            command,
            **({"session": args.session} if command == "kill" else {}),
        )
        if getattr(args, "json", False):
            return _print([json.dumps(reply, indent=2)])
        return _print(render(command, reply))

    return action


def _show_config(args: argparse.Namespace, config: Config) -> int:
    return _print(reference().splitlines())


def _demo(args: argparse.Namespace, config: Config) -> int:
    from kilnproxy.cli.demo import seed

    return _print(seed(config))


Command = Callable[[Any, str, Action, str], OneLineParser]


def _add_directory_commands(commands: Any, command: Command) -> None:
    """The admin commands of SPEC 2."""
    accounts = commands.add_parser("accounts", help="accounts").add_subparsers(
        dest="sub", required=True
    )
    command(
        accounts, "add", _directory_action(admin.add_account, "account"), "add an account"
    ).add_argument("account")

    users = commands.add_parser("users", help="users").add_subparsers(dest="sub", required=True)
    sub = command(
        users, "add", _directory_action(admin.add_user, "account", "user", "role"), "add a user"
    )
    sub.add_argument("account")
    sub.add_argument("user")
    sub.add_argument("--role", choices=["read", "write", "admin"], default="write")

    keys = commands.add_parser("keys", help="public keys").add_subparsers(dest="sub", required=True)
    sub = command(keys, "add", _keys_add, "add a key")
    sub.description = "Add a public key: from a file (--file PUBKEY), or standard input (-)."
    sub.add_argument("owner", metavar="ACCOUNT/USER")
    sub.add_argument("name", metavar="KEY_NAME")
    sub.add_argument(
        "--file", dest="source", metavar="PUBKEY", help="read the public key from a file"
    )
    sub.add_argument(
        "stdin", nargs="?", metavar="-", help="read the public key from standard input"
    )
    sub = command(keys, "list", _directory_action(admin.list_keys, "owner"), "list keys")
    sub.add_argument("owner", nargs="?", metavar="ACCOUNT[/USER]")
    sub = command(
        keys, "remove", _directory_action(admin.remove_key, "fingerprint"), "remove a key"
    )
    sub.add_argument("fingerprint")

    backends = commands.add_parser("backends", help="storage backends").add_subparsers(
        dest="sub", required=True
    )
    sub = command(
        backends, "add", _directory_action(admin.add_backend, "name", "url"), "add a backend"
    )
    sub.add_argument("name")
    sub.add_argument("url")
    command(backends, "list", _directory_action(admin.list_backends), "list backends")
    command(backends, "key", _backend_key, "print the proxy's public key for ssh:// backends")
    sub = command(backends, "trust", _backend_trust, "record an ssh:// backend's host key")
    sub.add_argument("name")

    repos = commands.add_parser("repos", help="repositories").add_subparsers(
        dest="sub", required=True
    )
    sub = command(
        repos,
        "add",
        _directory_action(admin.add_repo, "repo", "vcs", "backend", "path", "init"),
        "add a repository",
    )
    sub.add_argument("repo", metavar="ACCOUNT/NAME")
    sub.add_argument("--vcs", choices=["git", "hg"], required=True)
    sub.add_argument("--backend", required=True)
    sub.add_argument("--path", help="path on the backend (default: BASE/ACCOUNT/NAME[.git])")
    sub.add_argument(
        "--init", action="store_true", help="create an empty repository (local backends)"
    )
    sub = command(
        repos, "list", _directory_action(admin.list_repos, "account"), "list repositories"
    )
    sub.add_argument("account", nargs="?")

    sub = command(
        commands,
        "grant",
        _directory_action(admin.grant, "owner", "repo", "access"),
        "grant access to one repository",
    )
    sub.add_argument("owner", metavar="ACCOUNT/USER")
    sub.add_argument("repo", metavar="ACCOUNT/NAME")
    sub.add_argument("access", choices=["read", "write"])

    db = commands.add_parser("db", help="the directory's database").add_subparsers(
        dest="sub", required=True
    )
    command(db, "upgrade", _db_upgrade, "bring the directory's schema to this version (safe to "
            "run on several hosts at once)")  # fmt: skip


CONFIG_HELP = "config file (default: $KILNPROXY_HOME/kilnproxy.toml)"


def build_parser() -> OneLineParser:
    # `--config` is taken before the command and after it. The command's own copy must not
    # default: argparse would put its None over a path given before the command.
    common = OneLineParser(add_help=False)
    common.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS, help=CONFIG_HELP)
    parser = OneLineParser(prog="kilnproxy", description="SSH front door for git and hg hosting")
    parser.add_argument("--config", metavar="PATH", help=CONFIG_HELP)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(parent: Any, name: str, action: Action, help: str) -> OneLineParser:
        sub: OneLineParser = parent.add_parser(name, parents=[common], help=help, intermixed=True)
        sub.set_defaults(action=action)
        return sub

    command(commands, "serve", _serve, "run the server in the foreground")
    command(commands, "agent", _agent, "run the storage agent ([agent]) in the foreground")
    command(commands, "version", _version, "print the version")
    command(commands, "config", _show_config, "list every setting with its default and help")
    command(commands, "demo", _demo, "seed the demo account and repositories (make run)")
    for name, help in (
        ("status", "workers, sessions, memory"),
        ("connections", "who is connected"),
    ):
        sub = command(commands, name, _status_request(name), help)
        sub.add_argument("--json", action="store_true", help="print the raw JSON reply")
    command(commands, "kill", _status_request("kill"), "end one session").add_argument("session")

    _add_directory_commands(commands, command)
    _add_pki_commands(commands, command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    for arg in sys.argv[1:] if argv is None else argv:
        try:
            arg.encode()
        except UnicodeEncodeError:  # bytes the locale could not decode, kept as surrogates
            shown = repr(os.fsencode(arg))[1:]  # as bytes: 'caf\xe9'
            print(f"kilnproxy: error: argument {shown} is not UTF-8", file=sys.stderr)
            return 2
    args = build_parser().parse_args(argv)
    try:
        config = load(args.config)
        status: int = args.action(args, config)
        return status
    except OperatorError as exc:
        print(f"kilnproxy: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a bug of ours: still one line, the details on request
        if os.environ.get("KILNPROXY_TRACEBACK"):
            raise
        print(f"kilnproxy: internal error: {exc!r} (set KILNPROXY_TRACEBACK=1)", file=sys.stderr)
        return 1
