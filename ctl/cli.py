"""`fleetctl`: steer the fleet over the control plane, and submit and inspect tasks.

Which hosts it asks: every `--endpoint URL`, else those of the config (`-c` or $FLEET_CONFIG):
the host's own control endpoint (its ipc:// one if any) and the others' in `[control] endpoints`.

Keys, for tcp:// endpoints only (CurveZMQ; `fleetctl keygen DIR` writes a pair):
- this client's key pair is `--key FILE` ($FLEETCTL_KEY), a `fleet.key_secret`;
  its `fleet.key` must be in each server's `authorized_keys` folder;
- the servers' public key is `--server-key FILE` ($FLEETCTL_SERVER_KEY), the
  `fleet.key` of the pair the servers name in `curve_secret_key` (one server
  pair for the whole fleet).
Either defaults to the config's `curve_secret_key`: on a fleet host, with its
config, fleetctl uses the host's own pair (whose `fleet.key` must then be in
`authorized_keys` too).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import select
import sys
import termios
import time
import tty
from collections.abc import Callable, Iterable, Iterator
from typing import IO, TYPE_CHECKING, Any, cast

import supervisor.commands  # noqa: F401 - the host commands, to join the worker ones in the table
import worker.scheduler  # noqa: F401 - the schedule commands (cronsim loads only where used)
from ctl.render import (
    Output,
    add_iso_times,
    event_line,
    host_of,
    letter_json,
    letters_table,
    queues_table,
    reply_table,
    schedules_table,
    status_table,
    task_table,
)
from worker.arguments import EXIT_USAGE, Parser, finite, non_negative, positive
from worker.control import COMMANDS, OPTIONAL, REQUIRED, Arg, CommandError
from worker.logs import fill_standard_fds, one_line
from worker.version import VersionAction

if TYPE_CHECKING:  # made on first use (see Output): `--json` output never loads rich
    from rich.console import Console

EXIT_OK, EXIT_FAILED = 0, 1  # and EXIT_USAGE (2), from worker.arguments
TOP_EVERY = 1.0  # seconds between refreshes of `top`
PIPE_WIDTH = 200  # columns of tables into a pipe or a file: long lines, for grep, not wrapped


class UsageError(Exception):
    """Bad arguments or config: exit 2 with one line."""


def word_type(arg: Arg) -> Callable[[str], Any]:
    """The argparse `type` of a table argument: its own parse, a usage error if it fails."""

    def parse(word: str) -> Any:
        try:
            return arg.parse(word)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


count = word_type(Arg((int,), minimum=1))


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="fleetctl", description="Steer a fleetd fleet and its queue.")
    p.add_argument("--version", action=VersionAction)
    p.add_argument(
        "-c",
        "--config",
        default=os.environ.get("FLEET_CONFIG"),
        help="the fleet's config (default: $FLEET_CONFIG)",
    )
    p.add_argument(
        "--endpoint",
        action="append",
        default=[],
        help="a host's control endpoint to ask (repeatable; default: the config's)",
    )
    p.add_argument(
        "--timeout",
        type=positive,
        default=1.0,
        help="seconds to wait for the hosts' answers (default: 1)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--key",
        default=os.environ.get("FLEETCTL_KEY"),
        help="tcp:// only: this client's fleet.key_secret (default: $FLEETCTL_KEY, else"
        " the config's curve_secret_key)",
    )
    p.add_argument(
        "--server-key",
        default=os.environ.get("FLEETCTL_SERVER_KEY"),
        help="tcp:// only: the servers' public fleet.key (default: $FLEETCTL_SERVER_KEY,"
        " else the config's curve_secret_key)",
    )
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    groups = add_control_lines(sub)
    tail = groups["events"].add_parser("tail", help="print task events as they arrive")
    add_dest(tail).set_defaults(handler=cmd_tail)
    add_dest(sub.add_parser("top", help="the status table, live")).set_defaults(handler=cmd_top)
    call = add_dest(sub.add_parser("call", help="run a custom @control_command"))
    call.add_argument("name")
    call.add_argument(
        "args", nargs="*", metavar="KEY=VALUE", help="an argument (VALUE is JSON, else a string)"
    )
    call.set_defaults(handler=control_command)
    submit = sub.add_parser("submit", help="submit a task")
    submit.add_argument("task")
    submit.add_argument("args", nargs="*", help="positional arguments (JSON values, else strings)")
    submit.add_argument("--kwargs", default="{}", help="a JSON object")
    submit.add_argument("--queue")
    submit.add_argument("--countdown", type=finite)
    submit.add_argument("--wait", type=non_negative, help="wait up to S seconds for the result")
    submit.set_defaults(handler=cmd_submit)
    result = sub.add_parser("result", help="a task's state and result")
    result.add_argument("id")
    result.add_argument("--wait", type=non_negative)
    result.set_defaults(handler=cmd_result)
    queues = sub.add_parser("queues", help="queue depths, scheduled tasks, dead letters")
    queues.set_defaults(handler=cmd_queues)
    dead = sub.add_parser("dead", help="the dead-letter list: list, retry or purge it")
    dead.set_defaults(handler=cmd_dead)
    dead_sub = dead.add_subparsers(dest="action", required=True, parser_class=Parser)
    dead_sub.add_parser("list", help="every dead letter, newest first")
    retry = dead_sub.add_parser("retry", help="put dead letters back as new tasks (PENDING)")
    retry.add_argument("ids", nargs="*", metavar="ID")
    retry.add_argument("--all", action="store_true", help="every dead letter")
    purge = dead_sub.add_parser("purge", help="delete every dead letter")
    purge.add_argument("--yes", action="store_true", help="yes, delete them all")
    keygen = sub.add_parser("keygen", help="write a CurveZMQ key pair into DIR")
    keygen.add_argument("dir")
    keygen.set_defaults(handler=cmd_keygen)
    dashboard = sub.add_parser("dashboard", help="serve a web dashboard of the fleet until TERM")
    dashboard.add_argument(
        "--bind", help="HOST:PORT to listen on (default: [dashboard] bind, else 127.0.0.1:9810)"
    )
    dashboard.set_defaults(handler=cmd_dashboard)
    for group in [sub, dead_sub, *groups.values()]:
        for command in group.choices.values():
            add_global_options(command)  # the global options also after the command
    return p


# The two-word command lines of the table, by their first word (`pool grow`, `pool shrink`).
GROUPS = {
    "inspect": "what nodes run, hold and know",
    "pool": "grow or shrink pools (shrink retires idle children)",
    "events": "turn task events on or off; tail them",
    "schedule": "list, pause, resume or trigger the [[schedule]] entries (in the broker)",
}


def add_control_lines(sub: Any) -> dict[str, Any]:
    """A parser for each command line of the command table, under `sub`: a word (`rate-limit`)
    or a group's word (`pool grow`); returns the subparsers of each group."""
    groups: dict[str, Any] = {}
    for command in COMMANDS.values():
        for words, fixed in command.lines.items():
            group, _, word = words.rpartition(" ")
            if group and group not in groups:
                parent = sub.add_parser(group, help=GROUPS[group])
                groups[group] = parent.add_subparsers(
                    dest="action", required=True, parser_class=Parser
                )
            line = (groups[group] if group else sub).add_parser(word, help=command.help)
            line.set_defaults(handler=control_command, control=command.name, fixed=fixed)
            for key, arg in command.args.items():
                if key not in fixed:
                    add_argument(line, key, arg)
            if "dest" in command.envelope:
                add_dest(line)
            if "limit" in command.envelope:
                line.add_argument("--limit", type=count, help="return once this many nodes replied")
    return groups


def add_argument(line: argparse.ArgumentParser, key: str, arg: Arg) -> None:
    """A table argument as fleetctl takes it: a positional if REQUIRED (a list: one word or
    more) or `positional` (then it may be left out), else an --option (a bool: a flag).
    OPTIONAL ones left out are not sent."""
    default = argparse.SUPPRESS if arg.default is OPTIONAL else arg.default
    flag = "--" + key.replace("_", "-")
    if arg.types == (bool,):
        line.add_argument(flag, dest=key, action="store_true", default=default, help=arg.help)
    elif arg.default is REQUIRED:
        nargs = "+" if list in arg.types else None
        line.add_argument(key, nargs=nargs, type=word_type(arg), metavar=key.upper(), help=arg.help)
    elif arg.positional:
        line.add_argument(
            key, nargs="?", type=word_type(arg), default=default, metavar=key.upper(), help=arg.help
        )
    else:
        line.add_argument(flag, dest=key, type=word_type(arg), default=default, help=arg.help)


def add_dest(line: argparse.ArgumentParser) -> argparse.ArgumentParser:
    line.add_argument(
        "--dest", action="append", help="a node (name@host) or a host: every node on it; repeatable"
    )
    return line


def add_global_options(command: argparse.ArgumentParser) -> None:
    command.add_argument("-c", "--config", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    command.add_argument(
        "--timeout", type=positive, default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )
    command.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )
    command.add_argument(  # its own dest: argparse would put it in place of those before
        "--endpoint",
        action="append",
        dest="endpoint_after",
        default=argparse.SUPPRESS,
        help=argparse.SUPPRESS,
    )
    command.add_argument("--key", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    command.add_argument("--server-key", default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def main(argv: list[str] | None = None) -> int:
    from worker.brokers.base import BrokerUnavailable

    fill_standard_fds()
    args = build_parser().parse_args(argv)
    args.endpoint = [*args.endpoint, *getattr(args, "endpoint_after", [])]
    console = cast("Console", Output(width=None if sys.stdout.isatty() else PIPE_WIDTH))
    try:
        return int(args.handler(args, console))
    except UsageError as exc:
        print(f"fleetctl: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokerUnavailable as exc:
        print(f"fleetctl: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_OK if args.command in STREAMS else EXIT_FAILED
    except OSError as exc:
        if exc.filename is None and exc.errno == errno.EPIPE:  # `| head`: the reader left
            drop_output()  # quietly, as Python's own tools; a stream's end, as Ctrl-C
            return EXIT_OK if args.command in STREAMS else EXIT_FAILED
        if exc.filename is None and exc.errno in OUTPUT_ERRORS:  # a full disk
            output_failed(exc)
        else:  # a file or folder of its own that it cannot use
            print(f"fleetctl: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except Exception as exc:
        if not refused_by_broker(exc):
            raise
        print(f"fleetctl: the broker refused: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED


# The commands that print until stopped: Ctrl-C, or the reader of their pipe gone, is their end.
STREAMS = ("top", "events")

# How writing fleetctl's output fails, said in one line: a full disk (or quota, or file
# size), an I/O error. A reader gone (EPIPE) is said only by submit, whose task id it loses.
OUTPUT_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO)


def output_failed(exc: OSError, done: str = "") -> None:
    """One line on stderr for output that could not be written, saying what was `done`
    all the same (a submit's task is stored); and stdout onto /dev/null, so that the
    interpreter's exit does not fail on it again with a traceback."""
    drop_output()
    with contextlib.suppress(OSError):
        what = exc.strerror or str(exc)
        print(f"fleetctl: {done}cannot write the output: {what}", file=sys.stderr)


def drop_output() -> None:
    """stdout onto /dev/null: what is buffered for it is dropped, not written at exit."""
    with contextlib.suppress(OSError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def refused_by_broker(exc: BaseException) -> bool:
    """`exc` is the broker's own answer to a call (a Redis user whose ACL denies a command,
    a SQLite file that turned unreadable): one line, not a traceback. redis-py is looked
    for only where it was loaded, so that a SQLite fleet's fleetctl never imports it."""
    import sqlite3

    redis = sys.modules.get("redis.exceptions")
    kinds = (sqlite3.Error, *((redis.RedisError,) if redis is not None else ()))
    return isinstance(exc, kinds)


# --- the queue: straight to the broker ---------------------------------------------
def load_config(args: argparse.Namespace) -> Any:
    from supervisor.config import ConfigError, load

    if not args.config:
        raise UsageError("no config: pass -c CONFIG or set FLEET_CONFIG")
    try:
        return load(args.config, check_imports=False)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None


def make_client(args: argparse.Namespace) -> Any:
    """A Client of the config's broker (else $FLEET_BROKER's) that gives up within seconds
    on a broker it cannot reach, raising BrokerUnavailable."""
    from worker import Client

    if not args.config and os.environ.get("FLEET_BROKER"):
        client = Client(os.environ["FLEET_BROKER"], fail_fast=True)
        source = "FLEET_BROKER"
    else:
        config = load_config(args)
        client = Client(
            config.broker,
            durability=config.durability,
            result_ttl=config.result_ttl,
            fail_fast=True,
        )
        source = f"{config.path}: fleet.broker"
    try:
        client.broker  # noqa: B018 - opened now: a URL of no known scheme is a usage error
    except ValueError as exc:
        raise UsageError(f"{source}: {exc}") from None
    return client


def parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        if "Exceeds the limit" in str(exc):  # a whole number past int's digits: no string
            raise UsageError(f"argument {text:.20}...: {exc}") from None
        return text
    except RecursionError:
        raise UsageError(f"argument {text:.20}... is JSON nested too deep") from None


def cmd_submit(args: argparse.Namespace, console: Console) -> int:
    try:
        kwargs = json.loads(args.kwargs)
    except ValueError as exc:
        raise UsageError(f"--kwargs is not JSON: {exc}") from None
    except RecursionError:
        raise UsageError("--kwargs is JSON nested too deep") from None
    if not isinstance(kwargs, dict):
        raise UsageError("--kwargs must be a JSON object")
    values = [parse_value(a) for a in args.args]
    client = make_client(args)
    try:
        handle = client.submit(
            args.task, *values, kwargs=kwargs, queue=args.queue, countdown=args.countdown
        )
    # A countdown past the calendar, a task over the size limit; an empty task name or queue.
    except (TypeError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    if args.wait is None:
        try:
            print(json.dumps({"id": handle.id}) if args.json else handle.id, flush=True)
        except OSError as exc:  # the task is stored: its id must not be lost with the output
            output_failed(exc, f"task {handle.id} submitted, but ")
            return EXIT_FAILED
        return EXIT_OK
    return show_result(client, handle.id, args.wait, args.json, console)


def cmd_result(args: argparse.Namespace, console: Console) -> int:
    if not args.id:
        raise UsageError("a task id must be a non-empty string, not ''")
    return show_result(make_client(args), args.id, args.wait, args.json, console)


def show_result(
    client: Any, task_id: str, wait: float | None, as_json: bool, console: Console
) -> int:
    from worker import TaskFailed, TaskRevoked

    handle = client.handle(task_id)
    code = EXIT_OK
    if wait is not None:
        try:
            handle.get(timeout=wait)
        except (TaskFailed, TaskRevoked, TimeoutError):
            code = EXIT_FAILED
    info = client.find(task_id)
    if info is None:
        print(
            f"fleetctl: no task {task_id:.80}: the broker never saw it (or its record expired)",
            file=sys.stderr,
        )
        return EXIT_FAILED
    if info.get("state") in ("FAILURE", "REVOKED"):  # as --wait says of them
        code = EXIT_FAILED
    if as_json:
        print(json.dumps(info))
    else:
        console.print(task_table(info))
    return code


def cmd_queues(args: argparse.Namespace, console: Console) -> int:
    client = make_client(args)
    depths = client.depths()
    dead = client.dead_letters(limit=50)
    if args.json:
        queues = {
            d.queue: {"ready": d.ready, "scheduled": d.scheduled, "reserved": d.reserved}
            for d in depths
        }
        print(json.dumps({"queues": queues, "dead_letters": [letter_json(d) for d in dead]}))
        return EXIT_OK
    console.print(queues_table(depths))
    console.print(letters_table(dead, f"dead letters ({len(dead)} newest)"))
    return EXIT_OK


def cmd_dead(args: argparse.Namespace, console: Console) -> int:
    if args.action == "retry" and bool(args.ids) == args.all:
        raise UsageError("dead retry: give the IDs to retry, or --all (not both)")
    if args.action == "purge" and not args.yes:
        raise UsageError("dead purge deletes every dead letter for good: add --yes")
    client = make_client(args)
    if args.action == "list":
        dead = client.dead_letters(limit=None)
        if args.json:
            print(json.dumps({"dead_letters": [letter_json(d) for d in dead]}))
        else:
            console.print(letters_table(dead, f"dead letters ({len(dead)})"))
        return EXIT_OK
    if args.action == "purge":
        purged = client.purge_dead()
        print(json.dumps({"purged": purged}) if args.json else f"purged {purged} dead letters")
        return EXIT_OK
    return show_retried(client.retry_dead(None if args.all else args.ids), args.json)


def show_retried(outcomes: dict[str, str | None], as_json: bool) -> int:
    """Each id retried, on stdout, and each that could not be, with why, on stderr."""
    retried = [task_id for task_id, problem in outcomes.items() if problem is None]
    failed = {task_id: problem for task_id, problem in outcomes.items() if problem}
    if as_json:
        print(json.dumps({"retried": retried, "failed": failed}))
    else:
        for task_id in retried:  # ids of the broker's letters: anybody's text
            print(f"{one_line(task_id)}: back on its queue, PENDING")
        for task_id, problem in failed.items():
            print(f"fleetctl: {one_line(task_id)}: {problem}", file=sys.stderr)
        if not outcomes:
            print("no dead letters")
    return EXIT_FAILED if failed else EXIT_OK


def cmd_keygen(args: argparse.Namespace, console: Console) -> int:
    from supervisor.keys import keygen

    try:
        public, secret = keygen(args.dir)
    except (FileExistsError, OSError) as exc:
        raise UsageError(str(exc)) from None
    if args.json:
        print(json.dumps({"public": str(public), "secret": str(secret)}))
    else:
        print(f"public key: {public}\nsecret key: {secret} (mode 0600)")
    return EXIT_OK


def cmd_dashboard(args: argparse.Namespace, console: Console) -> int:
    from ctl.dashboard import DashboardError, checked_start, serve

    config = load_config(args)
    try:
        # A bind or token that will not do is refused before any connection is made.
        host, port, token = checked_start(
            args.bind or config.dashboard.bind, config.dashboard.token_file
        )
        with open_control(args) as control:
            serve(control, make_client(args), config, host, port, token)
    except DashboardError as exc:
        raise UsageError(str(exc)) from None
    except ModuleNotFoundError as exc:
        if exc.name not in ("starlette", "uvicorn"):
            raise
        raise UsageError(
            f"the dashboard needs its extra: pip install 'fleetd[dashboard]' (no module {exc.name})"
        ) from None
    return EXIT_OK


# --- the control plane -------------------------------------------------------------------
def control_request(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """The table's command and the arguments a fleetctl command line stands for, held to
    that command's own check (a usage error if they fail it): fleetctl cannot ask for what
    the nodes would refuse."""
    if args.command == "call":
        return args.name, dict(key_value(a) for a in args.args)
    command = COMMANDS[args.control]
    request = {key: getattr(args, key) for key in command.args if hasattr(args, key)}
    request.update(args.fixed)
    try:
        command.validate(request)
    except CommandError as exc:
        raise UsageError(str(exc)) from None
    return command.name, request


def key_value(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise UsageError(f"{text!r:.80}: give arguments as KEY=VALUE")
    return key, parse_value(value)


def open_control(args: argparse.Namespace, timeout: float | None = None) -> Any:
    """A ControlClient for the hosts and keys the command line and the config name, that
    waits `timeout` (default: --timeout) for them."""
    from ctl.client import ControlClient
    from supervisor.control import ControlConfigError
    from supervisor.keys import KeyFileError, load_keypair, load_public

    endpoints = list(args.endpoint)
    tcp = any(e.startswith("tcp://") for e in endpoints)
    config = None
    if not endpoints or (tcp and not (args.key and args.server_key) and args.config):
        config = load_config(args)
    hosts: dict[str, str] = {}
    own: list[str] = []
    if config is not None and not endpoints:
        own = [b for b in config.control.bind if b.startswith("ipc://")] or config.control.bind[:1]
        hosts = {**config.control.hosts, **{e: config.node for e in own}}
        endpoints = own + config.control.endpoints
    client_keys = server_keys = None
    if any(e.startswith("tcp://") for e in endpoints):
        default = config.control.curve_secret_key if config is not None else ""
        key_file, server_key_file = args.key or default, args.server_key or default
        if not key_file or not server_key_file:
            raise UsageError(
                "tcp:// endpoints need --key (this client's fleet.key_secret) and"
                " --server-key (the servers' fleet.key), or a config with"
                " curve_secret_key"
            )
        try:
            client_keys = load_keypair(key_file)
            server_public = load_public(server_key_file)
        except KeyFileError as exc:
            raise UsageError(str(exc)) from None
        server_keys = {e: server_public for e in endpoints if e.startswith("tcp://")}
    try:
        return ControlClient(
            endpoints, timeout or args.timeout, client_keys, server_keys, hosts, own
        )
    except ControlConfigError as exc:
        raise UsageError(str(exc)) from None


def control_command(args: argparse.Namespace, console: Console) -> int:
    cmd, cmd_args = control_request(args)
    if cmd in COMMANDS and COMMANDS[cmd].scope == "broker":  # a custom one (`call`) is not
        return broker_command(args, cmd, cmd_args, console)
    # `start` names its nodes as arguments, the other commands with --dest: either way only
    # their hosts are asked (the hosts' `start` reads its arguments, never dest).
    dest = cmd_args["nodes"] if args.command == "start" else getattr(args, "dest", None)
    limit = getattr(args, "limit", None)
    ahead = revoked_ahead(args) if args.command == "revoke" else []
    with open_control(args) as client:
        if args.command == "status":
            result = fleet_status(client, dest)
        else:
            result = client.call(cmd, cmd_args, dest, limit)
    if not (limit and len(result.replies) >= limit):
        result.missing += unanswered(dest, result.replies, result.missing)
    if args.json:
        add_iso_times(result.replies.values())
        print(result.to_json(**({"revoked_ahead": ahead} if args.command == "revoke" else {})))
    elif args.command == "status":
        console.print(status_table(result))
    else:
        console.print(reply_table(cmd, result))
        for task_id in ahead:
            print(f"{task_id}: no such task yet: revoked ahead, it will never start")
    return EXIT_FAILED if failed(result) else EXIT_OK


def broker_command(
    args: argparse.Namespace, cmd: str, cmd_args: dict[str, Any], console: Console
) -> int:
    """A command of the table that fleetctl runs itself, on the config's broker."""
    effect = COMMANDS[cmd].effect
    assert effect is not None
    schedules = load_config(args).schedules
    try:
        reply = effect(make_client(args).broker, schedules, **cmd_args)
    except CommandError as exc:
        print(f"fleetctl: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        add_iso_times(reply.get("schedules", []))
        print(json.dumps(reply))
    elif cmd == "schedule_list":
        console.print(schedules_table(reply))
    else:
        print(reply["ok"])
    return EXIT_OK


def revoked_ahead(args: argparse.Namespace) -> list[str]:
    """The ids of a revoke that the broker has never seen (it still revokes them, for good).

    Without a broker to ask (no config), or one that does not answer, none: the nodes'
    replies say what became of the revoke."""
    from worker.brokers.base import BrokerUnavailable

    try:
        client = make_client(args)
    except UsageError:
        return []
    try:
        return [task_id for task_id in dict.fromkeys(args.ids) if client.find(task_id) is None]
    except BrokerUnavailable:
        return []
    finally:
        client.close()


def unanswered(
    dest: list[str] | None, replies: dict[str, Any], missing: Iterable[str] = ()
) -> list[str]:
    """The nodes and hosts of --dest that no reply came from, each once; none of a host
    already named in `missing` (the silent hosts): that names it."""
    silent = set(missing)
    return [
        d
        for d in dict.fromkeys(dest or ())
        if d not in replies
        and host_of(d) not in silent
        and not any(host_of(n) == d for n in replies)
    ]


def failed(result: Any) -> bool:
    """Did a host not answer, or a node fail, or is one down?"""
    return bool(result.missing or result.errors) or any(
        isinstance(r, dict) and ("error" in r or r.get("state") in ("FATAL", "BACKOFF"))
        for r in result.replies.values()
    )


# --- status and top ------------------------------------------------------------------------
def fleet_status(client: Any, dest: list[str] | None) -> Any:
    """Every node as its arbiter sees it (down ones too), with the pool its worker reports."""
    from ctl.client import Result

    supervised = client.call("status", {}, dest)
    # A host that did not answer within the timeout is not waited for a second time: one
    # --timeout bounds the command.
    pools = client.call("stats", {}, dest, skip=supervised.missing)
    nodes = {}
    for node, view in supervised.replies.items():
        stats = pools.replies.get(node)
        if isinstance(view, dict) and isinstance(stats, dict):
            if isinstance(stats.get("children"), list):
                supervised_keys = ("state", "generation", "reload_failed")
                view = {**stats, **{k: view[k] for k in supervised_keys if k in view}}
            elif "error" in stats:  # the arbiter's own word on a node that is down comes first
                view = {"error": stats["error"], **view}
        nodes[node] = view
    return Result(
        nodes,
        sorted(set(supervised.missing) | set(pools.missing)),
        supervised.elapsed + pools.elapsed,
        {**pools.errors, **supervised.errors},
    )


def cmd_top(args: argparse.Namespace, console: Console) -> int:
    with open_control(args, timeout=min(args.timeout, TOP_EVERY)) as client:
        if args.json:
            return json_top(client, args.dest)
        return show_top(client, args.dest, console)


def json_top(client: Any, dest: list[str] | None) -> int:
    """`--json top`: what `--json status` prints, one line a second until interrupted."""
    while True:
        started = time.monotonic()
        result = fleet_status(client, dest)
        add_iso_times(result.replies.values())
        print(result.to_json(), flush=True)
        time.sleep(max(0.0, TOP_EVERY - (time.monotonic() - started)))


def show_top(client: Any, dest: list[str] | None, console: Console) -> int:
    """The status table, redrawn every second until `q` (from a terminal) or Ctrl-C; into a
    pipe or a file, one table after the other (as `top -b` does)."""
    from rich.live import Live

    screen = (
        Live(console=console, auto_refresh=False)
        if console.is_terminal
        else contextlib.nullcontext()
    )
    # Keys only for the live view: into a pipe, `q` is the pager's (and a job in the
    # background must not touch the terminal's modes).
    with screen as live, keys(sys.stdin if console.is_terminal else None) as keyboard:
        while True:
            started = time.monotonic()
            table = status_table(fleet_status(client, dest))
            if live is None:
                console.print(table)
                console.file.flush()
            else:
                live.update(table, refresh=True)
            if quit_pressed(keyboard, TOP_EVERY - (time.monotonic() - started)):
                return EXIT_OK


@contextlib.contextmanager
def keys(stream: IO[str] | None) -> Iterator[int | None]:
    """The descriptor of a terminal that sends each key as it is pressed (cbreak), put back
    as it was afterwards; None if `stream` is not a terminal."""
    if stream is None or not stream.isatty():
        yield None
        return
    fd = stream.fileno()
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)
    try:
        yield fd
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def quit_pressed(keyboard: int | None, seconds: float) -> bool:
    """Wait `seconds`; True as soon as q is pressed on the keyboard (if there is one)."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        if keyboard is None or not select.select([keyboard], [], [], left)[0]:
            time.sleep(max(0.0, deadline - time.monotonic()))
            return False
        pressed = os.read(keyboard, 64)
        if b"q" in pressed.lower():
            return True
        if not pressed:  # the terminal is gone: no more keys
            keyboard = None
    return False


# --- events --------------------------------------------------------------------------------
def cmd_tail(args: argparse.Namespace, console: Console) -> int:
    with open_control(args) as client:
        return tail_events_of_fleet(client, args.dest, args.timeout, args.json)


def tail_events_of_fleet(client: Any, dest: list[str] | None, timeout: float, as_json: bool) -> int:
    """Subscribe, then ping: if no node answers within `timeout` there is nothing to tail
    (exit 1); hosts that stay silent are named, and the others' events are tailed."""
    from supervisor.control import ControlConfigError

    try:
        events = client.subscribe_events()
    except ControlConfigError as exc:  # an endpoint whose events have no port: tcp://h:65535
        raise UsageError(str(exc)) from None
    answer = client.call("ping", {}, dest)
    silent = answer.missing + list(answer.errors) + unanswered(dest, answer.replies)
    if not answer.replies:
        print(
            f"fleetctl: no node answered within {timeout:g}s"
            f" ({', '.join(silent) or 'no such node'}): no events to tail",
            file=sys.stderr,
        )
        return EXIT_FAILED
    if silent:
        print(f"fleetctl: no answer from {', '.join(silent)}; tailing the others", file=sys.stderr)
    return tail_events(events, dest, as_json)


def tail_events(events: Iterable[dict[str, Any]], dest: list[str] | None, as_json: bool) -> int:
    """Print events as they arrive (of the --dest nodes or hosts only, if given), until Ctrl-C."""
    for event in events:
        node = str(event.get("node", ""))
        if dest and node not in dest and host_of(node) not in dest:
            continue
        print(json.dumps(event) if as_json else event_line(event), flush=True)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
