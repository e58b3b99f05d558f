"""The systemd units: they pass `systemd-analyze verify` and say what SPEC 6 asks of them."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parents[2] / "systemd"


def unit(name: str) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNITS / name)
    return parser


def test_service_is_notify_with_drain_reload_and_hardening() -> None:
    service = unit("kilnproxy.service")["Service"]
    assert service["Type"] == "notify"
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["KillMode"] == "mixed"
    assert service["Restart"] == "on-failure"
    assert service["WatchdogSec"]
    assert int(service["TimeoutStopSec"].removesuffix("min")) > 10  # above the 10m drain
    assert service["NoNewPrivileges"] == "yes"
    assert service["ProtectSystem"] == "strict" and service["StateDirectory"] == "kilnproxy"
    assert service["PrivateTmp"] == "yes" and service["ProtectHome"] == "yes"
    assert service["CapabilityBoundingSet"] == "CAP_NET_BIND_SERVICE"
    assert service["RestrictAddressFamilies"] == "AF_UNIX AF_INET AF_INET6"
    assert service["SystemCallFilter"]


def test_agent_service_drains_and_runs_with_no_capability() -> None:
    service = unit("kilnproxy-agent.service")["Service"]
    assert service["ExecStart"].endswith("kilnproxy agent --config /etc/kilnproxy/agent.toml")
    assert service["KillSignal"] == "SIGTERM" and service["KillMode"] == "mixed"
    assert int(service["TimeoutStopSec"].removesuffix("min")) > 10  # above the 10m drain
    assert service["RestartPreventExitStatus"] == "2"
    assert service["NoNewPrivileges"] == "yes" and service["ProtectSystem"] == "strict"
    assert service["ReadWritePaths"] and service["CapabilityBoundingSet"] == ""


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not here")
def test_units_verify(tmp_path: Path) -> None:
    kilnproxy = Path(sys.executable).with_name("kilnproxy")
    assert kilnproxy.exists()
    for name in ("kilnproxy.service", "kilnproxy.socket", "kilnproxy-agent.service"):
        text = (UNITS / name).read_text()
        # Verified as installed: the ExecStart binary must exist, so point it at ours.
        (tmp_path / name).write_text(
            text.replace("/opt/kilnproxy/.venv/bin/kilnproxy", str(kilnproxy))
        )
    done = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", "kilnproxy.socket", "kilnproxy.service",
         "kilnproxy-agent.service"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "", done.stderr
