from __future__ import annotations

import pytest

from kilnproxy.errors import BadCommand
from kilnproxy.policy.commands import Command, Vcs, Verb, git_protocol, parse_command, repo_name


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("git-upload-pack 'aviato/website.git'", Command(Verb.UPLOAD_PACK, "aviato/website")),
        ("git-upload-pack '/aviato/website.git/'", Command(Verb.UPLOAD_PACK, "aviato/website")),
        ("git-receive-pack '~/aviato/website'", Command(Verb.RECEIVE_PACK, "aviato/website")),
        ("git-upload-archive aviato/website", Command(Verb.UPLOAD_ARCHIVE, "aviato/website")),
        ("git upload-pack 'aviato/web/site.git'", Command(Verb.UPLOAD_PACK, "aviato/web/site")),
        ("git receive-pack 'aviato/website'", Command(Verb.RECEIVE_PACK, "aviato/website")),
        ("hg -R aviato/designs serve --stdio", Command(Verb.HG_SERVE, "aviato/designs")),
        ("hg -R /aviato/designs.git serve --stdio", Command(Verb.HG_SERVE, "aviato/designs.git")),
        ("git-upload-pack 'a/b.c_d-e'", Command(Verb.UPLOAD_PACK, "a/b.c_d-e")),
    ],
)
def test_accepted(line: str, expected: Command) -> None:
    assert parse_command(line) == expected


@pytest.mark.parametrize(
    "line",
    [
        "",
        "ls; rm -rf /",
        "git-upload-pack",
        "git-upload-pack a/b c",
        "git-upload-pack '../x'",
        "git-upload-pack 'a/../../b'",
        "git-upload-pack 'a/b..c'",
        "git-upload-pack '-x'",
        "git-upload-pack 'a/-x'",
        "git-upload-pack 'a//b'",
        "git-upload-pack 'a/.hidden'",
        "git-upload-pack 'single'",
        "git-upload-pack 'a/b\x00c'",
        "git-upload-pack 'a/b c'",
        "git-upload-pack 'a/é'",
        "git upload-archive",
        "git daemon a/b",
        "git-upload-pack 'unbalanced",
        "hg -R a/b serve --stdio --debugger",
        "hg -R a/b serve",
        "hg --config x=y -R a/b serve --stdio",
        "hg -R --config=x serve --stdio",
        "scp -t a/b",
        "git-upload-pack " + "a/" + "b" * 300,
        "x" * 5000,
    ],
)
def test_refused(line: str) -> None:
    with pytest.raises(BadCommand):
        parse_command(line)


def test_only_one_git_suffix_and_slash_are_stripped() -> None:
    assert repo_name("/a/b.git.git", Vcs.GIT) == "a/b.git"
    assert repo_name("a/b.git", Vcs.HG) == "a/b.git"
    with pytest.raises(BadCommand):
        repo_name("//a/b", Vcs.GIT)


def test_path_limit_is_255_bytes() -> None:
    name = "a/" + "b" * 253
    assert repo_name(name, Vcs.GIT) == name
    with pytest.raises(BadCommand):
        repo_name(name + "b", Vcs.GIT)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("version=2", "version=2"), (b"version=2:foo", "version=2:foo"), (None, None),
     ("version=2; rm", None), ("", None), ("x" * 300, None)],
)  # fmt: skip
def test_git_protocol(value: str | bytes | None, expected: str | None) -> None:
    assert git_protocol(value) == expected
