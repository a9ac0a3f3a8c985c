"""fleetctl's command lines and rendering, mostly without a fleet: what each line asks for,
and shows."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from ctl import cli
from ctl.client import Result
from ctl.render import describe, queues_table, reply_table, status_table, task_table
from supervisor.keys import keygen
from tests.fleet import FLEETCTL, Fleet, silent_host
from worker.brokers.base import QueueDepth
from worker.client import Client
from worker.control import COMMANDS, CommandError


def request(*argv: str) -> tuple[str, dict[str, Any]]:
    return cli.control_request(cli.build_parser().parse_args(list(argv)))


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["ping"], ("ping", {})),
        (
            ["rate-limit", "tasks.resize", "200/m"],
            ("rate_limit", {"task": "tasks.resize", "rate": "200/m"}),
        ),
        (
            ["rate-limit", "tasks.resize", "0"],
            ("rate_limit", {"task": "tasks.resize", "rate": "0"}),
        ),
        (
            ["time-limit", "tasks.resize", "--soft", "1", "--hard", "2"],
            ("time_limit", {"task": "tasks.resize", "soft": 1.0, "hard": 2.0}),
        ),
        (
            ["revoke", "a", "b"],
            ("revoke", {"ids": ["a", "b"], "terminate": False, "signal": "TERM"}),
        ),
        (
            ["revoke", "a", "--terminate", "--signal", "KILL"],
            ("revoke", {"ids": ["a"], "terminate": True, "signal": "KILL"}),
        ),
        (["inspect", "active"], ("active", {})),
        (["inspect", "conf"], ("conf", {})),
        (["events", "enable"], ("events", {"enable": True})),
        (["events", "disable"], ("events", {"enable": False})),
        (["pool", "grow"], ("pool_grow", {"n": 1})),
        (["pool", "shrink", "3"], ("pool_shrink", {"n": 3})),
        (["shutdown", "--dest", "h2"], ("shutdown", {})),
        (
            ["call", "hello", "who=ops", "n=3", "tags=[1, 2]", "raw={x"],
            ("hello", {"who": "ops", "n": 3, "tags": [1, 2], "raw": "{x"}),
        ),
    ],
)
def test_each_command_line_stands_for_one_registry_command(argv: list[str], expected: Any) -> None:
    assert request(*argv) == expected


@pytest.mark.parametrize(
    "argv",
    [
        ["rate-limit", "tasks.resize", "fast"],
        ["time-limit", "tasks.resize", "--soft", "3", "--hard", "2"],
        ["time-limit", "tasks.resize", "--soft", "-1", "--hard", "2"],
        ["revoke", "a", "--signal", "NOPE"],
        ["revoke", "a", "--signal", "²"],  # a digit to Python: int() raised
        ["revoke", "a", "--signal", "9" * 5000],
        ["time-limit", "tasks.resize"],
        ["call", "hello", "who"],
        ["call", "hello", "=x"],
    ],
)
def test_bad_arguments_are_usage_errors(argv: list[str]) -> None:
    with pytest.raises(cli.UsageError):
        request(*argv)


@pytest.mark.parametrize(
    "argv",
    [
        ["--timeout", "0", "ping"],
        ["--timeout", "nan", "ping"],
        ["ping", "--limit", "0"],
        ["pool", "grow", "0"],
        ["time-limit", "tasks.resize", "--soft", "nan", "--hard", "2"],
        ["time-limit", "tasks.resize", "--soft", "1", "--hard", "inf"],
        ["inspect", "everything"],
        ["nonsense"],
        ["submit", "tasks.add", "--countdown", "nan"],
        ["submit", "tasks.add", "--wait", "inf"],
        ["result", "some-id", "--wait", "-1"],
        ["result", "some-id", "--wait", "nan"],
    ],
)
def test_bad_command_lines_exit_2(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.build_parser().parse_args(argv)
    assert exit_.value.code == cli.EXIT_USAGE


def test_dest_that_nothing_answered_for_is_named() -> None:
    replies = {"a@h1": {}, "b@h1": {}, "c@h2": {}}
    assert cli.unanswered(["a@h1", "h2", "x@h1", "h3"], replies) == ["x@h1", "h3"]
    assert cli.unanswered(None, replies) == []
    # A node or host of a silent host that `missing` names already, or one named twice: once.
    assert cli.unanswered(["c@h3", "h3", "x@h1", "x@h1"], replies, ["h3"]) == ["x@h1"]


def test_a_node_error_a_down_node_or_a_silent_host_is_a_failure() -> None:
    def result(replies: dict[str, Any], missing: list[str] | None = None) -> Result:
        return Result(replies, missing or [], 0.001)

    assert not cli.failed(result({"a@h1": {"ok": "pong"}, "b@h1": {"state": "RUNNING"}}))
    assert cli.failed(result({"a@h1": {"error": "no reply before the deadline"}}))
    assert cli.failed(result({"a@h1": {"state": "FATAL"}}))
    assert cli.failed(result({}, ["h2"]))
    assert cli.failed(Result({}, [], 0.0, {"h1": "unknown command 'x'"}))


def test_replies_read_as_text() -> None:
    assert describe({"ok": "pong"}) == "pong"
    assert describe([]) == "-"
    assert describe(["tasks.add", "tasks.sleep"]) == "tasks.add\ntasks.sleep"
    assert describe([{"id": "t1", "runtime": 1.23456}]) == "id=t1  runtime=1.235"
    assert describe({"ok": "revoked 1", "terminated": []}) == "ok: revoked 1\nterminated: -"


def render(table: Any) -> str:
    console = Console(width=160, record=True)
    console.print(table)
    return console.export_text()


def test_reply_table_names_nodes_errors_and_silent_hosts() -> None:
    result = Result(
        {"a@h1": {"ok": "pong"}, "b@h1": {"error": "no reply before the deadline"}},
        ["tcp://h2:7950"],
        0.0021,
        {"h3": "unknown command 'x'"},
    )
    text = render(reply_table("ping", result))
    for words in (
        "ping (2.1 ms)",
        "a@h1",
        "pong",
        "no reply before the deadline",
        "tcp://h2:7950",
        "no reply",
        "h3",
        "unknown command 'x'",
    ):
        assert words in text


def test_status_table_groups_nodes_by_host_with_children_rss_and_uptime() -> None:
    running = {
        "pid": 10,
        "state": "RUNNING",
        "rss": 30 << 20,
        "uptime": 3725.0,
        "succeeded": 5,
        "failed": 1,
        **{"pool_size": 3, "pool_min": 2, "pool_max": 8},
        "children": [
            {
                "pid": 11,
                "state": "busy",
                "task": "0123456789",
                "task_name": "tasks.resize",
                "runtime": 2.5,
                "rss": 20 << 20,
                "uptime": 100.0,
                "tasks_done": 6,
            },
            {"pid": 12, "state": "idle", "task": None, "rss": None, "uptime": 5.0, "tasks_done": 0},
        ],
    }
    down = {"node": "email@h2", "pid": 0, "state": "FATAL", "uptime": None}
    text = render(status_table(Result({"images@h1": running, "email@h2": down}, ["h3"], 0.004)))
    lines = text.splitlines()
    order = [
        next(i for i, line in enumerate(lines) if word in line)
        for word in ("h1", "images@h1", "h2")
    ]
    assert order == sorted(order)
    for words in (
        "RUNNING",
        "30 MiB",
        "1h02m",
        "tasks.resize 01234567 (2.5s)",
        "pool 3 in 2..8",
        "20 MiB",
        "FATAL",
        "h3",
        "no reply",
    ):
        assert words in text, words
    node_row = next(line for line in lines if "images@h1" in line)
    assert [cell.strip() for cell in node_row.split("│")][-2] == "6"  # done: succeeded + failed


def test_tail_prints_one_line_per_event_and_filters_by_dest(
    capsys: pytest.CaptureFixture[str],
) -> None:
    events = [
        {"type": "task-started", "node": "a@h1", "ts": 1.5, "id": "t1", "name": "tasks.add"},
        {"type": "worker-heartbeat", "node": "b@h2", "ts": 2.0, "active": 0},
        {
            "type": "task-failed",
            "node": "c@h1",
            "ts": 3.0,
            "id": "t2",
            "name": "tasks.x",
            "exc_type": "ValueError",
        },
    ]
    assert cli.tail_events(events, ["h1"], as_json=False) == cli.EXIT_OK
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert lines[0].endswith("a@h1 task-started tasks.add t1")
    assert lines[1].endswith("c@h1 task-failed tasks.x t2 exc_type=ValueError")
    cli.tail_events(events, ["b@h2"], as_json=True)
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == [events[1]]


def write_config(folder: Path, control: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "fleet.toml"
    config.write_text(f'[fleet]\nnode = "h1"\n\n[control]\n{control}\n\n[[worker]]\nname = "w"\n')
    return config


def test_tcp_endpoints_without_keys_are_a_usage_error(tmp_path: Path) -> None:
    args = cli.build_parser().parse_args(["--endpoint", "tcp://127.0.0.1:7950", "ping"])
    args.key = args.server_key = args.config = None
    with pytest.raises(cli.UsageError, match="--key"):
        cli.open_control(args)


def test_keys_default_to_the_config_and_the_own_host_is_named(tmp_path: Path) -> None:
    public, secret = keygen(tmp_path / "server")
    (tmp_path / "authorized").mkdir()
    config = write_config(
        tmp_path,
        f'bind = ["tcp://127.0.0.1:7950"]\ncurve_secret_key = "{secret}"\n'
        f'authorized_keys = "{tmp_path / "authorized"}"',
    )
    args = cli.build_parser().parse_args(["-c", str(config), "--timeout", "0.05", "ping"])
    args.key = args.server_key = None
    with cli.open_control(args) as client:
        result = client.call("ping")
    assert result.missing == ["h1"]  # nobody listens; the config names the host behind it
    args = cli.build_parser().parse_args(["-c", str(config), "--key", str(public), "ping"])
    with pytest.raises(cli.UsageError, match="secret"):
        cli.open_control(args)


INSPECTED = ["active", "reserved", "scheduled", "registered", "stats", "revoked", "conf"]
# Every control command line of DESIGN section 6, with each of its flags.
DESIGN_LINES = [
    ["ping", "--dest", "a@h1", "--dest", "h2", "--limit", "2"],
    ["shutdown", "--dest", "a@h1"],
    ["reload", "--dest", "h1"],
    ["rate-limit", "tasks.add", "10/s", "--dest", "a@h1"],
    ["time-limit", "tasks.add", "--soft", "1", "--hard", "2", "--dest", "a@h1"],
    ["time-limit", "tasks.add", "--clear"],
    ["revoke", "id1", "id2", "--terminate", "--signal", "KILL"],
    *(["inspect", what, "--dest", "a@h1"] for what in INSPECTED),
    ["events", "enable", "--dest", "a@h1"],
    ["events", "disable"],
    ["pool", "grow", "2", "--dest", "a@h1"],
    ["pool", "shrink"],
    ["status", "--dest", "h1"],
    ["start", "a@h1", "h2"],
    ["schedule", "list"],
    *(["schedule", verb, "nightly-report"] for verb in ("pause", "resume", "trigger")),
]


@pytest.mark.parametrize("argv", DESIGN_LINES, ids=" ".join)
def test_each_design_command_line_passes_its_commands_own_check(argv: list[str]) -> None:
    cmd, args = request(*argv)
    COMMANDS[cmd].validate(args)  # what the arbiter and the nodes run on the request


def test_every_command_line_of_the_table_is_a_design_one() -> None:
    table_lines = {words for command in COMMANDS.values() for words in command.lines}
    design = {" ".join(argv[:2] if argv[0] in cli.GROUPS else argv[:1]) for argv in DESIGN_LINES}
    assert table_lines == design


@pytest.mark.parametrize(
    ("cmd", "args", "error"),
    [
        ("time_limit", {"task": "t"}, "give soft and hard, or clear"),
        ("time_limit", {"task": "t", "soft": float("nan"), "hard": 2}, "finite"),
        ("time_limit", {"task": "t", "soft": 2, "hard": 1}, "soft below hard"),
        ("rate_limit", {"task": "t", "rate": "fast"}, "rate 'fast'"),
        ("rate_limit", {"task": "", "rate": "1/s"}, "task must be a task name"),
        ("rate_limit", {"task": "\udcff", "rate": "1/s"}, "task must be UTF-8 text"),
        ("rate_limit", {"task": "t", "rate": "١/s"}, "rate '١/s' is not N"),
        ("rate_limit", {"task": "t", "rate": "0." + "0" * 400 + "1/s"}, "too small"),
        ("time_limit", {"task": "", "soft": 1, "hard": 2}, "task must be a task name"),
        ("revoke", {"ids": []}, "non-empty list"),
        ("revoke", {"ids": ["a"], "signal": "NOPE"}, "unknown signal"),
        ("revoke", {"ids": ["a"], "signal": "²"}, "unknown signal"),
        ("start", {"nodes": [1]}, "nodes must be a list of strings"),
        ("pool_grow", {"n": 0}, "n must be >= 1"),
        ("pool_shrink", {"n": True}, "n must be an integer"),
        ("ping", {"_timeout": 2}, "unknown argument '_timeout'"),
    ],
)
def test_a_request_the_table_refuses_never_reaches_a_node(
    cmd: str, args: dict[str, Any], error: str
) -> None:
    """The arbiter runs `validate` before it sends a command on: these are the host's errors."""
    with pytest.raises(CommandError, match=error):
        COMMANDS[cmd].validate(args)


MARKUP = "[/x] [bold]loud[/bold] [link=http://x]y"  # rich markup, and a closing tag it refuses


def test_tables_show_names_errors_and_results_as_they_are() -> None:
    """A queue, a task name, an error or a result is anybody's text: shown as written, never
    read as rich markup (a `[/x]` in it ended `fleetctl queues` or `result` in a MarkupError)."""
    info = {
        "id": "t1",
        "name": MARKUP,
        "state": "FAILURE",
        "result": MARKUP,
        "exc_type": MARKUP,
        "exc_message": MARKUP,
        "deliveries": 1,
        "node": "w@h1",
    }
    text = render(task_table(info))
    assert text.count(MARKUP) == 4 and json.dumps(MARKUP) in text  # the result as JSON
    assert MARKUP in render(queues_table([QueueDepth(MARKUP, 1, 0, 0)]))


def test_tables_show_what_a_terminal_acts_on_as_escapes() -> None:
    """A task id, an error or a queue holding an escape sequence or a carriage return (as the
    README says of fleetctl's tables): written raw, it retitled the terminal, coloured it,
    or overwrote the row it was in."""
    forged = "s1\x1b]0;PWNED\x07\x1b[41mX\x1b[0m\rline2"
    info = {"id": forged, "name": "tasks.x", "state": "FAILURE", "exc_message": forged}
    for table in (task_table(info), queues_table([QueueDepth(forged, 1, 0, 0)])):
        text = render(table)
        assert "\x1b" not in text and "\r" not in text and "\x07" not in text
        assert "\\x1b]0;PWNED\\x07\\x1b[41mX" in text and "\\rline2" in text


def test_fleetctl_queues_and_result_show_a_markup_queue_and_name(tmp_path: Path) -> None:
    config = tmp_path / "fleet.toml"
    config.write_text('[fleet]\nbroker = "sqlite:///queue.db"\n[[worker]]\nname = "w"\n')
    client = Client.from_config(str(config))
    try:
        handle = client.submit(MARKUP, MARKUP, queue=MARKUP)
    finally:
        client.close()
    for argv in (["queues"], ["result", handle.id]):
        done = subprocess.run(
            [FLEETCTL, "-c", str(config), *argv],
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, "COLUMNS": "200"},
        )
        assert done.returncode == 0, done.stderr
        assert MARKUP in done.stdout, done.stdout


def test_a_reply_table_titled_by_anybodys_command_name_shows_it_as_it_is() -> None:
    """`fleetctl call '[/x]'`: the nodes answer that no such command exists; the table's
    title is the name as typed (it ended in a MarkupError)."""
    result = Result({"w@h1": {"error": f"unknown command {MARKUP!r}"}}, [], 0.001, {})
    text = render(reply_table(MARKUP, result))
    assert text.count(MARKUP) == 2, text


def test_tail_keeps_an_event_on_one_line_and_out_of_the_terminals_hands(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A task's name or error is anybody's text: a newline in it made two lines of one
    event, an escape sequence reached the operator's terminal as a command."""
    event = {
        "type": "task-failed",
        "node": "a@h1",
        "ts": 1.0,
        "id": "t1",
        "name": "tasks.x\n12:00:00.000 a@h1 task-succeeded forged",
        "exc_message": "\x1b]0;title\x07\x1b[31mred\tand tab",
    }
    cli.tail_events([event], None, as_json=False)
    [line] = capsys.readouterr().out.splitlines()
    assert "\x1b" not in line and "\t" not in line
    assert "tasks.x\\n12:00:00.000" in line and "\\x1b[31mred\\tand tab" in line


def test_dead_retry_names_each_id_on_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    """A dead letter's id is anybody's text: `dead retry --all` prints each on a line of
    its own, a newline or an escape sequence in it as its escape."""
    cli.show_retried({"t1\nforged: back": None, "t2\x1b[2J": "not a dead letter"}, False)
    out, err = capsys.readouterr()
    assert out == "t1\\nforged: back: back on its queue, PENDING\n"
    assert err == "fleetctl: t2\\x1b[2J: not a dead letter\n"


def test_fleetctl_result_of_a_revoked_task_fails_with_or_without_wait(tmp_path: Path) -> None:
    """`result ID --wait S` exited 1 for a REVOKED task, and `result ID` 0."""
    config = tmp_path / "fleet.toml"
    config.write_text('[fleet]\nbroker = "sqlite:///queue.db"\n[[worker]]\nname = "w"\n')
    client = Client.from_config(str(config))
    try:
        handle = client.submit("tasks.add", 1, 2)
        client.revoke([handle.id])  # queued: it ends REVOKED at once
    finally:
        client.close()
    for wait in ([], ["--wait", "1"]):
        done = subprocess.run(
            [FLEETCTL, "-c", str(config), "--json", "result", handle.id, *wait],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 1, (wait, done.stdout, done.stderr)
        assert json.loads(done.stdout)["state"] == "REVOKED"


def test_start_asks_the_hosts_of_its_nodes_only(
    make_fleet: Callable[..., Fleet], tmp_path: Path
) -> None:
    """`start w@h1` asked every host (its nodes are arguments, not --dest): a hung h9 made it
    wait out --timeout and exit 1 although w@h1 had started."""
    with silent_host(tmp_path) as control:
        fleet = make_fleet(extra=control).start()
        for named in ("w@h1", "h1"):
            began = time.monotonic()
            out = fleet.ctl("--json", "--timeout", "5", "start", named, check=False)
            assert time.monotonic() - began < 4, (named, out.stdout)
            answer = json.loads(out.stdout)
            assert answer["replies"] == {"w@h1": {"ok": "already RUNNING"}}, answer
            assert (out.returncode, answer["missing"]) == (0, []), answer
        # A node of the silent host is named by its host, once (it was h9, then w@h9 too).
        out = fleet.ctl("--json", "--timeout", "1", "ping", "--dest", "w@h9", check=False)
        assert (out.returncode, json.loads(out.stdout)["missing"]) == (1, ["h9"]), out.stdout
