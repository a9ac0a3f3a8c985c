"""worker_timeout: a worker silent that long (stopped, deadlocked, stuck in a call) is killed
and replaced, and its tasks run on the replacement at once; a boot that long is killed too."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from supervisor import config as configmod
from supervisor.arbiter import may_leave_idle_priority
from tests.fleet import TASKS, Fleet, wait_for
from tests.test_control import ctl_json

TIMEOUT = 3  # seconds of silence the tests' workers are allowed
# Well below the lease (30 s): tasks back within this were given back by the replacement, not
# left to expire.
GIVEN_BACK_WITHIN = 10.0


def worker_pid(fleet: Fleet) -> int:
    _, data = ctl_json(fleet, "status")
    return int(data["replies"]["w@h1"]["pid"] or 0)


def reserved_ids(fleet: Fleet) -> list[str]:
    _, data = ctl_json(fleet, "inspect", "reserved")
    return [task["id"] for task in data["replies"]["w@h1"]]


def test_a_stopped_worker_is_killed_and_replaced_and_its_tasks_run_on_the_replacement(
    make_fleet: Callable[..., Fleet], tmp_path: Path
) -> None:
    fleet = make_fleet(defaults={"concurrency": 1, "worker_timeout": TIMEOUT}).start()
    gate, marker = tmp_path / "gate", tmp_path / "started"
    held = fleet.client.submit("tasks.hold", str(gate), str(marker))
    wait_for(marker.exists, 10, message="the task to start")
    reserved = fleet.client.submit("tasks.add", 2, 3)
    wait_for(lambda: reserved_ids(fleet) == [reserved.id], 10, message="the task reserved")
    stopped = worker_pid(fleet)
    os.kill(stopped, signal.SIGSTOP)
    stopped_at = time.monotonic()
    replacement = wait_for(
        lambda: (pid := worker_pid(fleet)) != stopped and pid, 3 * TIMEOUT, 0.1, "a new worker"
    )
    gate.touch()
    assert reserved.get(timeout=GIVEN_BACK_WITHIN) == 5
    assert held.get(timeout=GIVEN_BACK_WITHIN) in fleet.child_pids(replacement)
    assert time.monotonic() - stopped_at < TIMEOUT + GIVEN_BACK_WITHIN
    [line] = [
        entry for entry in fleet.log().splitlines() if "worker_timeout (3s): killing it" in entry
    ]
    silent = float(re.search(r"silent for ([\d.]+)s", line).group(1))  # type: ignore[union-attr]
    assert TIMEOUT <= silent < TIMEOUT + 2 and "node=w@h1" in line


def test_a_worker_whose_boot_hangs_is_killed_at_worker_timeout(
    make_fleet: Callable[..., Fleet],
) -> None:
    fleet = make_fleet(defaults={"worker_timeout": TIMEOUT})
    hang = fleet.folder / "hang-at-import"
    tasks = textwrap.dedent(TASKS) + textwrap.dedent(f"""
        if os.path.exists({str(hang)!r}):
            time.sleep(60)
    """)
    (fleet.folder / "tasks.py").write_text(tasks)
    fleet.start()
    hang.touch()
    killed = worker_pid(fleet)
    os.kill(killed, signal.SIGKILL)
    hung = wait_for(
        lambda: (pid := worker_pid(fleet)) not in (0, killed) and pid, 10, 0.05, "a new worker"
    )
    born = psutil.Process(hung).create_time()
    wait_for(lambda: hung not in fleet.worker_pids(), 3 * TIMEOUT, 0.05, "the hung boot killed")
    assert TIMEOUT <= time.time() - born <= TIMEOUT + 2
    assert f"did not boot within worker_timeout ({TIMEOUT}s)" in fleet.log()
    hang.unlink()
    fleet.wait_ready(timeout=3 * TIMEOUT)


def test_a_boot_starved_of_cpu_at_idle_priority_is_slow_not_hung(
    make_fleet: Callable[..., Fleet],
) -> None:
    if not may_leave_idle_priority():
        pytest.skip("without CAP_SYS_NICE or RLIMIT_NICE a reload does not boot at idle priority")
    fleet = make_fleet(defaults={"worker_timeout": TIMEOUT})
    heavy = fleet.folder / "heavy-import"
    tasks = textwrap.dedent(TASKS) + textwrap.dedent(f"""
        if os.path.exists({str(heavy)!r}):  # an import that needs a second of CPU
            _end = time.process_time() + 1.0
            while time.process_time() < _end:
                pass
    """)
    (fleet.folder / "tasks.py").write_text(tasks)
    fleet.start()
    heavy.touch()
    spin = (
        f"import time\nend = time.monotonic() + {2 * TIMEOUT}\nwhile time.monotonic() < end: pass"
    )
    hogs = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(os.cpu_count() or 1)]
    try:
        reloaded = time.monotonic()
        fleet.signal(signal.SIGHUP)
        wait_for(lambda: "reload complete: generation 1" in fleet.log(), 60, 0.1, "the reload")
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    assert time.monotonic() - reloaded > TIMEOUT  # else the CPUs were not busy: nothing tested
    assert "did not boot within" not in fleet.log()


@pytest.mark.parametrize("value", [1, -1, "60", float("nan"), float("inf")])
def test_worker_timeout_is_0_or_at_least_2_seconds(tmp_path: Path, value: object) -> None:
    raw = {"defaults": {"worker_timeout": value}, "worker": [{"name": "w"}]}
    with pytest.raises(configmod.ConfigError, match="defaults.worker_timeout: must be 0"):
        configmod.from_dict(raw, str(tmp_path / "fleet.toml"), check_imports=False)


def test_worker_timeout_defaults_to_60_and_each_worker_may_set_its_own(tmp_path: Path) -> None:
    raw = {
        "defaults": {"worker_timeout": 0},
        "worker": [{"name": "a"}, {"name": "b", "worker_timeout": 5}],
    }
    a, b = configmod.from_dict(raw, str(tmp_path / "fleet.toml"), check_imports=False).workers
    assert (a.worker_timeout, b.worker_timeout) == (0, 5)
    default = configmod.from_dict(
        {"worker": [{"name": "c"}]}, str(tmp_path / "f.toml"), check_imports=False
    )
    assert default.workers[0].worker_timeout == 60
