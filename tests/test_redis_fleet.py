"""A fleet on the Redis broker, end to end: real fleetd processes, the outcome read in Redis.

Tests that only need a Redis use the machine's (6379, or $FLEETD_TEST_REDIS) under a key
prefix of their own (`?prefix=` in the broker URL), deleted afterwards. The test that kills
and restarts Redis runs a private redis-server (free port, temp dir, AOF on).
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
import redis

from supervisor.arbiter import EXIT_BOOT_ERROR
from tests.brokers.conftest import REDIS_URL, delete_prefix, require_redis
from tests.fleet import Fleet, alive, executions, wait_for
from tests.redisserver import BUSY_SCRIPT, free_port, limited_user, start_redis
from worker import BrokerUnavailable, Client, TaskRevoked
from worker.brokers.base import FAIL_FAST_WAIT
from worker.brokers.redis import RedisBroker

FINAL = ("SUCCESS", "FAILURE", "REVOKED")


@pytest.fixture
def shared_redis() -> Iterator[tuple[str, str]]:
    """(broker URL, key prefix): the shared Redis under a prefix of this test's own."""
    require_redis(REDIS_URL)
    prefix = f"t{uuid.uuid4().hex[:12]}"
    try:
        yield f"{REDIS_URL}?prefix={prefix}", prefix
    finally:
        delete_prefix(REDIS_URL, prefix)


def states(client: Client, ids: list[str]) -> collections.Counter[str]:
    return collections.Counter(client.handle(i).state for i in ids)


def test_url_prefix_is_the_key_prefix_and_other_url_options_pass_through_to_redis() -> None:
    broker = RedisBroker("redis://:pw@127.0.0.1:6379/0?prefix=abc&socket_timeout=3")
    options = broker.redis.connection_pool.connection_kwargs
    assert (broker.prefix, options["socket_timeout"], options["password"]) == ("abc", 3.0, "pw")
    assert RedisBroker("unix:///run/redis.sock").prefix == "fleetd"


def test_fleet_keeps_to_the_url_prefix_and_results_expire_after_result_ttl(
    make_fleet: Callable[..., Fleet], shared_redis: tuple[str, str]
) -> None:
    url, prefix = shared_redis
    fleet = make_fleet(fleet={"broker": url, "result_ttl": 120}).start()
    handles = fleet.client.submit_many([("tasks.add", (i, i), {}) for i in range(20)])
    assert [h.get(timeout=10) for h in handles] == [2 * i for i in range(20)]
    direct = redis.Redis.from_url(REDIS_URL)
    try:
        ttls = [direct.ttl(f"{prefix}:r:{h.id}") for h in handles]
    finally:
        direct.close()
    assert all(0 < ttl <= 120 for ttl in ttls), ttls  # set by the workers, from fleet.result_ttl


def test_a_worker_stopped_past_its_lease_keeps_its_tasks_and_none_runs_twice(
    make_fleet: Callable[..., Fleet], shared_redis: tuple[str, str], tmp_path: Path
) -> None:
    """Stopped longer than the lease (shorter than worker_timeout), its children ran what
    their pipes held, while the other worker took those tasks back and ran them again."""
    url, _ = shared_redis
    fleet = make_fleet(
        fleet={"broker": url, "lease": 2},
        workers=[{"name": "a", "queues": ["q"]}, {"name": "b", "queues": ["q"]}],
        defaults={"concurrency": 1, "prefetch": 2, "worker_timeout": 30},
    ).start()
    journal = tmp_path / "journal.txt"
    handles = [fleet.client.submit("tasks.journal", str(journal), 1.0, queue="q") for _ in range(8)]
    wait_for(lambda: len(executions(journal)) >= 2, 10, message="both workers to start tasks")
    [stopped, _] = fleet.worker_pids()
    os.kill(stopped, signal.SIGSTOP)
    try:
        time.sleep(6)  # three leases
    finally:
        os.kill(stopped, signal.SIGCONT)
    infos = fleet.wait_all_final([h.id for h in handles], 60)
    assert [i["state"] for i in infos] == ["SUCCESS"] * 8
    assert executions(journal) == {h.id: 1 for h in handles}


def test_worker_killed_on_redis_has_its_tasks_given_back_at_once_not_after_the_lease(
    make_fleet: Callable[..., Fleet], shared_redis: tuple[str, str], tmp_path: Path
) -> None:
    fleet = make_fleet(fleet={"broker": shared_redis[0], "lease": 60}).start()
    journal = tmp_path / "journal"
    handles = fleet.client.submit_many([("tasks.journal", (str(journal), 1.0), {})] * 4)
    ids = [h.id for h in handles]
    wait_for(lambda: len(executions(journal)) >= 2, 10, message="two tasks running")
    (worker_pid,) = fleet.worker_pids()
    killed = time.monotonic()
    os.kill(worker_pid, signal.SIGKILL)
    infos = fleet.wait_all_final(ids, timeout=20)
    assert [i["state"] for i in infos] == ["SUCCESS"] * 4
    assert time.monotonic() - killed < 15  # the lease is 60 s: the arbiter's word gave them back
    assert all(count <= 2 for count in executions(journal).values())


def test_redis_killed_and_restarted_under_load_loses_no_task_and_the_fleet_recovers_by_itself(
    make_fleet: Callable[..., Fleet], tmp_path: Path
) -> None:
    server = start_redis(tmp_path, appendonly=True)
    try:
        fleet = make_fleet(fleet={"broker": server.url, "lease": 10}).start()
        workers = fleet.worker_pids()
        journal = tmp_path / "journal"
        handles = fleet.client.submit_many([("tasks.journal", (str(journal), 0.02), {})] * 200)
        ids = [h.id for h in handles]
        wait_for(lambda: len(executions(journal)) >= 40, 20, message="the load to be under way")
        server.kill()  # SIGKILL: only what the AOF holds survives
        down = time.monotonic()
        time.sleep(1)  # past the worker's own quick retries: its loop waits it out, and answers
        assert fleet.ctl("--json", "ping").returncode == 0
        time.sleep(max(0.0, down + 3 - time.monotonic()))
        done_during_outage = len(executions(journal))
        server.start()
        infos = fleet.wait_all_final(ids, timeout=60)
        assert collections.Counter(i["state"] for i in infos) == {"SUCCESS": 200}
        runs = executions(journal)
        assert set(runs) == set(ids)
        # Only tasks held when Redis went (at most a worker's prefetch) may have run twice.
        assert sum(runs.values()) - len(ids) <= 4
        assert done_during_outage < 200
        assert fleet.worker_pids() == workers  # the worker rode it out; it was not restarted
        assert "broker unreachable" in fleet.log() and "broker reachable again" in fleet.log()
        assert fleet.client.submit("tasks.add", 2, 3).get(timeout=10) == 5  # woken as before
    finally:
        server.kill()


def test_a_hung_redis_holds_a_worker_seconds_at_a_time_and_loses_nothing(
    make_fleet: Callable[..., Fleet], tmp_path: Path
) -> None:
    """Redis stopped (SIGSTOP: its connections open, nothing answered), as a hung peer is. A
    worker's call is cut off after FAIL_FAST_WAIT (and sent again once), so its loop
    still answers the control plane and ends a task past its time limit; once Redis
    answers, every task ends (one whose reservation went unanswered after its lease)."""
    server = start_redis(tmp_path, appendonly=False)
    assert server.process is not None
    limit = 2.0
    try:
        fleet = make_fleet(
            fleet={"broker": server.url, "lease": 5}, defaults={"time_limit": limit}
        ).start()
        marker, journal = tmp_path / "sleeper", tmp_path / "journal"
        sleeper = fleet.client.submit("tasks.sleep", 60, str(marker))
        handles = fleet.client.submit_many([("tasks.journal", (str(journal), 0.05), {})] * 40)
        wait_for(lambda: marker.exists() and executions(journal), 10, message="the tasks to start")
        started = time.monotonic()
        sleeper_proc = psutil.Process(int(marker.read_text().split()[1]))
        os.kill(server.process.pid, signal.SIGSTOP)
        try:
            bound = limit + 2 * FAIL_FAST_WAIT + 1.5
            wait_for(
                lambda: not alive(sleeper_proc),
                started + bound - time.monotonic(),
                message="the time limit to end the task while Redis hangs",
            )
            for _ in range(3):  # each answered, however the worker's calls fall
                out = fleet.ctl("--json", "--timeout", str(2 * FAIL_FAST_WAIT + 2), "ping")
                assert [r.get("ok") for r in json.loads(out.stdout)["replies"].values()] == ["pong"]
        finally:
            os.kill(server.process.pid, signal.SIGCONT)
        infos = fleet.wait_all_final([h.id for h in handles], timeout=30)
        assert collections.Counter(i["state"] for i in infos) == {"SUCCESS": 40}
        assert set(executions(journal)) == {h.id for h in handles}
        assert sleeper.info()["exc_type"] == "TimeLimitExceeded"
        assert "broker unreachable" in fleet.log() and "broker reachable again" in fleet.log()
    finally:
        server.kill()


# README: "A worker told to stop during an outage waits up to 10 s for Redis before it exits".
STOP_BOUND = 10.0
STOP_MARGIN = 2.0  # the worker's last words to the arbiter, the arbiter's exit, a busy machine


def test_a_stop_while_redis_hangs_ends_within_its_bound_after_the_tasks_and_loses_nothing(
    make_fleet: Callable[..., Fleet], tmp_path: Path
) -> None:
    """Redis stopped (SIGSTOP) while tasks run, then fleetd told to stop (TERM) as the tasks
    end: fleetd exits at most STOP_BOUND after they ended. It took some 18 s: each ack the
    worker sent waited out two 3 s timeouts (the first while the TERM and the tasks' ends
    waited to be read), and its last try began just before its own 10 s, counted from then,
    were up. What it could not ack or give back stays leased: once Redis answers, the
    fleet started again runs every task to its end, none lost."""
    server = start_redis(tmp_path, appendonly=False)
    assert server.process is not None
    try:
        fleet = make_fleet(fleet={"broker": server.url, "lease": 3}).start()
        gate, marker, journal = tmp_path / "gate", tmp_path / "holders", tmp_path / "journal"
        held = fleet.client.submit_many([("tasks.hold", (str(gate), str(marker)), {})] * 2)
        queued = fleet.client.submit_many([("tasks.journal", (str(journal),), {})] * 10)
        ids = [h.id for h in held + queued]
        wait_for(
            lambda: marker.exists() and len(marker.read_text().splitlines()) == 2,
            10,
            message="both holders to start",
        )
        os.kill(server.process.pid, signal.SIGSTOP)
        try:
            fleet.signal(signal.SIGTERM)
            gate.touch()  # the tasks end now (the holders look every 10 ms)
            ended = time.monotonic()
            assert fleet.wait_exit(STOP_BOUND + 20) == 0
            stopped_in = time.monotonic() - ended
        finally:
            os.kill(server.process.pid, signal.SIGCONT)
        assert stopped_in < STOP_BOUND + STOP_MARGIN, fleet.log()
        assert "broker unreachable" in fleet.log()
        fleet.start()  # what was left leased comes back once its lease has run out
        infos = fleet.wait_all_final(ids, timeout=30)
        assert collections.Counter(i["state"] for i in infos) == {"SUCCESS": 12}
        runs = executions(journal)
        assert set(runs) == {h.id for h in queued} and max(runs.values()) <= 2
    finally:
        server.kill()


def test_a_turn_cut_off_by_a_hung_redis_that_ran_once_it_woke_hands_its_tasks_over(
    make_fleet: Callable[..., Fleet], tmp_path: Path
) -> None:
    """A task hangs Redis as it ends: its worker's next turn (its ack, and a reserve) reaches
    the server, and no reply comes before the call gives up. Redis runs that turn once it
    wakes. What the turn reserved is the worker's to run at once, not 30 s later when the
    lease runs out, and each task runs once."""
    server = start_redis(tmp_path, appendonly=False)
    assert server.process is not None
    try:
        fleet = make_fleet(
            fleet={"broker": server.url}, defaults={"worker_timeout": 4, "concurrency": 1}
        ).start()
        journal = tmp_path / "journal"
        # One submit: a second one could reach Redis after the task had stopped it.
        stop, *handles = fleet.client.submit_many(
            [("tasks.stop_process", (server.process.pid,), {})]
            + [("tasks.journal", (str(journal),), {})] * 6
        )
        wait_for(lambda: "broker unreachable" in fleet.log(), 10, message="a call to give up")
        os.kill(server.process.pid, signal.SIGCONT)
        assert stop.get(timeout=10) == server.process.pid
        infos = fleet.wait_all_final([h.id for h in handles], timeout=15)  # the lease: 30 s
        assert collections.Counter(i["state"] for i in infos) == {"SUCCESS": 6}
        assert executions(journal) == {h.id: 1 for h in handles}
        assert "a turn cut off by the broker's absence ran once it answered" in fleet.log()
    finally:
        server.kill()


def test_a_hung_redis_is_no_hung_worker_under_a_short_worker_timeout(
    make_fleet: Callable[..., Fleet], tmp_path: Path
) -> None:
    """worker_timeout = 4: a worker's broker calls give up after a quarter of it, not after
    FAIL_FAST_WAIT (two tries of 3 s: a silence the arbiter took for a hung worker, killing
    it, and each replacement, while Redis hung). It rides the hang out, and its tasks end."""
    server = start_redis(tmp_path, appendonly=False)
    assert server.process is not None
    try:
        fleet = make_fleet(fleet={"broker": server.url}, defaults={"worker_timeout": 4}).start()
        workers = fleet.worker_pids()
        journal = tmp_path / "journal"
        handles = fleet.client.submit_many([("tasks.journal", (str(journal), 0.05), {})] * 40)
        wait_for(lambda: executions(journal), 10, message="the tasks to start")
        os.kill(server.process.pid, signal.SIGSTOP)
        try:
            time.sleep(10)  # the time the arbiter takes to kill a silent worker, twice over
        finally:
            os.kill(server.process.pid, signal.SIGCONT)
        infos = fleet.wait_all_final([h.id for h in handles], timeout=30)
        assert collections.Counter(i["state"] for i in infos) == {"SUCCESS": 40}
        assert fleet.worker_pids() == workers, fleet.log()
        assert "silent" not in fleet.log()
    finally:
        server.kill()


def test_a_worker_that_booted_while_redis_hung_reads_the_revokes_before_it_reserves(
    make_fleet: Callable[..., Fleet], tmp_path: Path
) -> None:
    """A reload's worker booted while Redis hung: its boot's broker work (the revoked set,
    the routes, the expired leases) failed and was never done again, and the first reserve
    once Redis answered ran a task revoked ahead of its submit."""
    server = start_redis(tmp_path, appendonly=False)
    assert server.process is not None
    try:
        fleet = make_fleet(fleet={"broker": server.url}).start()
        journal = tmp_path / "journal"
        revoked = str(uuid.uuid4())
        fleet.client.revoke([revoked])  # ahead: no task has the id yet
        # The deploy brings a task of its own queue: its route is the new generation's to say.
        tasks = fleet.folder / "tasks.py"
        tasks.write_text(tasks.read_text() + '\n@task(queue="moved")\ndef moved():\n    pass\n')
        os.kill(server.process.pid, signal.SIGSTOP)
        try:
            fleet.signal(signal.SIGHUP)
            wait_for(lambda: "reload complete" in fleet.log(), 30, message="the reload")
            time.sleep(1)
        finally:
            os.kill(server.process.pid, signal.SIGCONT)
        handle = fleet.client.submit("tasks.journal", str(journal), task_id=revoked)
        with pytest.raises(TaskRevoked):
            handle.get(timeout=20)
        assert fleet.client.submit("tasks.add", 2, 3).get(timeout=20) == 5
        assert not executions(journal)
        assert fleet.client.broker.routes().get("tasks.moved") == "moved"
    finally:
        server.kill()


@contextlib.contextmanager
def refusing(admin: redis.Redis, how: str, folder: Path) -> Iterator[None]:
    """Redis refuses writes (and, `busy`, everything) while the block runs: full (`oom`),
    unable to write its snapshots as on a full disk (`misconf`), a replica (`readonly`), or
    another client's script past the busy threshold (`busy`)."""
    if how == "oom":
        admin.config_set("maxmemory-policy", "noeviction")
        admin.config_set("maxmemory", 1)
    elif how == "misconf":
        gone = folder / "gone"
        gone.mkdir()
        admin.config_set("stop-writes-on-bgsave-error", "yes")  # with a save point
        admin.config_set("save", "3600 1")
        admin.config_set("dir", str(gone))
        gone.rmdir()
        admin.bgsave()
        wait_for(lambda: admin.info("persistence")["rdb_last_bgsave_status"] == "err", 10)
    elif how == "readonly":
        admin.replicaof("127.0.0.1", str(free_port()))  # a primary that never answers
    busy = None
    if how == "busy":
        admin.config_set("busy-reply-threshold", 100)
        other = redis.Redis(connection_pool=admin.connection_pool)
        busy = threading.Thread(target=other.eval, args=(BUSY_SCRIPT, 0, 2.5))
        busy.start()
        time.sleep(0.3)
    try:
        yield
    finally:
        if busy is not None:
            busy.join()
        elif how == "oom":
            admin.config_set("maxmemory", 0)
        elif how == "misconf":
            admin.config_set("dir", str(folder))
            admin.bgsave()
            wait_for(lambda: admin.info("persistence")["rdb_last_bgsave_status"] == "ok", 10)
            admin.config_set("save", "")
        else:
            admin.replicaof("NO", "ONE")


@pytest.mark.parametrize("how", ["oom", "misconf", "readonly", "busy"])
def test_a_redis_that_refuses_writes_for_a_while_holds_the_fleet_back_and_loses_nothing(
    make_fleet: Callable[..., Fleet], tmp_path: Path, how: str
) -> None:
    """Redis refuses writes for two seconds (full, failing to save as on a full disk, turned
    replica, busy with another client's script) while tasks run. The worker waits it out as
    it does an unreachable broker, with what it holds: it neither dies (which would run its
    running tasks again) nor loses an outcome; a submit meanwhile fails with one line,
    BrokerUnavailable. Once Redis takes writes again, every task has run once."""
    # `dir` may be set while it runs (misconf) where its protection is off
    server = start_redis(tmp_path, appendonly=False, options=("--enable-protected-configs", "yes"))
    admin = redis.Redis.from_url(server.url)
    try:
        fleet = make_fleet(fleet={"broker": server.url}).start()
        [worker] = fleet.worker_pids()
        journal = tmp_path / "journal"
        handles = fleet.client.submit_many([("tasks.journal", (str(journal), 0.1), {})] * 30)
        wait_for(lambda: executions(journal), 10, message="the tasks to start")
        with refusing(admin, how, server.folder):
            with pytest.raises(BrokerUnavailable):
                fleet.client.submit("tasks.noop")
            time.sleep(2)
        infos = fleet.wait_all_final([h.id for h in handles], timeout=30)
        assert collections.Counter(i["state"] for i in infos) == {"SUCCESS": 30}
        assert executions(journal) == {h.id: 1 for h in handles}
        assert fleet.worker_pids() == [worker]
        assert "broker unreachable" in fleet.log()
    finally:
        admin.close()
        server.kill()


def test_a_worker_that_redis_refuses_at_boot_ends_the_start_with_one_line_naming_why(
    make_fleet: Callable[..., Fleet], tmp_path: Path
) -> None:
    """Redis answers the start's PING, but its ACL refuses the worker's scripts: the start
    ends with exit 3 and a last line that says what Redis said, not only an exit code."""
    server = start_redis(tmp_path, appendonly=False)
    try:
        fleet = make_fleet(fleet={"broker": limited_user(server, "-evalsha", "-eval")})
        fleet.start(wait=False)
        assert fleet.wait_exit(30) == EXIT_BOOT_ERROR
        assert fleet.log().splitlines()[-1] == (
            "fleetd: w@h1 could not boot: NoPermissionError: this user has no permissions to"
            " run the 'evalsha' command (exit code 1)"
        )
    finally:
        server.kill()


def test_five_thousand_tasks_on_redis_all_succeed(
    make_fleet: Callable[..., Fleet], shared_redis: tuple[str, str]
) -> None:
    fleet = make_fleet(fleet={"broker": shared_redis[0]}, defaults={"concurrency": 2}).start()
    client = fleet.client
    ids = [h.id for _ in range(10) for h in client.submit_many([("tasks.noop", (), {})] * 500)]

    def drained() -> bool:
        return not any(d.ready or d.reserved for d in client.broker.depths())

    wait_for(drained, 60, 0.01, "5,000 tasks to run")
    assert states(client, ids) == {"SUCCESS": 5000}  # the rate is `make bench`'s to measure


IDLE_WATCH = 2.0  # seconds an idle fleet is watched for scripts: a polling worker makes thousands


def script_calls(server_url: str) -> int:
    stats = redis.Redis.from_url(server_url).info("commandstats")
    return sum(
        int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in ("evalsha", "eval")
    )


def test_a_drain_costs_redis_a_script_per_batch_and_an_idle_fleet_next_to_none(
    make_fleet: Callable[..., Fleet], tmp_path: Path
) -> None:
    """Each turn carries what happened (STARTED marks included, which wait for the next one)
    and reserves a batch; an idle worker waits on its wake-up, it does not poll."""
    server = start_redis(tmp_path, appendonly=False)
    try:
        fleet = make_fleet(
            fleet={"broker": server.url}, defaults={"concurrency": 2, "prefetch": 9}
        ).start()
        assert fleet.client.submit("tasks.add", 1, 2).get(timeout=10) == 3
        before = script_calls(server.url)
        handles = fleet.client.submit_many([("tasks.noop", (), {})] * 400)
        # Polled, not waited on with get (a waiting get is a script of the client's own);
        # the last task first, then all (those still running end meanwhile).
        wait_for(lambda: handles[-1].state == "SUCCESS", 30, 0.01, "the last task")
        wait_for(lambda: all(h.state == "SUCCESS" for h in handles), 30, 0.05, "the drain")
        drained = script_calls(server.url)
        time.sleep(IDLE_WATCH)  # no condition to poll: the test is that nothing happens
        idle = script_calls(server.url) - drained
        # About 37 (some 10 tasks a turn, of the 20 the worker holds at most: it reserves once
        # half are done); 400 and more when each task took a script of its own, thousands
        # when a worker spun on a stale flush deadline. (With prefetch = 3, turns carry some
        # 4 tasks, and a loaded machine took the count past a bound of 100.)
        assert drained - before < 400 / 6
        assert idle <= 10  # a worker that polled would make thousands
    finally:
        server.kill()


def test_a_worker_asks_about_the_tasks_it_holds_and_never_reads_the_whole_revoked_set(
    make_fleet: Callable[..., Fleet], tmp_path: Path
) -> None:
    """Every worker used to read the whole set at its boot and again whenever it grew, at each
    lease renewal and revoke wake-up: with 100,000 ids, 20 ms of the one Redis core per
    worker per read. It now asks about the ids it holds (SISMEMBER each, pipelined), so a
    revoke still reaches a task waiting in a child's pipe, whatever the set holds."""
    server = start_redis(tmp_path, appendonly=False)
    try:
        fleet = make_fleet(
            fleet={"broker": server.url, "lease": 1.5},
            defaults={"concurrency": 1, "prefetch": 2},
        )
        admin = redis.Redis.from_url(server.url)
        admin.sadd("fleetd:revoked", *(f"old-{n}" for n in range(20_000)))
        fleet.start()
        journal = tmp_path / "journal"
        blocker = fleet.client.submit("tasks.journal", str(journal), 2.0)
        wait_for(lambda: executions(journal), 10, message="the blocker to start")
        waiting = fleet.client.submit("tasks.journal", str(journal))
        record = f"fleetd:r:{waiting.id}"
        wait_for(lambda: admin.hget(record, "status") == b"held", 5, message="it to be reserved")

        fleet.client.revoke([waiting.id])

        assert blocker.get(timeout=10)
        wait_for(lambda: waiting.state == "REVOKED", 10, message="REVOKED")
        assert set(executions(journal)) == {blocker.id}, "a revoked task started"
        # The boot, the renewals while both tasks were held (every 0.5 s) and the wake-up's
        # read are behind us.
        stats = admin.info("commandstats")
        assert "cmdstat_smembers" not in stats
        assert int(stats["cmdstat_sismember"]["calls"]) > 0
    finally:
        server.kill()


def test_a_busy_worker_is_not_woken_by_each_submit_and_an_idle_one_is(
    make_fleet: Callable[..., Fleet], tmp_path: Path
) -> None:
    """A submit publishes a wake-up only while a worker of its queue waits for one (its last
    reserve came back short): a worker whose reserve came back full reserves again once it
    has room. Before, every submit woke every worker of the queue (a loop turn each, and
    a write of Redis's to each), however busy the fleet was."""
    server = start_redis(tmp_path, appendonly=False)
    admin = redis.Redis.from_url(server.url)
    try:
        # One child, prefetch 1: the worker holds two tasks at most.
        fleet = make_fleet(
            fleet={"broker": server.url}, defaults={"concurrency": 1, "prefetch": 1}
        ).start()
        gate = tmp_path / "gate"
        held = fleet.client.submit_many([("tasks.hold", (str(gate),), {})] * 2)
        wait_for(lambda: held[0].state == "STARTED", 10, message="the first task to start")
        admin.config_resetstat()
        later = [fleet.client.submit("tasks.noop") for _ in range(20)]
        assert publishes(admin) == 0
        gate.touch()
        infos = fleet.wait_all_final([h.id for h in held + later], 30)
        assert {i["state"] for i in infos} == {"SUCCESS"}
        # Idle again, its last reserve short: the next submit wakes it.
        wait_for(lambda: admin.exists(f"{fleet.client.broker.prefix}:idle:default"), 10)
        admin.config_resetstat()
        assert fleet.client.submit("tasks.add", 1, 2).get(timeout=10) == 3
        assert publishes(admin) == 1
    finally:
        admin.close()
        server.kill()


def publishes(admin: redis.Redis) -> int:
    """The PUBLISH calls Redis has run since its stats were reset."""
    return int(admin.info("commandstats").get("cmdstat_publish", {}).get("calls", 0))


def test_a_redis_that_evicts_keys_is_named_once_by_each_worker_at_its_start(
    make_fleet: Callable[..., Fleet], tmp_path: Path
) -> None:
    """A Redis whose maxmemory-policy evicts keys (allkeys-lru, volatile-ttl...) drops a task's
    record or a whole queue under memory pressure, silently: each worker warns at its start,
    naming the setting and the one that keeps every task. The fleet runs all the same, and
    a Redis that evicts nothing (noeviction, the shared one here) draws no warning."""
    server = start_redis(tmp_path, appendonly=False, options=("--maxmemory-policy", "allkeys-lru"))
    try:
        evicting = make_fleet("evicting", fleet={"broker": server.url}).start()
        assert evicting.client.submit("tasks.add", 1, 2).get(timeout=10) == 3
        warnings = [line for line in evicting.log().splitlines() if "maxmemory-policy" in line]
        assert len(warnings) == 1 and "WARNING" in warnings[0], evicting.log()
        assert "allkeys-lru" in warnings[0] and "noeviction" in warnings[0]
        evicting.stop()
    finally:
        server.kill()
    prefix = f"t{uuid.uuid4().hex[:12]}"
    keeping = make_fleet("keeping", fleet={"broker": f"{REDIS_URL}?prefix={prefix}"})
    try:
        keeping.start()
        assert keeping.client.submit("tasks.add", 1, 2).get(timeout=10) == 3
        assert "maxmemory-policy" not in keeping.log()
    finally:
        keeping.stop()
        delete_prefix(REDIS_URL, prefix)
