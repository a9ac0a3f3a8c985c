"""A broker that cannot be reached, a folder that cannot be made: one line, the right exit
code, in seconds, from fleetctl, from `fleetd start` and `fleetd check`, and from `Client`.

Redis is "down" on a loopback port where nothing listens; a path cannot be made when a
plain file stands where a folder should be (the tests run as root, for whom permission
bits do not stop anything).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from ctl.cli import build_parser as fleetctl_parser
from supervisor.cli import build_parser as fleetd_parser
from tests.fleet import FLEETCTL, FLEETD, Fleet, fleetctl_on, fleetd, free_port
from tests.redisserver import limited_user, start_redis
from worker import BrokerUnavailable, Client

# The longest an unreachable broker may hold a command up (the process's start included):
# without the fix, redis-py's retries took 11 s.
FAST = 5.0


def timed(run: Callable[[], Any]) -> tuple[float, Any]:
    started = time.monotonic()
    out = run()
    return time.monotonic() - started, out


def in_the_way(folder: Path) -> Path:
    """A plain file where a config's folders would go."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "a-file"
    path.write_text("not a folder\n")
    return path


@pytest.mark.parametrize(
    "argv",
    [
        ["submit", "tasks.add", "1", "2"],
        ["submit", "tasks.add", "1", "2", "--wait", "5"],
        ["result", "some-id"],
        ["queues"],
        ["dead", "list"],
        ["dead", "retry", "--all"],
        ["dead", "purge", "--yes"],
    ],
)
def test_fleetctl_with_redis_down_says_so_in_one_line_within_seconds(
    make_fleet: Callable[..., Fleet], argv: list[str]
) -> None:
    port = free_port()
    fleet = make_fleet(fleet={"broker": f"redis://127.0.0.1:{port}/0"})

    elapsed, out = timed(lambda: fleet.ctl(*argv, check=False))

    assert (out.returncode, out.stdout) == (1, "")
    [line] = out.stderr.splitlines()
    assert line.startswith(f"fleetctl: broker redis://127.0.0.1:{port}/0: ")
    assert "Connection refused" in line
    assert elapsed < FAST


def test_a_password_in_the_url_is_not_shown(make_fleet: Callable[..., Fleet]) -> None:
    port = free_port()
    fleet = make_fleet(fleet={"broker": f"redis://:hunter2@127.0.0.1:{port}/0"})

    out = fleet.ctl("queues", check=False)

    assert out.returncode == 1
    assert f"broker redis://:***@127.0.0.1:{port}/0: " in out.stderr
    assert "hunter2" not in out.stderr


def test_fleetctl_with_a_sqlite_path_that_cannot_be_made_names_it(
    make_fleet: Callable[..., Fleet], tmp_path: Path
) -> None:
    blocker = in_the_way(tmp_path / "host")
    fleet = make_fleet(fleet={"broker": f"sqlite:///{blocker}/queue.db"})

    out = fleet.ctl("submit", "tasks.add", "1", "2", check=False)

    assert (out.returncode, out.stdout) == (1, "")
    [line] = out.stderr.splitlines()
    assert line.startswith(f"fleetctl: broker sqlite:///{blocker}/queue.db: ")
    assert str(blocker) in line.partition("queue.db: ")[2]


def test_fleetd_start_with_redis_down_exits_1_in_one_line_and_starts_nothing(
    make_fleet: Callable[..., Fleet],
) -> None:
    port = free_port()
    fleet = make_fleet(fleet={"broker": f"redis://127.0.0.1:{port}/0"})

    elapsed, out = timed(lambda: fleetd("start", "-c", str(fleet.config)))

    assert out.returncode == 1
    [line] = out.stderr.splitlines()
    assert line.startswith(f"fleetd: broker redis://127.0.0.1:{port}/0: ")
    assert "Traceback" not in out.stdout + out.stderr
    assert elapsed < FAST
    assert not (fleet.folder / "state" / "fleetd.pid").exists()


@pytest.mark.parametrize("command", ["start", "check"])
def test_fleetd_names_a_state_dir_it_cannot_make_and_exits_2(
    make_fleet: Callable[..., Fleet], tmp_path: Path, command: str
) -> None:
    blocker = in_the_way(tmp_path / "host")
    fleet = make_fleet(fleet={"state_dir": f"{blocker}/state"})

    out = fleetd(command, "-c", str(fleet.config))

    assert (out.returncode, out.stdout) == (2, "")
    assert out.stderr.splitlines() == [
        f"fleetd: {fleet.config}: fleet.state_dir: cannot make {blocker}/state:"
        f" {blocker} is not a folder"
    ]


def test_fleetd_check_names_every_folder_it_would_fail_on(
    make_fleet: Callable[..., Fleet], tmp_path: Path
) -> None:
    blocker = in_the_way(tmp_path / "host")
    fleet = make_fleet(
        fleet={"state_dir": f"{blocker}/state", "broker": f"sqlite:///{blocker}/db/queue.db"}
    )

    out = fleetd("check", "-c", str(fleet.config))

    assert out.returncode == 2
    assert out.stderr.splitlines() == [
        f"fleetd: {fleet.config}: fleet.state_dir: cannot make {blocker}/state:"
        f" {blocker} is not a folder",
        f"fleetd: {fleet.config}: fleet.broker: cannot make {blocker}/db:"
        f" {blocker} is not a folder",
    ]


@pytest.mark.parametrize(
    ("fleet_keys", "problem"),
    [
        ({"broker": "sqlite:///state"}, "is the state_dir or a folder of it"),
        ({"broker": "sqlite:///q.db", "state_dir": "q.db/st"}, "is the state_dir or a folder"),
        ({"broker": "sqlite:////dev/null"}, "is no file"),
    ],
)
@pytest.mark.parametrize("command", ["check", "start"])
def test_a_queue_file_where_the_state_dir_or_no_file_is_is_one_line_and_exit_2(
    make_fleet: Callable[..., Fleet], fleet_keys: dict[str, str], problem: str, command: str
) -> None:
    """Check said ok; start made the queue file where the state folder goes and ended in
    a FileExistsError's traceback, or (a device) refused only after spawning."""
    fleet = make_fleet(fleet=fleet_keys)

    out = fleetd(command, "-c", str(fleet.config))

    assert out.returncode == 2
    [line] = out.stderr.splitlines()
    assert line.startswith(f"fleetd: {fleet.config}: fleet.broker: ") and problem in line


def test_fleetd_check_of_folders_under_proc_says_why_they_cannot_be_made(
    make_fleet: Callable[..., Fleet],
) -> None:
    fleet = make_fleet(fleet={"state_dir": "/proc/fleetd-test/state"})

    out = fleetd("check", "-c", str(fleet.config))

    assert out.returncode == 2
    assert out.stderr.splitlines() == [
        f"fleetd: {fleet.config}: fleet.state_dir: cannot make /proc/fleetd-test/state:"
        " No such file or directory (in /proc)"
    ]


def test_client_raises_broker_unavailable_naming_the_broker(tmp_path: Path) -> None:
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    client = Client(url, fail_fast=True)
    with pytest.raises(BrokerUnavailable, match=f"^broker {url}: .*Connection refused"):
        client.submit("tasks.add", 1, 2)
    with pytest.raises(BrokerUnavailable):
        client.handle("some-id").get(timeout=1)
    client.close()

    blocker = in_the_way(tmp_path)
    with pytest.raises(BrokerUnavailable, match=f"^broker sqlite:///{blocker}/q.db: "):
        Client(f"sqlite:///{blocker}/q.db").submit("tasks.add", 1, 2)


DEEP = "[" * 5000 + "]" * 5000


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["submit", "tasks.add", DEEP], "argument [[[[[[[[[[[[[[[[[[[[... is JSON nested too deep"),
        (
            ["submit", "tasks.add", "--kwargs", '{"a": ' * 5000 + "1" + "}" * 5000],
            "--kwargs is JSON nested too deep",
        ),
    ],
)
def test_fleetctl_submit_of_json_nested_too_deep_is_one_line_and_sends_nothing(
    make_fleet: Callable[..., Fleet], argv: list[str], error: str
) -> None:
    """It ended in a RecursionError's traceback."""
    fleet = make_fleet()
    out = fleet.ctl(*argv, check=False)
    assert (out.returncode, out.stdout, out.stderr) == (2, "", f"fleetctl: {error}\n")
    assert not (fleet.folder / "queue.db").exists()


def test_fleetctl_submit_of_arguments_json_cannot_carry_is_one_line(
    make_fleet: Callable[..., Fleet],
) -> None:
    """Nested just within what fleetctl reads, but too deep once wrapped in a task's body,
    ended in a RecursionError's traceback; a number of more digits than Python converts
    went to the task as a string."""
    fleet = make_fleet()
    out = fleet.ctl("submit", "tasks.add", "[" * 990 + "]" * 990, check=False)
    assert (out.returncode, out.stdout) == (2, "")
    assert out.stderr == "fleetctl: tasks.add: the arguments are nested too deep for JSON\n"
    out = fleet.ctl("submit", "tasks.add", "7" * 5000, check=False)
    assert (out.returncode, out.stdout) == (2, "")
    assert out.stderr.startswith("fleetctl: argument 77777777777777777777...: Exceeds the limit")
    assert len(out.stderr.splitlines()) == 1


def test_fleetctl_submit_takes_what_json_does_not_read_as_a_string(
    make_fleet: Callable[..., Fleet],
) -> None:
    """`007` is no JSON number: a string, as the command line says of arguments."""
    fleet = make_fleet().start()
    out = fleet.ctl("--json", "submit", "tasks.add", "007", "x", "--wait", "10")
    assert json.loads(out.stdout)["result"] == "007x"


def test_fleetctl_names_a_folder_of_its_own_that_it_cannot_use_in_one_line(
    make_fleet: Callable[..., Fleet],
) -> None:
    """A state_dir under a file: not an error of its output, as it said, but of that path."""
    fleet = make_fleet()
    (fleet.folder / "afile").write_text("in the way\n")
    fleet.config.write_text(fleet.config.read_text().replace('"state"', '"afile/state"', 1))
    out = fleet.ctl("dashboard", "--bind", f"127.0.0.1:{free_port()}", check=False)
    assert (out.returncode, out.stdout) == (1, "")
    assert len(out.stderr.splitlines()) == 1 and "Not a directory" in out.stderr, out.stderr
    assert "afile" in out.stderr and "cannot write the output" not in out.stderr


def test_fleetctl_revoke_of_an_id_that_is_no_utf8_is_a_usage_error(
    make_fleet: Callable[..., Fleet],
) -> None:
    """It reached the nodes, whose brokers failed on it (a traceback in the worker's log)
    while fleetctl said the id was revoked ahead."""
    fleet = make_fleet()
    out = fleet.ctl("revoke", "ok-id", "bad-\udcff", check=False)
    assert (out.returncode, out.stdout) == (2, "")
    assert "task ids must be UTF-8 text, not 'bad-\\udcff'" in out.stderr


def test_fleetctl_whose_output_fails_says_so_in_one_line_and_names_a_stored_task(
    make_fleet: Callable[..., Fleet],
) -> None:
    """stdout on a full disk: a traceback, and a submit's task stored with its id lost."""
    fleet = make_fleet()
    with open("/dev/full", "w") as full:
        for argv in (["--json", "queues"], ["submit", "tasks.add", "1", "2"]):
            out = subprocess.run(
                [FLEETCTL, "-c", str(fleet.config), *argv],
                stdout=full,
                stderr=subprocess.PIPE,
                text=True,
                timeout=30,
            )
            assert out.returncode == 1 and len(out.stderr.splitlines()) == 1, out.stderr
            assert out.stderr.endswith("cannot write the output: No space left on device\n")
    task_id = out.stderr.split()[2]
    assert out.stderr.startswith(f"fleetctl: task {task_id} submitted, but")
    assert fleet.client.handle(task_id).state == "PENDING"


@pytest.mark.parametrize("argv", [["ping"], ["events", "tail"]])
def test_fleetctl_names_an_endpoint_no_host_binds_in_one_line(argv: list[str]) -> None:
    """`events tail` on inproc:// ended in a ControlConfigError's traceback; `ping` took
    it, and said nobody answered."""
    out = subprocess.run(
        [FLEETCTL, "--endpoint", "inproc://x", *argv], capture_output=True, text=True, timeout=30
    )
    assert (out.returncode, out.stdout) == (2, "")
    assert (
        out.stderr
        == "fleetctl: control endpoint inproc://x: only ipc:// and tcp:// are supported\n"
    )


def test_fleetctl_takes_a_timeout_past_any_clock_as_a_long_one(
    make_fleet: Callable[..., Fleet],
) -> None:
    """`--timeout 1e308` is finite, and was taken, but ended in an OverflowError's traceback
    when the first wait for a reply turned it into milliseconds."""
    fleet = make_fleet().start()
    out = fleet.ctl("--timeout", "1e308", "--json", "ping")
    assert json.loads(out.stdout)["replies"] == {"w@h1": {"ok": "pong"}}


def test_fleetd_stop_with_a_timeout_that_is_no_duration_exits_2_and_signals_nothing(
    make_fleet: Callable[..., Fleet],
) -> None:
    """`--timeout -1` sent TERM and then at once QUIT (a cold stop for a typo); nan waited
    on an undefined deadline."""
    fleet = make_fleet().start()
    for word in ("nan", "-1", "inf", "soon"):
        out = fleetd("stop", "-c", str(fleet.config), "--timeout", word)
        assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
        assert "argument --timeout: " in out.stderr
    assert fleet.ctl("ping").returncode == 0


def test_fleetd_with_an_empty_pidfile_exits_2_and_signals_nothing(
    make_fleet: Callable[..., Fleet],
) -> None:
    """`--pidfile ""` was taken as none given: stop stopped the fleet of the default pidfile."""
    fleet = make_fleet().start()
    for command in ("stop", "reload", "start"):
        out = fleetd(command, "-c", str(fleet.config), "--pidfile", "")
        assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
        assert "argument --pidfile: " in out.stderr
    assert fleet.ctl("ping").returncode == 0
    assert "reload: generation" not in fleet.log()


def test_fleetctl_on_a_redis_database_the_server_does_not_have_says_so_in_one_line(
    make_fleet: Callable[..., Fleet],
) -> None:
    """SELECT's refusal at connect ended in a ResponseError's traceback."""
    fleet = make_fleet(fleet={"broker": "redis://127.0.0.1:6379/99999"})
    out = fleet.ctl("queues", check=False)
    assert (out.returncode, out.stdout) == (1, "")
    assert out.stderr == "fleetctl: broker redis://127.0.0.1:6379/99999: DB index is out of range\n"


@pytest.mark.parametrize(
    ("option", "problem"),
    [
        ("socket_timout=5", "unknown URL option 'socket_timout'"),  # a typo
        ("socket_timeout=soon", "Invalid value for 'socket_timeout' in connection URL."),
    ],
)
def test_a_redis_url_option_redis_py_cannot_take_is_one_line_from_check_and_fleetctl(
    make_fleet: Callable[..., Fleet], option: str, problem: str
) -> None:
    """An option name redis-py does not know passed `fleetd check` and ended fleetctl in a
    TypeError's traceback at its first connection."""
    fleet = make_fleet(fleet={"broker": f"redis://127.0.0.1:6379/0?{option}"})
    for command in ("check", "start"):  # start said it in other words, and exited 1
        out = fleetd(command, "-c", str(fleet.config))
        assert (out.returncode, out.stderr) == (
            2,
            f"fleetd: {fleet.config}: fleet.broker: {problem}\n",
        ), command
    out = fleet.ctl("queues", check=False)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and problem in out.stderr


@pytest.mark.parametrize(
    ("denied", "says"),
    [
        ("-publish", "ResponseError: The user executing the script can't run this command"),
        ("-evalsha", "NoPermissionError: this user has no permissions to run the 'evalsha'"),
    ],
)
def test_fleetctl_on_a_redis_whose_acl_denies_a_command_says_so_in_one_line(
    tmp_path: Path, denied: str, says: str
) -> None:
    """A Redis user that may not run a command fleetd needs (a managed Redis's ACL): the
    broker's refusal, one line and exit 1, not a redis-py traceback. (A submit publishes
    its wake-up only while a worker waits for one: one does here.)"""
    server = start_redis(tmp_path, appendonly=False)
    try:
        with redis.Redis.from_url(server.url) as admin:
            admin.zadd("fleetd:idle:default", {"w@h1:1:1": time.time() * 1000})
        out = fleetctl_on(limited_user(server, denied), "submit", "tasks.add", "1", "2")
        assert (out.returncode, out.stdout) == (1, "")
        [line] = out.stderr.splitlines()
        assert line.startswith("fleetctl: the broker refused: ") and says in line, line
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["submit", ""], "a task name must be a non-empty string, not ''"),
        (["dashboard", "--bind", "127.0.0.1:²"], "--bind '127.0.0.1:²': give HOST:PORT"),
        (["dashboard", "--bind", "[::1:9810"], "--bind '[::1:9810': give HOST:PORT"),
        (["dashboard", "--bind", f"127.0.0.1:{'9' * 5000}"], "--bind '127.0.0.1:99999"),
        (["result", ""], "a task id must be a non-empty string, not ''"),
    ],
)
def test_fleetctl_arguments_that_ended_in_a_traceback_are_one_line_and_exit_2(
    make_fleet: Callable[..., Fleet], argv: list[str], error: str
) -> None:
    out = make_fleet().ctl(*argv, check=False)
    assert (out.returncode, out.stdout) == (2, "")
    assert out.stderr.startswith(f"fleetctl: {error}") and out.stderr.count("\n") == 1


@pytest.mark.parametrize("build", [fleetd_parser, fleetctl_parser])
def test_help_is_sized_to_the_terminal_as_argparse_sizes_it(
    build: Callable[[], argparse.ArgumentParser], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Both commands size their help from $COLUMNS (else the terminal) without shutil.
    helps = []
    for columns in (50, 120):
        monkeypatch.setenv("COLUMNS", str(columns))
        parser = build()
        ours = parser.format_help()
        parser.formatter_class = argparse.HelpFormatter
        assert ours == parser.format_help()
        # argparse wraps all but a list of choices, which it keeps on one line.
        assert max(len(line) for line in ours.splitlines() if "{" not in line) <= columns
        helps.append(ours)
    assert helps[0] != helps[1]


def test_the_arbiters_command_line_brings_no_shutil_into_its_process() -> None:
    # shutil, and with it zlib, bz2 and lzma, would stay in the arbiter's memory for good.
    code = (
        "import sys; from supervisor.cli import build_parser;"
        " build_parser().parse_args(['start', '-c', 'fleet.toml']);"
        " print(sorted({'shutil', 'bz2', 'lzma'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (out.returncode, out.stdout, out.stderr) == (0, "[]\n", "")


def test_fleetctl_result_of_an_empty_id_is_refused_before_the_broker_is_opened(
    tmp_path: Path,
) -> None:
    """It opened the broker first: it made the SQLite file, and a broker that could not be
    opened turned the usage error into "broker unavailable", exit 1."""
    sqlite = tmp_path / "queue.db"
    blocked = f"sqlite:///{in_the_way(tmp_path)}/queue.db"
    for broker in (f"sqlite:///{sqlite}", blocked):
        out = fleetctl_on(broker, "result", "")
        assert (out.returncode, out.stdout) == (2, "")
        assert out.stderr == "fleetctl: a task id must be a non-empty string, not ''\n"
    assert not sqlite.exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["call", "ping", "x" * 5000],
        ["result", "x" * 5000],
        ["pool", "grow", "9" * 5000],
        ["--timeout", "9" * 5000, "ping"],
    ],
)
def test_fleetctl_quotes_an_oversized_argument_short_in_its_error(
    make_fleet: Callable[..., Fleet], argv: list[str]
) -> None:
    """The error line held all 5,000 characters of the argument."""
    out = make_fleet().ctl(*argv, check=False)
    assert out.returncode in (1, 2) and out.stdout == ""
    [line] = out.stderr.splitlines()
    assert line.startswith("fleetctl") and len(line) < 200


@pytest.mark.parametrize(
    ("task", "rate", "error"),
    [
        ("\udcff", "1/s", "task must be UTF-8 text, not '\\udcff'"),  # the byte 0xff
        ("tasks.add", "١/s", "rate '١/s' is not N, N/s, N/m or N/h"),
        ("tasks.add", "１０/m", "rate '１０/m' is not N, N/s, N/m or N/h"),
        ("tasks.add", "0." + "0" * 400 + "1/s", "is too small"),
    ],
)
def test_fleetctl_rate_limit_refuses_what_no_node_would_keep_in_one_line(
    make_fleet: Callable[..., Fleet], task: str, rate: str, error: str
) -> None:
    """A name no broker can store was set on every node, as revoke refuses it; digits of
    other scripts were read as numbers, and a rate too small for a float cleared the limit."""
    out = make_fleet().ctl("rate-limit", task, rate, check=False)
    assert (out.returncode, out.stdout) == (2, "")
    assert out.stderr.startswith("fleetctl: rate_limit: ") and error in out.stderr
    assert out.stderr.count("\n") == 1


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["pool", "grow", "١"], "argument N: not an integer: ١"),
        (["--timeout", "５", "ping"], "argument --timeout: not a number: ５"),
    ],
)
def test_fleetctl_reads_only_ascii_digits_as_numbers(
    make_fleet: Callable[..., Fleet], argv: list[str], error: str
) -> None:
    """int() and float() read the digits of every script: `pool grow ١` grew the pool by 1."""
    out = make_fleet().ctl(*argv, check=False)
    assert (out.returncode, out.stdout) == (2, "")
    assert out.stderr.rstrip("\n").endswith(error) and out.stderr.count("\n") == 1


LONG = "x" * 5000


def one_short_line(out: subprocess.CompletedProcess[str], code: int = 2) -> str:
    """The one line a refusal wrote (it exited `code`), checked to be short."""
    assert (out.returncode, out.stdout) == (code, ""), out.stderr[:300]
    [line] = out.stderr.splitlines()
    assert len(line) < 300, line[:300]
    return line


def test_fleetctl_revoke_quotes_an_oversized_signal_short(make_fleet: Callable[..., Fleet]) -> None:
    """The error line held all 5,000 characters of the signal's name."""
    out = make_fleet().ctl("revoke", "some-id", "--terminate", "--signal", LONG, check=False)
    assert one_short_line(out).startswith("fleetctl: revoke: unknown signal 'xxxxxxxxxx")


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["fleetctl", LONG], "fleetctl: error: argument command: invalid choice: 'xxxxxxxxxx"),
        (["fleetctl", "schedule", LONG], "fleetctl schedule: error: argument action: invalid"),
        (["fleetctl", "ping", LONG], "fleetctl: error: unrecognized arguments: xxxxxxxxxx"),
        (["fleetctl", "ping", *["x"] * 3000], "fleetctl: error: unrecognized arguments: x x x"),
        (
            ["fleetctl", "ping", "a\nb\x1b[2J"],
            "fleetctl: error: unrecognized arguments: a\\nb\\x1b",
        ),
        (["fleetctl", "--json=" + LONG, "ping"], "fleetctl: error: argument --json: ignored"),
        (["fleetd", LONG], "fleetd: error: argument command: invalid choice: 'xxxxxxxxxx"),
        (["fleetd", "check", "-c", "fleet.toml", LONG], "fleetd: error: unrecognized arguments"),
        (
            ["fleetd", "start", "-c", "fleet.toml", "--log-level", LONG],
            "fleetd start: error: argument --log-level: invalid choice: 'xxxxxxxxxx",
        ),
    ],
)
def test_a_usage_error_quotes_what_it_was_given_short_and_in_one_line(
    argv: list[str], error: str
) -> None:
    """argparse repeated the arguments whole: 5,000 characters, 3,000 words, or a newline
    (two lines) and a terminal's escape sequence in "unrecognized arguments"."""
    command = FLEETCTL if argv[0] == "fleetctl" else FLEETD
    out = subprocess.run([command, *argv[1:]], capture_output=True, text=True, timeout=30)
    assert one_short_line(out).startswith(error)


@pytest.mark.parametrize(
    ("broker", "error"),
    [
        (f"redis://{'h' * 5000}:6379/0", "is no host name"),  # was a UnicodeError traceback
        (f"redis://127.0.0.1:6379/0?{'x' * 5000}=1", "unknown URL option"),
        (f"amqp://{'h' * 5000}", "unknown broker URL"),
    ],
)
def test_fleetctl_on_a_broker_url_it_cannot_use_says_so_short(broker: str, error: str) -> None:
    out = fleetctl_on(broker, "queues")
    assert (out.returncode, out.stdout) == (2, "")
    [line] = out.stderr.splitlines()
    assert error in line and len(line) < 300, line[:300]
