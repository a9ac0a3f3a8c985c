"""Operations end to end: sd_notify, pidfile stop/reload, JSON logs, the metrics endpoint."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from tests.fleet import FLEETD, fleetd, free_port, wait_for
from tests.test_metrics import samples


def test_notify_socket_sees_ready_reloading_ready_stopping(make_fleet, tmp_path: Path) -> None:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(15)
    try:
        fleet = make_fleet().start(env={"NOTIFY_SOCKET": path})

        def next_with(key: str) -> str:
            while True:
                message = sock.recv(4096).decode()
                if key in message.split("\n"):
                    return message

        assert "READY=1" in next_with("READY=1")
        fleet.signal(signal.SIGHUP)
        reloading = next_with("RELOADING=1")
        assert any(line.startswith("MONOTONIC_USEC=") for line in reloading.split("\n"))
        next_with("READY=1")
        fleet.signal(signal.SIGTERM)
        next_with("STOPPING=1")
        assert fleet.wait_exit() == 0
    finally:
        sock.close()


def test_the_watchdog_is_pinged_at_half_its_interval_and_an_unread_socket_holds_nothing(
    make_fleet, tmp_path: Path
) -> None:
    """WATCHDOG=1 came once a second whatever WatchdogSec said (systemd would kill a healthy
    fleet under WatchdogSec=1s); and a notify socket nobody read held the arbiter's loop a
    second at every ping, so that control requests went unanswered."""
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    try:
        fleet = make_fleet().start(env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"})
        pings: list[float] = []
        while len(pings) < 8:
            if "WATCHDOG=1" in sock.recv(4096).decode().split("\n"):
                pings.append(time.monotonic())
        assert max(b - a for a, b in zip(pings, pings[1:], strict=False)) < 0.35, pings
        time.sleep(3)  # nobody reads: the socket's queue fills
        for _ in range(3):
            out = fleet.ctl("--json", "--timeout", "0.8", "ping", check=False)
            assert json.loads(out.stdout)["replies"] == {"w@h1": {"ok": "pong"}}
        began = time.monotonic()
        fleet.signal(signal.SIGTERM)
        assert fleet.wait_exit() == 0 and time.monotonic() - began < 3
    finally:
        sock.close()


def test_stop_and_reload_work_by_pidfile(make_fleet) -> None:
    fleet = make_fleet().start()
    old_workers = set(fleet.worker_pids())
    out = subprocess.run(
        [FLEETD, "reload", "-c", str(fleet.config)], capture_output=True, text=True, timeout=10
    )
    assert out.returncode == 0, out.stderr
    wait_for(
        lambda: set(fleet.worker_pids()) and not set(fleet.worker_pids()) & old_workers,
        20,
        message="a new generation of workers",
    )
    fleet.remember_pids()
    out = subprocess.run(
        [FLEETD, "stop", "-c", str(fleet.config)], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    assert fleet.wait_exit(5) == 0
    assert not (fleet.folder / "state" / "fleetd.pid").exists()


def test_stop_stops_a_fleet_whose_config_was_since_edited_into_one_that_does_not_load(
    make_fleet,
) -> None:
    """It refused, naming the key, and the fleet could be ended only by its pid."""
    fleet = make_fleet().start()
    fleet.config.write_text(fleet.config.read_text() + "\n[fleet_typo]\nx = 1\n")
    refused = subprocess.run(
        [FLEETD, "reload", "-c", str(fleet.config)], capture_output=True, text=True, timeout=10
    )
    assert refused.returncode == 2 and "fleet_typo" in refused.stderr  # a reload would load it
    # A task module that is not there: the arbiter refuses the reload, and so does the command
    # (it said "reload sent", exit 0).
    good = fleet.config.read_text().replace("\n[fleet_typo]\nx = 1\n", "")
    fleet.config.write_text(good.replace('imports = ["tasks"]', 'imports = ["tasks", "nosuch"]'))
    refused = subprocess.run(
        [FLEETD, "reload", "-c", str(fleet.config)], capture_output=True, text=True, timeout=10
    )
    assert refused.returncode == 2 and "nosuch" in refused.stderr, refused
    fleet.remember_pids()
    out = subprocess.run(
        [FLEETD, "stop", "-c", str(fleet.config)], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    assert fleet.wait_exit(5) == 0


def test_stale_pidfile_is_reported_never_signalled(make_fleet) -> None:
    fleet = make_fleet()
    pidfile = fleet.folder / "other.pid"
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        pidfile.write_text(str(bystander.pid))
        for verb in ("stop", "reload"):
            out = subprocess.run(
                [FLEETD, verb, "-c", str(fleet.config), "--pidfile", str(pidfile)],
                capture_output=True,
                text=True,
                timeout=10,
            )
            assert out.returncode == 1 and "no fleetd runs" in out.stderr, out.stderr
        assert bystander.poll() is None
        dead = subprocess.Popen(["true"])
        dead.wait()
        pidfile.write_text(str(dead.pid))
        out = subprocess.run(
            [FLEETD, "stop", "-c", str(fleet.config), "--pidfile", str(pidfile)],
            capture_output=True,
            text=True,
            timeout=10,
        )
        assert out.returncode == 1 and "no fleetd runs" in out.stderr
    finally:
        bystander.kill()
        bystander.wait()


def test_a_pidfile_naming_another_fleets_arbiter_neither_stops_it_nor_holds_a_start(
    make_fleet,
) -> None:
    """A stopped fleet's pidfile whose pid another fleet's arbiter took since: `fleetd stop`
    stopped that other fleet, and `fleetd start` refused, saying it already ran."""
    other = make_fleet("other").start()
    assert other.proc is not None
    fleet = make_fleet()
    (fleet.folder / "state").mkdir(parents=True)
    (fleet.folder / "state" / "fleetd.pid").write_text(f"{other.proc.pid}\n")
    out = subprocess.run(
        [FLEETD, "stop", "-c", str(fleet.config)], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 1 and "no fleetd runs on state_dir" in out.stderr, out.stderr
    assert other.proc.poll() is None
    fleet.start()
    assert (fleet.folder / "state" / "fleetd.pid").read_text() == f"{fleet.pid}\n"


def test_json_log_format_emits_only_json_lines_marked_by_node(make_fleet) -> None:
    fleet = make_fleet().start("--log-format", "json")
    fleet.client.submit("tasks.say", "hello from a task").get(timeout=10)
    wait_for(lambda: "hello from a task" in fleet.log(), 10, message="the task's print in the log")
    fleet.signal(signal.SIGTERM)
    assert fleet.wait_exit() == 0
    records = [json.loads(line) for line in fleet.log().splitlines() if line.strip()]
    assert {"time", "level", "logger", "message", "node", "pid"} <= set(records[0])
    said = [r for r in records if r["message"] == "hello from a task"]
    assert said and said[0]["node"] == "w@h1"
    assert any(r["node"] == "fleetd@h1" for r in records)


def test_metrics_endpoint_serves_families_that_move(make_fleet) -> None:
    port = free_port()
    fleet = make_fleet(extra=f'\n[metrics]\nbind = "127.0.0.1:{port}"\n').start()

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            return response.read().decode()

    for family in (
        "fleetd_tasks_total",
        "fleetd_task_runtime_seconds",
        "fleetd_queue_depth",
        "fleetd_reserved",
        "fleetd_active",
        "fleetd_children",
        "fleetd_worker_restarts_total",
        "fleetd_child_recycles_total",
        "fleetd_time_limit_kills_total",
        "fleetd_redeliveries_total",
        "fleetd_dead_letters_total",
    ):
        assert f"# TYPE {family} " in scrape()
    for h in fleet.client.submit_many([("tasks.add", (i, i), {}) for i in range(10)]):
        h.get(timeout=10)
    fleet.client.submit("tasks.fail").get  # noqa: B018 - submitted, outcome checked through metrics
    wait_for(
        lambda: 'fleetd_tasks_total{name="tasks.add",state="SUCCESS"} 10' in scrape(),
        10,
        message="10 successes counted",
    )
    wait_for(lambda: 'fleetd_children{node="w@h1"} 2' in scrape(), 10, message="the children gauge")
    [worker] = fleet.worker_pids()
    psutil.Process(worker).kill()
    wait_for(
        lambda: 'fleetd_worker_restarts_total{node="w@h1"} 1' in scrape(),
        10,
        message="a restart counted",
    )
    fleet.wait_ready()
    assert (
        'fleetd_tasks_total{name="tasks.add",state="SUCCESS"} 10' in scrape()
    )  # survives the restart


def probe(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_healthz_and_readyz_say_which_worker_is_not_well(make_fleet) -> None:
    port = free_port()
    fleet = make_fleet(
        workers=[{"name": "a", "queues": ["a"]}, {"name": "b", "queues": ["b"]}],
        extra=f'\n[metrics]\nbind = "127.0.0.1:{port}"\n',
    ).start()
    wait_for(lambda: probe(port, "/readyz")[0] == 200, 10, message="/readyz 200")
    wait_for(lambda: probe(port, "/healthz")[0] == 200, 10, message="/healthz 200")
    [b_pid] = [p for p in fleet.worker_pids() if "b@h1" in " ".join(psutil.Process(p).cmdline())]
    os.kill(b_pid, signal.SIGSTOP)
    try:
        status, text = wait_for(
            lambda: (answer := probe(port, "/healthz"))[0] == 503 and answer, 15, message="503"
        )
        assert text.count("\n") == 1 and "b@h1 silent for" in text
    finally:
        os.kill(b_pid, signal.SIGCONT)
    wait_for(lambda: probe(port, "/healthz")[0] == 200, 10, message="healthy again")
    fleet.ctl("shutdown", "--dest", "b@h1")
    wait_for(
        lambda: probe(port, "/healthz") == (503, "not ok: b@h1 is STOPPED\n"),
        10,
        message="503 naming the stopped worker",
    )
    assert probe(port, "/readyz")[0] == 200  # it booted once: readiness is not liveness


def test_metrics_have_every_series_from_the_start_and_count_a_dead_workers_tasks(
    make_fleet, tmp_path: Path
) -> None:
    port = free_port()
    fleet = make_fleet(
        defaults={"concurrency": 1}, extra=f'\n[metrics]\nbind = "127.0.0.1:{port}"\n'
    ).start()
    first = samples(probe(port, "/metrics")[1])
    assert first['fleetd_redeliveries_total{node="w@h1"}'] == 0
    assert first['fleetd_dead_letters_total{node="w@h1"}'] == 0
    assert first['fleetd_queue_depth{queue="default"}'] == 0
    marker = tmp_path / "started.txt"
    held = fleet.client.submit("tasks.sleep", 2, str(marker))
    wait_for(marker.exists, 10, message="the task to start")
    [worker] = fleet.worker_pids()
    psutil.Process(worker).kill()
    assert held.get(timeout=20) > 0
    wait_for(
        lambda: samples(probe(port, "/metrics")[1])['fleetd_redeliveries_total{node="w@h1"}'] == 1,
        10,
        message="the dead worker's task counted as a redelivery",
    )


def test_bad_config_refuses_to_start(make_fleet) -> None:
    fleet = make_fleet(defaults={"concurrency": 0})
    out = subprocess.run(
        [FLEETD, "start", "-c", str(fleet.config)], capture_output=True, text=True, timeout=20
    )
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "defaults.concurrency" in out.stderr
    assert not os.path.exists(fleet.folder / "state" / "fleetd.pid")


@pytest.mark.parametrize("where", ["in-use", "not-ours"])
def test_a_metrics_bind_that_cannot_listen_ends_the_start_in_one_line_and_no_leftover(
    make_fleet, where: str
) -> None:
    """A port in use, an address that is not this host's (TEST-NET-1: a bind sends nothing):
    `fleetd start` ended in an OSError's traceback (exit 1) once its workers were up. Now one
    line naming [metrics] (exit 2, as a control bind that cannot listen), and its workers are
    ended."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        host = "127.0.0.1" if where == "in-use" else "192.0.2.1"
        bind = f"{host}:{taken.getsockname()[1]}"
        fleet = make_fleet(extra=f'\n[metrics]\nbind = "{bind}"\n')
        out = fleetd("start", "-c", str(fleet.config))
    assert out.returncode == 2, out.stderr
    last = out.stderr.splitlines()[-1]
    assert last.startswith(f"fleetd: {fleet.config}: [metrics] bind {bind}: cannot listen"), last
    spawned = json.loads((fleet.folder / "state" / "run.json").read_text())["processes"]
    assert spawned and not any(psutil.pid_exists(r["pid"]) for r in spawned)
