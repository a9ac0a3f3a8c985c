"""The public import name `fleetd` works beside a project's own `worker.py`; `worker` too."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from tests.fleet import FLEETCTL, FLEETD, TASKS, Fleet


def test_from_fleetd_import_the_public_api() -> None:
    import fleetd
    import worker

    assert fleetd.task is worker.task
    assert fleetd.Client is worker.Client
    assert fleetd.SoftTimeLimitExceeded is worker.SoftTimeLimitExceeded
    assert {"task", "Client", "SoftTimeLimitExceeded", "TaskFailed"} <= set(fleetd.__all__)


def test_a_projects_own_worker_py_does_not_shadow_fleetd(
    make_fleet: Callable[..., Fleet], tmp_path: Path
) -> None:
    folder = tmp_path / "host"
    folder.mkdir()
    (folder / "worker.py").write_text("raise RuntimeError('the project worker.py was imported')\n")
    (folder / "tasks.py").write_text(TASKS.replace("from worker import", "from fleetd import"))
    fleet = make_fleet().start()
    assert fleet.client.submit("tasks.add", 2, 3).get(timeout=10) == 5
    client = subprocess.run(
        [sys.executable, "-c", "from fleetd import Client; print(Client.__module__)"],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert client.returncode == 0, client.stderr
    assert client.stdout.strip() == "worker.client"


def test_both_commands_print_their_version() -> None:
    for command in (FLEETD, FLEETCTL):
        out = subprocess.run([command, "--version"], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0
        assert out.stdout.split()[0] == Path(command).name and out.stdout.split()[1][0].isdigit()
