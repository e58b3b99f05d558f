"""Which paths the storage agent serves (agent.paths.confine): only what lies under its base,
symlinks resolved. And the agent:// backend URL."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import pytest

from kilnproxy.agent.paths import Refused, confine
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


def test_agent_urls() -> None:
    assert parse_backend_url("agent://repo1.internal:9422/srv/repos") == BackendUrl(
        "agent", PurePosixPath("/srv/repos"), "", "repo1.internal", 9422
    )
    for bad in ("agent://repo1.internal/srv", "agent://u@h:1/srv", "agent://h:1", "agent://h:x/s"):
        with pytest.raises(OperatorError, match="agent"):
            parse_backend_url(bad)
