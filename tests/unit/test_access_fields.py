"""The access line of SPEC 4, from a relay's final record: one pure function, one field order."""

from __future__ import annotations

from dataclasses import replace

from kilnproxy.directory import Identity
from kilnproxy.logs import render_fields
from kilnproxy.policy.access import Role
from kilnproxy.policy.commands import Command, Verb
from kilnproxy.ssh.relay import Outcome, RelayStats
from kilnproxy.ssh.session import access_fields

BOB = Identity("aviato", "bob", Role.WRITE, "laptop", "SHA256:bobkey")
ORDER = [
    "remote", "login", "account", "user", "key_name", "key", "repo", "verb", "backend", "exit",
    "outcome", "bytes_in", "bytes_out", "duration",
]  # fmt: skip


RAN = RelayStats(
    command=Command(Verb.UPLOAD_PACK, "aviato/website"),
    shell=False,
    vcs="git",
    backend="local",
    exit_status=0,
    outcome=Outcome.OK,
    bytes_in=120,
    bytes_out=34567,
    started_at=1000.0,
)


def fields(
    outcome: Outcome, command: RelayStats | None, identity: Identity | None = BOB
) -> dict[str, object]:
    out = access_fields(
        remote="127.0.0.1:50022",
        login="git",
        identity=identity,
        outcome=outcome,
        command=command,
        connected_at=990.0,
        now=1002.5,
    )
    assert list(out) == ORDER
    return out


def line(outcome: Outcome, command: RelayStats | None, identity: Identity | None = BOB) -> str:
    return render_fields(fields(outcome, command, identity))


def test_a_command_that_ran() -> None:
    assert line(Outcome.OK, RAN) == (
        "remote=127.0.0.1:50022 login=git account=aviato user=bob key_name=laptop"
        " key=SHA256:bobkey repo=aviato/website verb=git-upload-pack backend=local exit=0"
        " outcome=ok bytes_in=120 bytes_out=34567 duration=2.500s"
    )


def test_a_shell_request() -> None:
    shell = replace(RAN, command=None, shell=True, vcs=None, backend=None, exit_status=1)
    assert " repo=- verb=shell backend=- exit=1 outcome=denied " in line(Outcome.DENIED, shell)


def test_a_connection_that_ran_no_command_times_from_its_connect() -> None:
    text = line(Outcome.AUTH_FAILED, None, identity=None)
    assert text == (
        "remote=127.0.0.1:50022 login=git account=- user=- key_name=- key=- repo=- verb=-"
        " backend=- exit=- outcome=auth-failed bytes_in=0 bytes_out=0 duration=12.500s"
    )


def test_json_keeps_a_refused_commands_backend_apart_from_no_command() -> None:
    refused = replace(RAN, backend=None, exit_status=1, outcome=Outcome.DENIED)
    assert fields(Outcome.DENIED, refused)["backend"] == ""
    assert fields(Outcome.NO_COMMAND, None)["backend"] is None
