"""The worker state machine: its transitions and restart policy as units, then end to end a
worker that dies at every start (FATAL, the fleet serves on) and `fleetctl start`."""

from __future__ import annotations

import ast
import contextlib
import logging
import os
import signal
import subprocess
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from supervisor import arbiter as arbitermod
from supervisor import config as configmod
from supervisor import report, states
from supervisor.states import BACKOFF, FATAL, RUNNING, STARTING, STOPPED, STOPPING, State
from supervisor.workers import end_spawned
from tests.fleet import QUIET, TASKS, Fleet, holds, wait_for
from tests.test_control import ctl_json

TWO_NODES = [{"name": "a", "queues": ["a"]}, {"name": "b", "queues": ["b"]}]
# Task module lines that make every worker importing it fail its boot while the marker file
# `crash-at-import` lies beside it.
CRASH_AT_IMPORT = """
import os as _os
if _os.path.exists(_os.path.join(_os.path.dirname(__file__), "crash-at-import")):
    raise RuntimeError("told to crash at import")
"""


# --- the policy -------------------------------------------------------------------------------
def test_restart_delay_is_none_after_one_failed_start_then_doubles_up_to_its_cap() -> None:
    delays = [states.restart_delay(n) for n in range(0, 10)]
    assert delays[:6] == [0.0, 0.0, 0.25, 0.5, 1.0, 2.0]
    assert delays[-1] == states.BACKOFF_MAX
    assert delays == sorted(delays)


def test_a_worker_is_left_fatal_after_fatal_after_failed_starts_in_a_row() -> None:
    assert not states.gives_up(states.FATAL_AFTER - 1)
    assert states.gives_up(states.FATAL_AFTER)


@pytest.mark.parametrize(
    ("ran", "failed"),
    [(None, True), (0.0, True), (states.START_SECS - 0.01, True), (states.START_SECS, False)],
)
def test_a_start_failed_unless_the_worker_ran_start_secs_after_ready(
    ran: float | None, failed: bool
) -> None:
    assert states.failed_start(ran) is failed


# --- the transitions ----------------------------------------------------------------------------
def test_every_state_has_its_transitions_and_every_state_is_reachable() -> None:
    assert set(states.TRANSITIONS) == set(State)
    assert set().union(*states.TRANSITIONS.values()) == set(State)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (STOPPED, STARTING),  # fleetctl start, or a first spawn
        (STARTING, RUNNING),  # ready
        (STARTING, BACKOFF),  # died while booting, after the fleet's start
        (STARTING, FATAL),  # could not boot at `fleetd start`
        (RUNNING, BACKOFF),
        (RUNNING, FATAL),
        (RUNNING, STOPPING),
        (BACKOFF, STARTING),
        (STOPPING, STOPPED),
        (FATAL, STARTING),  # fleetctl start
        (FATAL, STOPPED),  # shut down
    ],
)
def test_allowed_transitions(old: State, new: State) -> None:
    assert states.allowed(old, new)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (STOPPED, RUNNING),
        (STOPPING, RUNNING),
        (STOPPING, BACKOFF),
        (FATAL, RUNNING),
        (BACKOFF, RUNNING),
    ],
)
def test_illegal_transitions(old: State, new: State) -> None:
    assert not states.allowed(old, new)


def arbiter_for(tmp_path: Path) -> arbitermod.Arbiter:
    config = configmod.from_dict(
        {"fleet": {"node": "h1", "state_dir": "state"}, "worker": [{"name": "w"}]},
        str(tmp_path / "fleet.toml"),
        check_imports=False,
    )
    return arbitermod.Arbiter(config)


def test_change_state_logs_the_node_and_reason_and_counts_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    arbiter = arbiter_for(tmp_path)
    w = arbitermod.WorkerProc(arbiter.config.workers[0], 0)
    with caplog.at_level(logging.INFO, "fleetd.arbiter"):
        arbiter.change_state(w, STARTING, "fleetd start")
        arbiter.change_state(w, RUNNING, "ready")
    assert w.state == RUNNING
    assert [(r.getMessage(), r.node) for r in caplog.records] == [  # type: ignore[attr-defined]
        ("STOPPED -> STARTING: fleetd start", "w@h1"),
        ("STARTING -> RUNNING: ready", "w@h1"),
    ]
    text = arbiter.metrics.render()
    assert 'fleetd_worker_transitions_total{node="w@h1",state="RUNNING"} 1' in text


def test_an_illegal_transition_is_logged_as_an_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    arbiter = arbiter_for(tmp_path)
    w = arbitermod.WorkerProc(arbiter.config.workers[0], 0)
    arbiter.change_state(w, RUNNING, "a bug")
    [error] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert error.getMessage() == "illegal state transition STOPPED -> RUNNING: a bug"


def test_only_change_state_assigns_a_workers_state() -> None:
    tree = ast.parse(Path(arbitermod.__file__).read_text())
    assigners = {
        function.name
        for function in ast.walk(tree)
        if isinstance(function, ast.FunctionDef)
        for node in ast.walk(function)
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign))
        for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
        if isinstance(target, ast.Attribute) and target.attr == "state"
    }
    assert assigners == {"change_state"}


def test_status_shows_the_serving_generation_with_the_failed_reload_as_a_note(
    tmp_path: Path,
) -> None:
    spec = arbiter_for(tmp_path).config.workers[0]
    serving = arbitermod.WorkerProc(spec, 0, state=RUNNING, pid=123)
    failed = arbitermod.WorkerProc(spec, 1, state=FATAL, failure="could not boot: SyntaxError")
    view = report.node_status([serving, failed])
    assert view["state"] == "RUNNING" and view["pid"] == 123 and view["generation"] == 0
    assert view["reload_failed"] == "generation 1 could not boot: SyntaxError"
    assert "error" not in view


# --- end to end -----------------------------------------------------------------------------------
def node_view(fleet: Fleet, node: str) -> dict[str, Any]:
    _, data = ctl_json(fleet, "status")
    view = data["replies"].get(node)
    return view if isinstance(view, dict) else {}


def crashing_fleet(make_fleet: Callable[..., Fleet]) -> Fleet:
    fleet = make_fleet(workers=TWO_NODES)
    (fleet.folder / "tasks.py").write_text(textwrap.dedent(TASKS) + CRASH_AT_IMPORT)
    return fleet


def test_a_worker_dying_at_every_start_goes_fatal_and_stays_down_while_the_fleet_serves(
    make_fleet: Callable[..., Fleet],
) -> None:
    fleet = crashing_fleet(make_fleet).start()
    (fleet.folder / "crash-at-import").touch()
    os.kill(node_view(fleet, "a@h1")["pid"], signal.SIGKILL)
    down = wait_for(
        lambda: (v := node_view(fleet, "a@h1")).get("state") == "FATAL" and v, 30, 0.1, "FATAL"
    )
    assert "could not boot" in down["error"] and "told to crash at import" in down["error"]
    assert holds(lambda: node_view(fleet, "a@h1").get("state") == "FATAL", QUIET)
    assert fleet.client.submit("tasks.add", 1, 2, queue="b").get(timeout=10) == 3
    assert fleet.ctl("status", check=False).returncode == 1  # a node is down
    # ping too: it left the node out and exited 0, as if the host had no more nodes
    code, data = ctl_json(fleet, "ping")
    assert code == 1 and data["replies"] == {
        "a@h1": {"error": "not running (FATAL)"},
        "b@h1": {"ok": "pong"},
    }
    # Asked for the first reply, it is the live node's: the down one's word would end it.
    code, data = ctl_json(fleet, "ping", "--limit", "1")
    assert code == 0 and data["replies"] == {"b@h1": {"ok": "pong"}}
    log = fleet.log()
    assert f"{states.FATAL_AFTER} failed starts in a row" in log
    assert log.count("-> STARTING: backoff over") == states.FATAL_AFTER - 1


def test_fleetctl_start_brings_back_a_fatal_and_a_shut_down_node_and_names_an_unknown_one(
    make_fleet: Callable[..., Fleet],
) -> None:
    fleet = crashing_fleet(make_fleet).start()
    marker = fleet.folder / "crash-at-import"
    marker.touch()
    os.kill(node_view(fleet, "a@h1")["pid"], signal.SIGKILL)
    wait_for(lambda: node_view(fleet, "a@h1").get("state") == "FATAL", 30, 0.1, "a FATAL")
    marker.unlink()
    code, data = ctl_json(fleet, "shutdown", "--dest", "b@h1")
    assert code == 0
    wait_for(lambda: "b@h1" not in ctl_json(fleet, "ping")[1]["replies"], 10, 0.1, "b to stop")

    code, data = ctl_json(fleet, "start", "a@h1", "b@h1", "nosuch@h1")
    assert code == 1
    assert data["replies"]["a@h1"] == {"ok": "starting (was FATAL)"}
    assert data["replies"]["b@h1"] == {"ok": "starting (was STOPPED)"}
    assert "no such node" in data["replies"]["nosuch@h1"]["error"]
    fleet.wait_ready()
    assert fleet.client.submit("tasks.add", 2, 2, queue="a").get(timeout=10) == 4
    assert fleet.client.submit("tasks.add", 3, 3, queue="b").get(timeout=10) == 6
    code, data = ctl_json(fleet, "start", "h1")
    assert code == 0 and data["replies"] == {
        "a@h1": {"ok": "already RUNNING"},
        "b@h1": {"ok": "already RUNNING"},
    }
    out = fleet.ctl("start", "nosuch@h1", check=False)
    assert out.returncode == 1 and "no such node" in out.stdout
    # A node without its host, or of a host that is not there: it said nothing, and exit 0.
    code, data = ctl_json(fleet, "start", "a", "a@h2")
    assert code == 1 and data["replies"] == {} and data["missing"] == ["a", "a@h2"]


def test_ending_the_spawned_workers_skips_one_whose_spawn_failed(tmp_path: Path) -> None:
    """A failed start of the control plane ends the workers spawned; one whose spawn failed
    has pid 0, and kill(0) would signal the arbiter's own process group."""
    spec = arbiter_for(tmp_path).config.workers[0]
    started = subprocess.Popen(["sleep", "60"])
    received: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        end_spawned(
            [arbitermod.WorkerProc(spec, 0), arbitermod.WorkerProc(spec, 0, pid=started.pid)], 5.0
        )
    finally:
        signal.signal(signal.SIGTERM, previous)
        with contextlib.suppress(ProcessLookupError):
            os.kill(started.pid, signal.SIGKILL)
    assert received == []
    with pytest.raises(ChildProcessError):  # end_spawned reaped it: TERM ended it
        os.waitpid(started.pid, os.WNOHANG)
