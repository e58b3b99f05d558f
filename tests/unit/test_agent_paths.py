"""Which paths the storage agent serves (agent.paths.confine): only what lies under its base,
symlinks resolved. And the agent:// backend URL."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import pytest

from kilnproxy.agent.paths import Refused, confine, served
from kilnproxy.directory.model import BackendUrl, parse_backend_url
from kilnproxy.errors import OperatorError


def test_paths_under_the_base_only(tmp_path: Path) -> None:
    base = tmp_path / "srv"
    (base / "aviato").mkdir(parents=True)
    (tmp_path / "outside.git").mkdir()
    (base / "aviato" / "escape.git").symlink_to(tmp_path / "outside.git")
    (base / "aviato" / "alias.git").symlink_to(base / "aviato")
    (base / "aviato" / "loop.git").symlink_to(base / "aviato" / "loop.git")
    assert confine(base, f"{base}/aviato/site.git") == base / "aviato" / "site.git"
    assert confine(base, f"{base}/aviato/alias.git") == base / "aviato"  # inside, by any name
    for path, error in [
        (f"{base}/../outside.git", "outside the agent's base"),
        (f"{base}/aviato/escape.git", "outside the agent's base"),
        (str(base), "outside the agent's base"),
        ("aviato/site.git", "not absolute"),
        ("/etc", "outside the agent's base"),
        (f"{base}/aviato/loop.git", "cannot be resolved"),  # not an error of another kind
        (f"{base}/aviato/site\0.git", "cannot be resolved"),
    ]:
        with pytest.raises(Refused, match=error):
            confine(base, path)


def test_a_path_served_is_a_directory_there(tmp_path: Path) -> None:
    """What the agent runs a command on is checked in the same thread as its confinement: the
    spawn itself no longer reads the repository's disk."""
    base = tmp_path / "srv"
    (base / "aviato" / "site.git").mkdir(parents=True)
    (base / "aviato" / "notes.txt").write_text("not a repository")
    assert served(base, f"{base}/aviato/site.git") == base / "aviato" / "site.git"
    for name in ("gone.git", "notes.txt"):
        with pytest.raises(Refused, match=f"repository path {base}/aviato/{name} does not exist"):
            served(base, f"{base}/aviato/{name}")
    with pytest.raises(Refused, match="outside the agent's base"):
        served(base, str(tmp_path))


def test_where_git_or_hg_would_look_instead_lies_under_the_base_too(tmp_path: Path) -> None:
    """git opens PATH/.git before PATH (and PATH.git when PATH is no repository), hg PATH/.hg:
    a symlink there must not lead out either, nor a gitfile or an hg sharedpath."""
    base, outside = tmp_path / "srv", tmp_path / "outside.git"
    outside.mkdir()
    (base / "aviato" / "site.git").mkdir(parents=True)
    (base / "aviato" / "work").mkdir()
    (base / "aviato" / "work" / ".git").mkdir()  # a repository's own .git: served
    assert confine(base, f"{base}/aviato/work") == base / "aviato" / "work"
    (base / "aviato" / "site.git" / ".git").symlink_to(outside)
    (base / "aviato" / "docs").mkdir()
    (base / "aviato" / "docs" / ".hg").symlink_to(outside)
    (base / "aviato" / "api").mkdir()
    (base / "aviato" / "api.git").symlink_to(outside)
    (base / "aviato" / "loop").mkdir()
    (base / "aviato" / "loop" / ".git").symlink_to(base / "aviato" / "loop" / ".git")
    (base / "aviato" / "file").mkdir()  # a gitfile
    (base / "aviato" / "file" / ".git").write_text(f"gitdir: {outside}\n")
    (base / "aviato" / "relative").mkdir()
    (base / "aviato" / "relative" / ".git").write_text("gitdir: ../../../outside.git\n")
    (base / "aviato" / "shared" / ".hg").mkdir(parents=True)
    (base / "aviato" / "shared" / ".hg" / "sharedpath").write_text(f"{outside}/.hg")
    (base / "aviato" / "inner").mkdir()
    (base / "aviato" / "inner" / ".git").write_text("gitdir: ../site.git\n")  # stays inside
    assert confine(base, f"{base}/aviato/inner") == base / "aviato" / "inner"
    for name, error in [
        ("site.git", "site.git/.git leads outside"),
        ("docs", "docs/.hg leads outside"),
        ("api", "api.git leads outside"),
        ("loop", "loop/.git cannot be resolved"),
        ("file", "file/.git leads outside"),
        ("relative", "relative/.git leads outside"),
        ("shared", "shared/.hg leads outside"),
    ]:
        with pytest.raises(Refused, match=error):
            confine(base, f"{base}/aviato/{name}")


def test_agent_urls() -> None:
    assert parse_backend_url("agent://repo1.internal:9422/srv/repos") == BackendUrl(
        "agent", PurePosixPath("/srv/repos"), "", "repo1.internal", 9422
    )
    for bad in ("agent://repo1.internal/srv", "agent://u@h:1/srv", "agent://h:1", "agent://h:x/s"):
        with pytest.raises(OperatorError, match="agent"):
            parse_backend_url(bad)
