"""What each backend runs for each verb: the argv of a local process, the command of an ssh one."""

from __future__ import annotations

from pathlib import Path

import pytest

from kilnproxy.backends.base import BACKEND_VARIABLES, BackendRequest
from kilnproxy.backends.local import READ_ONLY_HOOK, command_argv, command_env, write_hook_rc
from kilnproxy.backends.ssh import remote_command
from kilnproxy.directory.model import Identity, Route
from kilnproxy.policy.access import Access, Role
from kilnproxy.policy.commands import Vcs, Verb


def _request(verb: Verb, path: str, git_protocol: str | None = None) -> BackendRequest:
    route = Route("aviato/website", verb.vcs, "local", "local:///srv", path, Access.READ)
    identity = Identity("aviato", "richard", Role.WRITE, "laptop", "SHA256:x")
    return BackendRequest("3f9c2a1b", verb, route, identity, git_protocol)


@pytest.mark.parametrize(
    ("verb", "argv", "command"),
    [
        (Verb.UPLOAD_PACK, ["git", "upload-pack"], "git-upload-pack"),
        (Verb.RECEIVE_PACK, ["git", "receive-pack"], "git-receive-pack"),
        (Verb.UPLOAD_ARCHIVE, ["git", "upload-archive"], "git-upload-archive"),
        (Verb.HG_SERVE, ["hg", "-R"], "hg -R"),
    ],
)
def test_each_verb_runs_its_command(verb: Verb, argv: list[str], command: str) -> None:
    path = "/srv/aviato/web site"
    tail = ["serve", "--stdio"] if verb.vcs is Vcs.HG else []
    assert command_argv(verb, path) == [*argv, path, *tail]
    run = " ".join([command, f"'{path}'", *tail])
    # The storage's shell looks for the repository first, and says nothing if it is not there.
    assert remote_command(_request(verb, path)) == f"test -d '{path}' || exit 66; exec {run}"


def test_the_environment_names_the_session_and_only_hg_gets_the_hook(tmp_path: Path) -> None:
    hook = tmp_path / "hg-read-only.rc"
    request = _request(Verb.UPLOAD_PACK, "/srv/a.git", "version=2")
    git = command_env(request.verb, request.environment(), hook)
    assert (git["KILNPROXY_SESSION"], git["KILNPROXY_ACCESS"]) == ("3f9c2a1b", "read")
    assert (git["KILNPROXY_REPO"], git["GIT_PROTOCOL"]) == ("aviato/website", "version=2")
    assert str(hook) not in git.get("HGRCPATH", "")
    hg = command_env(Verb.HG_SERVE, _request(Verb.HG_SERVE, "/srv/a").environment(), hook)
    assert "GIT_PROTOCOL" not in hg


def test_hg_reads_the_hook_and_for_a_reader_streams_a_push(tmp_path: Path) -> None:
    """A writer's hg spools a push, then takes the lock; a reader's takes it as it comes, so
    that the hook refuses it at its first part, before the bundle is on disk."""
    hook = write_hook_rc(tmp_path / "state")
    writing = dict(_request(Verb.HG_SERVE, "/srv/a").environment(), KILNPROXY_ACCESS="write")
    reading = dict(writing, KILNPROXY_ACCESS="read")
    files = {}
    for access, variables in (("write", writing), ("read", reading)):
        rc = Path(command_env(Verb.HG_SERVE, variables, hook)["HGRCPATH"].split(":")[-1])
        files[access] = rc.read_text()
    assert files["write"] == READ_ONLY_HOOK and "streamunbundle" not in files["write"]
    assert files["read"] == READ_ONLY_HOOK + "[server]\nstreamunbundle = True\n"


def test_the_agent_passes_on_exactly_the_variables_a_request_has() -> None:
    """The agent refuses any variable not in BACKEND_VARIABLES: one added to environment()
    alone would have every agent session refused."""
    assert set(_request(Verb.UPLOAD_PACK, "/srv/a.git", "version=2").environment()) == (
        BACKEND_VARIABLES
    )
