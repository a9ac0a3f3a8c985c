"""Autoscale: the policy as a pure function, its config, and real pools that grow under a burst
of waiting tasks, shrink back after an idle spell, and lose or repeat no task meanwhile."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from supervisor.config import ConfigError, load
from tests.fleet import Fleet, executions, holds, wait_for
from worker.autoscale import MAX_POOL, Load, decide, moved, parse_bounds

BUSY = Load(wait=5.0, backlog=True, idle_children=0, idle_for=0.0)
QUIET_POOL = Load(wait=0.0, backlog=False, idle_children=2, idle_for=40.0)


# --- the policy -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("current", "load", "step"),
    [
        (2, BUSY, 1),  # tasks wait past the limit, no child idle: one more
        (8, BUSY, 0),  # never past MAX
        (2, Load(wait=0.5, backlog=True, idle_children=0, idle_for=0.0), 0),  # not long enough
        (2, Load(wait=5.0, backlog=False, idle_children=0, idle_for=0.0), 0),  # nothing waits now
        (2, Load(wait=5.0, backlog=True, idle_children=1, idle_for=0.0), 0),  # a child is free
        (5, QUIET_POOL, -1),  # idle long enough: one fewer
        (2, QUIET_POOL, 0),  # never below MIN
        (5, Load(wait=0.0, backlog=False, idle_children=1, idle_for=10.0), 0),  # not idle enough
        (1, QUIET_POOL, 1),  # below MIN (a pool shrunk by hand before a reload): back up at once
        (11, BUSY, -3),  # above MAX: back down at once
    ],
)
def test_decide_grows_on_measured_wait_and_shrinks_on_idle_time_within_bounds(
    current: int, load: Load, step: int
) -> None:
    assert decide(current, 2, 8, load, grow_after=1.0, shrink_after=30.0) == step


def test_bounds_parse_and_a_bad_one_says_what_is_wrong() -> None:
    assert parse_bounds("2,8") == (2, 8)
    assert parse_bounds(" 3 , 3 ") == (3, 3)
    for text in ("8", "2,8,9", "a,b", "-1,4", "2.5,8", ""):
        with pytest.raises(ValueError, match="MIN,MAX"):
            parse_bounds(text)
    for text in ("0,4", "8,2", f"1,{MAX_POOL + 1}"):
        with pytest.raises(ValueError, match="1 <= MIN <= MAX"):
            parse_bounds(text)


@pytest.mark.parametrize("text", ["١,٢", "１,２", "1,²"])
def test_bounds_are_ascii_digits_only(text: str) -> None:
    """str.isdigit() took Arabic-Indic and full-width digits, and "²", which int() refuses."""
    with pytest.raises(ValueError, match="MIN,MAX"):
        parse_bounds(text)


def test_bounds_of_more_digits_than_int_reads_are_out_of_range() -> None:
    with pytest.raises(ValueError, match="1 <= MIN <= MAX"):
        parse_bounds("1," + "9" * 5000)


def test_pool_moves_stop_at_the_bounds_and_say_so() -> None:
    assert moved(3, 2, 2, 8) == (5, None)
    assert moved(7, 5, 2, 8) == (8, "at the pool's max (8)")
    assert moved(3, -5, 2, 8) == (2, "at the pool's min (2)")
    assert moved(2, -1, 2, 8) == (2, "at the pool's min (2)")
    assert moved(1, -1, 2, 8) == (1, "at the pool's min (2)")  # below MIN: never up by a shrink


# --- the config -------------------------------------------------------------------------
CONFIG = """
[fleet]
node = "h1"
[defaults]
concurrency = 3
{defaults}
[[worker]]
name = "a"
{worker}
"""


def load_text(tmp_path: Path, defaults: str = "", worker: str = "") -> Any:
    path = tmp_path / "fleet.toml"
    path.write_text(CONFIG.format(defaults=defaults, worker=worker))
    return load(str(path))


def test_autoscale_config_sets_the_bounds_and_the_pool_starts_at_min(tmp_path: Path) -> None:
    [spec] = load_text(tmp_path, 'autoscale = "2,6"\nautoscale_wait = 0.5').workers
    assert (spec.autoscale, spec.concurrency, spec.autoscale_wait, spec.autoscale_idle) == (
        [2, 6],
        2,
        0.5,
        30.0,
    )
    [fixed] = load_text(tmp_path).workers
    assert (fixed.autoscale, fixed.concurrency, fixed.autoscale_wait) == ([], 3, 1.0)


@pytest.mark.parametrize(
    ("defaults", "worker", "key", "problem"),
    [
        ('autoscale = "8,2"', "", "defaults.autoscale", "1 <= MIN <= MAX"),
        ("", 'autoscale = "0,4"', "worker[0].autoscale", "1 <= MIN <= MAX"),
        ("", 'autoscale = "2-8"', "worker[0].autoscale", '"MIN,MAX"'),
        ("autoscale = 4", "", "defaults.autoscale", '"MIN,MAX"'),
        ("autoscale_wait = 0", "", "defaults.autoscale_wait", "a finite number > 0"),
        ("", 'autoscale_idle = "30s"', "worker[0].autoscale_idle", "a finite number > 0"),
    ],
)
def test_bad_autoscale_config_is_one_line_naming_the_key(
    tmp_path: Path, defaults: str, worker: str, key: str, problem: str
) -> None:
    with pytest.raises(ConfigError) as err:
        load_text(tmp_path, defaults, worker)
    assert err.value.key == key and problem in err.value.problem
    assert "\n" not in str(err.value)


# --- real pools -------------------------------------------------------------------------
def pool(fleet: Fleet) -> dict[str, Any]:
    """The worker's `inspect stats` reply."""
    out = fleet.ctl("--json", "inspect", "stats", "--dest", "w@h1")
    stats: dict[str, Any] = json.loads(out.stdout)["replies"]["w@h1"]
    return stats


def live_children(stats: dict[str, Any]) -> int:
    return sum(1 for c in stats["children"] if c["state"] != "retiring")


def test_a_burst_grows_the_pool_to_max_and_an_idle_spell_shrinks_it_back_to_min(
    make_fleet: Callable[..., Fleet], broker_url: str, tmp_path: Path
) -> None:
    scaling = {"autoscale": "2,5", "autoscale_wait": 0.3, "autoscale_idle": 1.0}
    fleet = make_fleet(fleet={"broker": broker_url}, defaults=scaling).start()
    first = pool(fleet)
    assert (first["pool_size"], first["pool_min"], first["pool_max"]) == (2, 2, 5)
    assert live_children(first) == 2
    journal = tmp_path / "journal.txt"
    burst = fleet.client.submit_many(
        [("tasks.journal", (str(journal), 0.8), {}) for _ in range(30)]
    )

    sizes: list[int] = []

    def grown() -> bool:
        stats = pool(fleet)
        sizes.append(max(stats["pool_size"], live_children(stats)))
        return stats["pool_size"] == 5 and live_children(stats) == 5

    wait_for(grown, 20, 0.1, "the pool to grow to its max")

    def burst_done() -> bool:
        grown()
        return all(i["state"] == "SUCCESS" for i in fleet.infos([h.id for h in burst]))

    wait_for(burst_done, 60, 0.1, "the burst to succeed")
    assert max(sizes) == 5, sizes  # never past MAX

    def shrunk() -> bool:
        stats = pool(fleet)
        sizes.append(stats["pool_size"])
        return stats["pool_size"] == 2 and len(stats["children"]) == 2

    wait_for(shrunk, 20, 0.1, "the pool to shrink back to its min")
    assert holds(lambda: pool(fleet)["pool_size"] == 2, 2.0), "shrank below MIN"
    assert min(sizes) == 2
    counts = executions(journal)
    assert set(counts) == {h.id for h in burst} and set(counts.values()) == {1}
    assert {i["deliveries"] for i in fleet.infos([h.id for h in burst])} == {1}
    assert "autoscale: pool grows to 5" in fleet.log()
    assert "autoscale: pool shrinks to 2" in fleet.log()


def test_tasks_that_do_not_wait_leave_the_pool_at_min(
    make_fleet: Callable[..., Fleet], tmp_path: Path
) -> None:
    scaling = {"autoscale": "1,4", "autoscale_wait": 0.5, "autoscale_idle": 60}
    fleet = make_fleet(defaults=scaling).start()
    for _ in range(10):  # one at a time: each starts at once on the one child
        fleet.client.submit("tasks.sleep", 0.1).get(timeout=10)
    assert pool(fleet)["pool_size"] == 1
    assert "autoscale: pool grows" not in fleet.log()


def test_pool_grow_shrink_and_ttin_ttou_move_within_the_autoscale_bounds(
    make_fleet: Callable[..., Fleet],
) -> None:
    fleet = make_fleet(defaults={"autoscale": "2,4", "autoscale_idle": 60}).start()
    conf = json.loads(fleet.ctl("--json", "inspect", "conf").stdout)["replies"]["w@h1"]
    assert (conf["autoscale"], conf["autoscale_wait"], conf["autoscale_idle"]) == ([2, 4], 1.0, 60)
    assert "pool is 4: at the pool's max (4)" in fleet.ctl("pool", "grow", "5").stdout
    # Past MAX_POOL too: the bound in force is autoscale's MAX, not the pool's last limit.
    assert "at the pool's max (4)" in fleet.ctl("pool", "grow", "2000", check=False).stdout
    wait_for(lambda: live_children(pool(fleet)) == 4, 10, message="4 children")
    refused = fleet.ctl("pool", "grow", check=False)
    assert refused.returncode == 1 and "at the pool's max (4)" in refused.stdout
    [worker_pid] = fleet.worker_pids()
    os.kill(worker_pid, signal.SIGTTIN)
    assert holds(lambda: pool(fleet)["pool_size"] == 4, 1.0), "TTIN went past MAX"
    assert "pool is 2: at the pool's min (2)" in fleet.ctl("pool", "shrink", "9").stdout
    wait_for(lambda: len(pool(fleet)["children"]) == 2, 10, message="2 children")
    os.kill(worker_pid, signal.SIGTTOU)
    assert holds(lambda: pool(fleet)["pool_size"] == 2, 1.0), "TTOU went below MIN"
    os.kill(worker_pid, signal.SIGTTIN)
    wait_for(lambda: pool(fleet)["pool_size"] == 3, 10, message="TTIN to grow the pool by one")


def test_an_operators_grow_stands_for_autoscale_idle_before_autoscale_shrinks_it(
    make_fleet: Callable[..., Fleet],
) -> None:
    """The pool's idle child had been idle long already: autoscale took back a `pool grow` on
    an idle pool within half a second, one child a decision."""
    scaling = {"autoscale": "1,4", "autoscale_idle": 2}
    fleet = make_fleet(defaults=scaling).start()
    time.sleep(2.5)  # its one child idle past autoscale_idle
    assert "pool is 4" in fleet.ctl("pool", "grow", "3").stdout
    assert holds(lambda: pool(fleet)["pool_size"] == 4, 1.2), "the grow was undone at once"
    wait_for(lambda: pool(fleet)["pool_size"] == 1, 15, 0.2, "autoscale to shrink it later")


def test_without_prefetch_the_wait_in_the_queue_itself_grows_the_pool(
    make_fleet: Callable[..., Fleet], tmp_path: Path
) -> None:
    # No task waits in the worker (it reserves one per free child): only the broker's record
    # of when each task was ready shows how long the queue kept it.
    scaling = {"autoscale": "1,3", "autoscale_wait": 0.3, "autoscale_idle": 60, "prefetch": 0}
    fleet = make_fleet(defaults=scaling).start()
    journal = tmp_path / "journal.txt"
    burst = fleet.client.submit_many(
        [("tasks.journal", (str(journal), 0.5), {}) for _ in range(20)]
    )
    wait_for(lambda: pool(fleet)["pool_size"] == 3, 20, 0.1, "the pool to grow to its max")
    infos = fleet.wait_all_final([h.id for h in burst], 60)
    assert {i["state"] for i in infos} == {"SUCCESS"}
    assert set(executions(journal).values()) == {1}


def test_without_prefetch_long_tasks_that_wait_in_the_queue_grow_the_pool(
    make_fleet: Callable[..., Fleet], tmp_path: Path
) -> None:
    """Tasks that run for seconds start nothing new meanwhile: with prefetch 0 no task waited
    in the worker either, and the pool stayed at MIN while the queue held the others."""
    scaling = {"autoscale": "1,3", "autoscale_wait": 0.3, "autoscale_idle": 60, "prefetch": 0}
    fleet = make_fleet(defaults=scaling).start()
    journal = tmp_path / "journal.txt"
    started = time.monotonic()
    burst = fleet.client.submit_many([("tasks.journal", (str(journal), 4), {}) for _ in range(6)])
    wait_for(lambda: pool(fleet)["pool_size"] == 3, 10, 0.1, "the pool to grow to its max")
    assert time.monotonic() - started < 3.5  # before the first task ended
    infos = fleet.wait_all_final([h.id for h in burst], 60)
    assert {i["state"] for i in infos} == {"SUCCESS"}
    assert set(executions(journal).values()) == {1}


def test_tasks_held_back_by_a_rate_limit_do_not_grow_the_pool(
    make_fleet: Callable[..., Fleet],
) -> None:
    # They wait, but for tokens, not for a child: one more child would not start them sooner.
    scaling = {"autoscale": "1,3", "autoscale_wait": 0.3, "autoscale_idle": 60}
    fleet = make_fleet(defaults=scaling, rate_limits={"tasks.add": "4/s"}).start()
    handles = fleet.client.submit_many([("tasks.add", (i, 1), {}) for i in range(12)])
    infos = fleet.wait_all_final([h.id for h in handles], 30)
    assert {i["state"] for i in infos} == {"SUCCESS"}
    assert pool(fleet)["pool_size"] == 1
    assert "autoscale: pool grows" not in fleet.log()
