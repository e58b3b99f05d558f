"""Build hook: stamps the full version (SPEC 9) into kilnproxy/_stamp.py.

The version is MAJOR.MINOR.COMMITS.SHA.BUILDDATE. It is computed here, once, when the package is
built or installed (editable installs included), and never looked up at run time.
"""

from __future__ import annotations

import os
import subprocess
from datetime import UTC, datetime
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def _git(*args: str) -> str:
    try:
        out = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip()


def _stamp_source(major_minor: str) -> str:
    count = os.environ.get("KILNPROXY_BUILD_COMMITS") or _git("rev-list", "--count", "HEAD") or "0"
    sha = os.environ.get("KILNPROXY_BUILD_SHA") or _git("rev-parse", "--short=7", "HEAD")
    sha = sha or "0000000"
    built = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    version = f"{major_minor}.{count}.{sha}.{built}"
    return (
        '"""Written by setup.py at build time; do not edit."""\n\n'
        f"VERSION = {version!r}\n"
        f"COMMIT = {sha!r}\n"
        f"COMMIT_COUNT = {int(count)}\n"
        f"BUILD_DATE = {built!r}\n"
    )


class StampedBuildPy(build_py):
    def run(self) -> None:
        super().run()
        source = _stamp_source(self.distribution.get_version())
        targets = [ROOT / "kilnproxy" / "_stamp.py"] if self.editable_mode else []
        targets.append(Path(self.build_lib) / "kilnproxy" / "_stamp.py")
        for target in targets:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(source)


setup(cmdclass={"build_py": StampedBuildPy})
