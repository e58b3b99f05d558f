"""The `kilnproxy` command: argument parsing and dispatch, nothing else.

Every subcommand takes `--config`; bad input is one line on stderr and exit status 2, never a
traceback (SPEC 2 and 8).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from kilnproxy.cli import admin
from kilnproxy.config import Config, load, reference
from kilnproxy.errors import OperatorError
from kilnproxy.version import build_info

Action = Callable[[argparse.Namespace, Config], int]


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"kilnproxy: error: {message} (see {self.prog} --help)\n")


def _print(lines: Sequence[str]) -> int:
    for line in lines:
        print(line)
    return 0


def _directory_action(work: Callable[..., list[str]], *names: str) -> Action:
    """An admin command: open the directory, run `work` with the named arguments, print."""

    def action(args: argparse.Namespace, config: Config) -> int:
        from kilnproxy.directory import directory_for

        directory = directory_for(config)
        try:
            return _print(work(directory, *(getattr(args, n) for n in names)))
        finally:
            directory.close()

    return action


def _serve(args: argparse.Namespace, config: Config) -> int:
    from kilnproxy.cli.backend_admin import ensure_backend_key
    from kilnproxy.directory import DirectoryUnreachable, check_schema
    from kilnproxy.logs import configure
    from kilnproxy.ssh.server import ensure_host_keys
    from master.arbiter import serve

    # Before anything starts: a schema this kilnproxy does not speak is one line, exit 2. A
    # database that is down is no reason not to start: sessions are refused until it is back.
    try:
        check_schema(config.directory.url, config.home, config.timeouts.dial)
    except DirectoryUnreachable as exc:
        print(f"kilnproxy: warning: {exc}; starting anyway", file=sys.stderr)
    configure(config.log.format, config.log.level, config.log.file)
    for line in ensure_host_keys(config.ssh.host_keys):
        print(line, file=sys.stderr)
    _, made = ensure_backend_key(config.backend_ssh.key)
    if made:
        print(f"generated backend key {config.backend_ssh.key}", file=sys.stderr)
    return serve(config, args.config)


def _backend_key(args: argparse.Namespace, config: Config) -> int:
    from kilnproxy.cli.backend_admin import show_key

    return _print(show_key(config))


def _backend_trust(args: argparse.Namespace, config: Config) -> int:
    from kilnproxy.cli.backend_admin import trust
    from kilnproxy.directory import directory_for

    directory = directory_for(config)
    try:
        return _print(trust(directory, config, args.name, config.timeouts.dial))
    finally:
        directory.close()


def _db_upgrade(args: argparse.Namespace, config: Config) -> int:
    from kilnproxy.directory import upgrade_schema

    return _print(upgrade_schema(config.directory.url, config.home, config.timeouts.dial))


def _version(args: argparse.Namespace, config: Config) -> int:
    return _print([build_info().version])


def _status_request(command: str) -> Action:
    def action(args: argparse.Namespace, config: Config) -> int:
        from kilnproxy.cli.statusview import render
        from kilnproxy.status_socket import request

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
    sub = command(
        keys, "add", _directory_action(admin.add_key, "owner", "name", "source"), "add a key"
    )
    sub.add_argument("owner", metavar="ACCOUNT/USER")
    sub.add_argument("name", metavar="KEY_NAME")
    source = sub.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--file", dest="source", metavar="PUBKEY", help="read the public key from a file"
    )
    source.add_argument(
        "stdin", nargs="?", choices=["-"], help="read the public key from standard input"
    )
    sub.set_defaults(source=None)
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


def build_parser() -> OneLineParser:
    common = OneLineParser(add_help=False)
    common.add_argument(
        "--config", metavar="PATH", help="config file (default: $KILNPROXY_HOME/kilnproxy.toml)"
    )
    parser = OneLineParser(
        prog="kilnproxy", parents=[common], description="SSH front door for git and hg hosting"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(parent: Any, name: str, action: Action, help: str) -> OneLineParser:
        sub: OneLineParser = parent.add_parser(name, parents=[common], help=help)
        sub.set_defaults(action=action)
        return sub

    command(commands, "serve", _serve, "run the server in the foreground")
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
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
