"""Hostile input to the command grammar and the access rules (issue 12, item 2), with Hypothesis.

Whatever a client sends as its exec request, `parse_command` returns a `Command` or raises
`BadCommand`, nothing else; and a `Command` it returns names a repository that can never leave
the directory's tree. An exec request reaches us as strict UTF-8 (asyncssh refuses the rest), an
admin's argument as UTF-8 with surrogate escapes: both are generated here.
"""

from __future__ import annotations

import re
import shlex

from hypothesis import example, given, settings
from hypothesis import strategies as st

from kilnproxy.errors import BadCommand
from kilnproxy.policy.access import Access, Role, effective_access, required_access
from kilnproxy.policy.commands import (
    MAX_PATH_BYTES,
    Command,
    Vcs,
    Verb,
    git_protocol,
    parse_command,
    repo_name,
)

SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
PREFIXES = ["git-upload-pack ", "git-receive-pack ", "git-upload-archive ", "git upload-pack ",
            "hg -R ", ""]  # fmt: skip
# What a client may put in a path: mostly what a shell or a path cares about.
SPECIAL = "/.~-'\"\\ \t\n\x00$`;|&*?[]{}()<>#%:=@!,é\u202e\ufeff"
NASTY = st.sampled_from([*SPECIAL, "..", ".git"])
PATHS = st.lists(st.one_of(NASTY, st.text(max_size=6)), max_size=24).map("".join)
# Any bytes an admin could type: argv is decoded with surrogate escapes.
ARGV = st.binary(max_size=300).map(lambda raw: raw.decode("utf-8", "surrogateescape"))


def assert_safe(command: Command) -> None:
    """A repository name the directory can join under its root, and nothing else."""
    segments = command.repo.split("/")
    assert len(segments) >= 2
    assert all(SEGMENT.fullmatch(s) and ".." not in s for s in segments), command
    assert len(command.repo.encode()) <= MAX_PATH_BYTES


def parse(line: str) -> Command | None:
    try:
        command = parse_command(line)
    except BadCommand as error:
        assert error.message  # one line for the client, never empty
        return None
    assert_safe(command)
    return command


@settings(max_examples=600, deadline=None)
@given(st.text(max_size=5000))
@example("git-upload-pack '" + "a/" * 2100 + "'")
@example("hg -R 'a/b' serve --stdio")
def test_any_text_is_a_command_or_a_bad_command(line: str) -> None:
    parse(line)


@settings(max_examples=800, deadline=None)
@given(st.sampled_from(PREFIXES), PATHS, st.sampled_from(["", " serve --stdio", " x", "'"]))
@example("git-upload-pack ", "'~/../../etc/passwd'", "")
@example("hg -R ", "a/b\\ c", " serve --stdio")
def test_fuzzed_paths_never_escape(prefix: str, path: str, suffix: str) -> None:
    for quoted in (path, shlex.quote(path)):
        command = parse(prefix + quoted + suffix)
        if command is not None:
            assert command.verb.vcs is (Vcs.HG if prefix == "hg -R " else Vcs.GIT)


@settings(max_examples=400, deadline=None)
@given(st.one_of(PATHS, ARGV), st.sampled_from(Vcs))
def test_repo_name_of_anything(path: str, vcs: Vcs) -> None:
    try:
        name = repo_name(path, vcs)
    except BadCommand:
        return
    assert_safe(Command(Verb.UPLOAD_PACK, name))
    assert repo_name(name, Vcs.HG) == name  # a normal name is its own normal form


@settings(max_examples=300, deadline=None)
@given(st.lists(st.from_regex(SEGMENT, fullmatch=True).filter(lambda s: ".." not in s),
                min_size=2, max_size=5))  # fmt: skip
def test_every_valid_name_round_trips(segments: list[str]) -> None:
    name = "/".join(segments)
    if len(name.encode()) > MAX_PATH_BYTES or name.endswith(".git"):
        return
    assert parse_command(f"git-upload-pack {shlex.quote('/' + name)}") == Command(
        Verb.UPLOAD_PACK, name
    )
    assert parse_command(f"hg -R {shlex.quote(name)} serve --stdio") == Command(Verb.HG_SERVE, name)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.none(), st.text(max_size=300), st.binary(max_size=300)))
def test_git_protocol_passes_on_only_plausible_values(value: str | bytes | None) -> None:
    passed = git_protocol(value)
    if passed is not None:
        assert re.fullmatch(r"[A-Za-z0-9=:._-]{1,256}", passed)


@given(st.text(max_size=20), st.sampled_from(Role), st.text(max_size=20),
       st.one_of(st.none(), st.sampled_from(Access)), st.sampled_from(Verb))  # fmt: skip
def test_access_is_never_more_than_role_or_grant(
    user_account: str, role: Role, repo_account: str, grant: Access | None, verb: Verb
) -> None:
    access = effective_access(user_account, role, repo_account, grant)
    assert isinstance(access, Access)
    if user_account != repo_account:
        assert access == (grant or Access.NONE)  # another account's repository: the grant only
    else:
        assert access >= (Access.WRITE if role is not Role.READ else Access.READ)
    assert required_access(verb) in (Access.READ, Access.WRITE)
