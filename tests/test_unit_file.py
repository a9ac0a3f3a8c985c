"""config/fleetd.service: the directives the arbiter relies on, and systemd accepts the file."""

from __future__ import annotations

import pwd
import shutil
import subprocess
from pathlib import Path

UNIT = Path(__file__).resolve().parent.parent / "config" / "fleetd.service"


def directives(text: str) -> dict[tuple[str, str], list[str]]:
    """(section, key) -> values, skipping comments, as systemd reads a unit file."""
    found: dict[tuple[str, str], list[str]] = {}
    section = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        found.setdefault((section, key), []).append(value)
    return found


def test_unit_declares_what_the_arbiter_relies_on() -> None:
    found = directives(UNIT.read_text())
    expected = {
        ("Service", "Type"): "notify",
        ("Service", "NotifyAccess"): "main",
        ("Service", "ExecStart"): "/usr/bin/fleetd start -c /etc/fleetd/config.toml",
        ("Service", "ExecReload"): "/bin/kill -HUP $MAINPID",
        ("Service", "KillMode"): "mixed",
        ("Service", "Restart"): "on-failure",
        ("Service", "LimitNICE"): "20",
        ("Service", "LimitNOFILE"): "65536",  # a pool of 1024 children holds 3072 in its worker
        ("Service", "RuntimeDirectory"): "fleetd",
        ("Service", "RuntimeDirectoryMode"): "0700",
        ("Service", "StateDirectory"): "fleetd",
        ("Service", "StateDirectoryMode"): "0700",
        ("Service", "User"): "fleetd",
        ("Service", "Group"): "fleetd",
        ("Install", "WantedBy"): "multi-user.target",
    }
    assert {key: found.get(key) for key in expected} == {k: [v] for k, v in expected.items()}
    [timeout] = found[("Service", "TimeoutStopSec")]
    assert int(timeout) >= 60


def test_stop_timeout_explains_why_it_must_outlast_the_longest_task() -> None:
    lines = UNIT.read_text().splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("TimeoutStopSec="))
    comment = []
    for line in reversed(lines[:at]):
        if not line.startswith("#"):
            break
        comment.append(line)
    assert "time_limit" in " ".join(comment) and "shutdown_timeout" in " ".join(comment)


def test_watchdog_is_offered_but_commented_out() -> None:
    assert "#WatchdogSec=" in UNIT.read_text()
    assert ("Service", "WatchdogSec") not in directives(UNIT.read_text())


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    systemd_analyze = shutil.which("systemd-analyze")
    true, kill = shutil.which("true"), shutil.which("kill")
    assert systemd_analyze and true and kill, "needs systemd-analyze, true and kill on PATH"
    text = UNIT.read_text()
    text = text.replace("ExecStart=/usr/bin/fleetd ", f"ExecStart={true} ")
    text = text.replace("ExecReload=/bin/kill ", f"ExecReload={kill} ")
    try:
        pwd.getpwnam("fleetd")
    except KeyError:
        text = text.replace("User=fleetd", "User=root").replace("Group=fleetd", "Group=root")
    copy = tmp_path / "fleetd.service"
    copy.write_text(text)
    result = subprocess.run(
        [systemd_analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60
    )
    complaints = [line for line in (result.stdout + result.stderr).splitlines() if "fleetd" in line]
    assert result.returncode == 0 and not complaints, result.stdout + result.stderr
