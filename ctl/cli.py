"""`fleetctl`: steer the fleet over the control plane, and submit and inspect tasks.

Which hosts it asks: every `--endpoint URL`, else those of the config (`-c` or
$FLEET_CONFIG): the host's own control endpoint (its ipc:// one if it has one)
and the other hosts' in `[control] endpoints`.

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
import datetime
import json
import os
import select
import sys
import termios
import time
import tty
from collections.abc import Iterable, Iterator
from typing import IO, Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from supervisor.cli import version

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
INSPECT = ("active", "reserved", "scheduled", "registered", "stats", "revoked", "conf")
NODE_SHARE = 0.8  # of --timeout that a node gets: its host then still answers in time, naming it
TOP_EVERY = 1.0  # seconds between refreshes of `top`
PIPE_WIDTH = 200  # columns of tables into a pipe or a file: long lines, for grep, not wrapped
EPOCH_FIELDS = ("next_due",)  # reply fields in epoch seconds: a table shows them as times


class UsageError(Exception):
    """Bad arguments or config: exit 2 with one line."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="fleetctl", description="Steer a fleetd fleet and its queue.")
    p.add_argument("--version", action="version", version=f"fleetctl {version()}")
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

    def dest(cmd: argparse.ArgumentParser) -> argparse.ArgumentParser:
        cmd.add_argument(
            "--dest",
            action="append",
            help="a node (name@host) or a host: every node on it; repeatable",
        )
        return cmd

    ping = dest(sub.add_parser("ping", help="check that nodes answer"))
    ping.add_argument("--limit", type=count, help="return once this many nodes replied")
    dest(sub.add_parser("shutdown", help="warm-shut-down nodes or hosts (a host: as SIGTERM)"))
    dest(sub.add_parser("reload", help="graceful reload of hosts, fresh code (as SIGHUP)"))
    rl = dest(
        sub.add_parser("rate-limit", help="limit a task name to N/s, N/m or N/h per node; 0 clears")
    )
    rl.add_argument("task")
    rl.add_argument("rate")
    tl = dest(
        sub.add_parser(
            "time-limit",
            help="soft and hard time limits of a task name, for the tasks that start from now on",
        )
    )
    tl.add_argument("task")
    tl.add_argument("--soft", type=float, help="seconds; 0 = none")
    tl.add_argument("--hard", type=float, help="seconds; 0 = none")
    tl.add_argument("--clear", action="store_true", help="back to the task's own limits")
    rv = sub.add_parser("revoke", help="revoke task ids, for good: they never start")
    rv.add_argument("ids", nargs="+")
    rv.add_argument("--terminate", action="store_true", help="signal the child running one")
    rv.add_argument("--signal", default="TERM", help="with --terminate (default: TERM)")
    ins = dest(sub.add_parser("inspect", help="what nodes run, hold and know"))
    ins.add_argument("what", choices=INSPECT)
    ev = dest(sub.add_parser("events", help="turn task events on or off; tail them"))
    ev.add_argument("action", choices=("enable", "disable", "tail"))
    pool = dest(sub.add_parser("pool", help="grow or shrink pools (shrink retires idle children)"))
    pool.add_argument("action", choices=("grow", "shrink"))
    pool.add_argument("n", nargs="?", type=count, default=1)
    start = sub.add_parser("start", help="start FATAL or shut-down nodes again (no reload)")
    start.add_argument("dest", nargs="+", metavar="NODE", help="a node (name@host) or a host")
    dest(sub.add_parser("status", help="a table of hosts, nodes and children"))
    dest(sub.add_parser("top", help="the status table, live"))
    call = dest(sub.add_parser("call", help="run a custom @control_command"))
    call.add_argument("name")
    call.add_argument(
        "args", nargs="*", metavar="KEY=VALUE", help="an argument (VALUE is JSON, else a string)"
    )
    submit = sub.add_parser("submit", help="submit a task")
    submit.add_argument("task")
    submit.add_argument("args", nargs="*", help="positional arguments (JSON values, else strings)")
    submit.add_argument("--kwargs", default="{}", help="a JSON object")
    submit.add_argument("--queue")
    submit.add_argument("--countdown", type=float)
    submit.add_argument("--wait", type=float, help="wait up to S seconds for the result")
    result = sub.add_parser("result", help="a task's state and result")
    result.add_argument("id")
    result.add_argument("--wait", type=float)
    sub.add_parser("queues", help="queue depths, scheduled tasks, dead letters")
    dead = sub.add_parser("dead", help="the dead-letter list: list, retry or purge it")
    dead_sub = dead.add_subparsers(dest="action", required=True, parser_class=Parser)
    dead_sub.add_parser("list", help="every dead letter, newest first")
    retry = dead_sub.add_parser(
        "retry", help="put dead letters back on their queue as new tasks (PENDING)"
    )
    retry.add_argument("ids", nargs="*", metavar="ID")
    retry.add_argument("--all", action="store_true", help="every dead letter")
    purge = dead_sub.add_parser("purge", help="delete every dead letter")
    purge.add_argument("--yes", action="store_true", help="yes, delete them all")
    keygen = sub.add_parser("keygen", help="write a CurveZMQ key pair into DIR")
    keygen.add_argument("dir")
    for command in [*sub.choices.values(), *dead_sub.choices.values()]:
        add_global_options(command)  # the global options also after the command
    return p


def add_global_options(command: argparse.ArgumentParser) -> None:
    command.add_argument("-c", "--config", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    command.add_argument(
        "--timeout", type=positive, default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )
    command.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )


def main(argv: list[str] | None = None) -> int:
    from worker.brokers.base import BrokerUnavailable

    args = build_parser().parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else PIPE_WIDTH)
    try:
        handler = QUEUE_COMMANDS.get(args.command) or control_command
        return handler(args, console)
    except UsageError as exc:
        print(f"fleetctl: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokerUnavailable as exc:
        print(f"fleetctl: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_OK if args.command in ("top", "events") else EXIT_FAILED


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
    else:
        config = load_config(args)
        client = Client(
            config.broker,
            durability=config.durability,
            result_ttl=config.result_ttl,
            fail_fast=True,
        )
    try:
        client.broker  # noqa: B018 - opened now: a URL of no known scheme is a usage error
    except ValueError as exc:
        raise UsageError(f"FLEET_BROKER: {exc}") from None
    return client


def parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def cmd_submit(args: argparse.Namespace, console: Console) -> int:
    try:
        kwargs = json.loads(args.kwargs)
    except ValueError as exc:
        raise UsageError(f"--kwargs is not JSON: {exc}") from None
    if not isinstance(kwargs, dict):
        raise UsageError("--kwargs must be a JSON object")
    client = make_client(args)
    handle = client.submit(
        args.task,
        *[parse_value(a) for a in args.args],
        kwargs=kwargs,
        queue=args.queue,
        countdown=args.countdown,
    )
    if args.wait is None:
        print(json.dumps({"id": handle.id}) if args.json else handle.id)
        return EXIT_OK
    return show_result(client, handle.id, args.wait, args.json, console)


def cmd_result(args: argparse.Namespace, console: Console) -> int:
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
            f"fleetctl: no task {task_id}: the broker never saw it (or its record expired)",
            file=sys.stderr,
        )
        return EXIT_FAILED
    if info.get("state") == "FAILURE":
        code = EXIT_FAILED
    if as_json:
        print(json.dumps(info))
    else:
        table = Table(show_header=False)
        for key in (
            "id",
            "name",
            "state",
            "result",
            "exc_type",
            "exc_message",
            "deliveries",
            "node",
        ):
            if info.get(key) is not None:
                table.add_row(key, json.dumps(info[key]) if key == "result" else str(info[key]))
        console.print(table)
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
    table = Table(title="queues")
    for column in ("queue", "ready", "scheduled", "reserved"):
        table.add_column(column, justify="right" if column != "queue" else "left")
    for d in depths:
        table.add_row(d.queue, str(d.ready), str(d.scheduled), str(d.reserved))
    console.print(table)
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
        for task_id in retried:
            print(f"{task_id}: back on its queue, PENDING")
        for task_id, problem in failed.items():
            print(f"fleetctl: {task_id}: {problem}", file=sys.stderr)
        if not outcomes:
            print("no dead letters")
    return EXIT_FAILED if failed else EXIT_OK


def letter_json(letter: Any) -> dict[str, Any]:
    return {
        "id": letter.id,
        "queue": letter.queue,
        "name": letter.name,
        "reason": letter.reason,
        "message": letter.extra.get("message"),
        "at": letter.at,
        "at_iso": iso_time(letter.at),
        "body": letter.body,
    }


def letters_table(dead: list[Any], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for column in ("id", "name", "queue", "error", "when"):
        table.add_column(column, no_wrap=column == "id")  # ids are there to be copied
    for d in dead:
        message = d.extra.get("message")
        error = f"{d.reason}: {message}" if message else d.reason
        table.add_row(escape(d.id), escape(d.name), escape(d.queue), escape(error), iso_time(d.at))
    return table


def iso_time(epoch: float) -> str:
    """Epoch seconds as an ISO 8601 local time that states its UTC offset."""
    return datetime.datetime.fromtimestamp(epoch).astimezone().isoformat(timespec="seconds")


def cmd_keygen(args: argparse.Namespace, console: Console) -> int:
    from supervisor.keys import keygen

    try:
        public, secret = keygen(args.dir)
    except (FileExistsError, OSError) as exc:
        raise UsageError(str(exc)) from None
    print(f"public key: {public}\nsecret key: {secret} (mode 0600)")
    return EXIT_OK


QUEUE_COMMANDS = {
    "submit": cmd_submit,
    "result": cmd_result,
    "queues": cmd_queues,
    "dead": cmd_dead,
    "keygen": cmd_keygen,
}


# --- the control plane -------------------------------------------------------------------
def control_request(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """The registry command and arguments a fleetctl command line stands for."""
    c = args.command
    if c == "rate-limit":
        from supervisor.config import parse_rate

        try:
            parse_rate(args.rate)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        return "rate_limit", {"task": args.task, "rate": args.rate}
    if c == "time-limit":
        from worker.commands import time_limits_problem

        if args.clear:
            return "time_limit", {"task": args.task, "clear": True}
        if args.soft is None or args.hard is None:
            raise UsageError("time-limit needs --soft S and --hard S, or --clear")
        problem = time_limits_problem(args.soft, args.hard)
        if problem:
            raise UsageError(problem)
        return "time_limit", {"task": args.task, "soft": args.soft, "hard": args.hard}
    if c == "revoke":
        from worker.commands import signal_number

        if signal_number(args.signal) is None:
            raise UsageError(f"--signal {args.signal}: no such signal")
        return "revoke", {"ids": args.ids, "terminate": args.terminate, "signal": args.signal}
    if c == "inspect":
        return args.what, {}
    if c == "events":
        return "events", {"enable": args.action == "enable"}
    if c == "pool":
        return f"pool_{args.action}", {"n": args.n}
    if c == "call":
        return args.name, dict(key_value(a) for a in args.args)
    return c, {}


def key_value(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise UsageError(f"{text!r}: give arguments as KEY=VALUE")
    return key, parse_value(value)


def open_control(args: argparse.Namespace) -> Any:
    """A ControlClient for the hosts and keys the command line and the config name."""
    from ctl.client import ControlClient
    from supervisor.control import ControlConfigError
    from supervisor.keys import KeyFileError, load_keypair, load_public

    endpoints = list(args.endpoint)
    tcp = any(e.startswith("tcp://") for e in endpoints)
    config = None
    if not endpoints or (tcp and not (args.key and args.server_key) and args.config):
        config = load_config(args)
    hosts: dict[str, str] = {}
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
        return ControlClient(endpoints, args.timeout, client_keys, server_keys, hosts)
    except ControlConfigError as exc:
        raise UsageError(str(exc)) from None


def control_command(args: argparse.Namespace, console: Console) -> int:
    cmd, cmd_args = control_request(args)
    dest, limit = getattr(args, "dest", None), getattr(args, "limit", None)
    cmd_args["_timeout"] = args.timeout * NODE_SHARE
    if limit:
        cmd_args["_limit"] = limit  # each host answers once it has that many
    ahead = revoked_ahead(args) if args.command == "revoke" else []
    client = open_control(args)
    try:
        if args.command == "events" and args.action == "tail":
            return tail_events_of_fleet(client, dest, args.timeout, args.json)
        if args.command == "top":
            return show_top(client, dest, args.timeout, console)
        if args.command == "status":
            result = fleet_status(client, dest, args.timeout)
        else:
            result = client.call(cmd, cmd_args, dest, limit)
    finally:
        client.close()
    if not (limit and len(result.replies) >= limit):
        result.missing += [d for d in unanswered(dest, result.replies) if d not in result.missing]
    if args.json:
        add_iso_times(result.replies)
        print(result.to_json(**({"revoked_ahead": ahead} if args.command == "revoke" else {})))
    elif args.command == "status":
        console.print(status_table(result))
    else:
        console.print(reply_table(cmd, result))
        for task_id in ahead:
            print(f"{task_id}: no such task yet: revoked ahead, it will never start")
    return EXIT_FAILED if failed(result) else EXIT_OK


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


def unanswered(dest: list[str] | None, replies: dict[str, Any]) -> list[str]:
    """The nodes and hosts of --dest that no reply came from."""
    return [d for d in dest or () if d not in replies and not any(host_of(n) == d for n in replies)]


def host_of(node: str) -> str:
    return node.rpartition("@")[2]


def failed(result: Any) -> bool:
    """Did a host not answer, or a node fail, or is one down?"""
    return bool(result.missing or result.errors) or any(
        isinstance(r, dict) and ("error" in r or r.get("state") in ("FATAL", "BACKOFF"))
        for r in result.replies.values()
    )


def reply_table(cmd: str, result: Any) -> Table:
    table = Table(title=f"{cmd} ({result.elapsed * 1000:.1f} ms)", title_justify="left")
    table.add_column("node")
    table.add_column("reply")
    for node, reply in sorted(result.replies.items()):
        if isinstance(reply, dict) and "error" in reply:
            table.add_row(escape(node), f"[red]{escape(str(reply['error']))}[/red]")
        else:
            table.add_row(escape(node), escape(describe(reply)))
    for host in result.missing:
        table.add_row(f"[red]{escape(host)}[/red]", "[red]no reply[/red]")
    for endpoint, error in result.errors.items():
        table.add_row(f"[red]{escape(endpoint)}[/red]", f"[red]{escape(error)}[/red]")
    return table


def describe(reply: Any) -> str:
    """A reply as text a person reads: `ok` alone, one line per item or per key, times
    (EPOCH_FIELDS) as ISO times."""
    if isinstance(reply, dict):
        if set(reply) == {"ok"}:
            return str(reply["ok"])
        return "\n".join(
            f"{key}: {iso_time(value) if is_epoch(key, value) else compact(value)}"
            for key, value in reply.items()
        )
    if isinstance(reply, list):
        return "\n".join(compact(item) for item in reply) if reply else "-"
    return compact(reply)


def is_epoch(key: str, value: Any) -> bool:
    return key in EPOCH_FIELDS and isinstance(value, (int, float))


def add_iso_times(replies: dict[str, Any]) -> None:
    """Beside each time in epoch seconds (EPOCH_FIELDS) of the replies, the same as an ISO
    time: `next_due_iso`. JSON readers keep the number."""
    for reply in replies.values():
        if isinstance(reply, dict):
            for key, value in list(reply.items()):
                if is_epoch(key, value):
                    reply[f"{key}_iso"] = iso_time(value)


def compact(value: Any) -> str:
    if isinstance(value, str):
        return value
    if value in ({}, [], None):
        return "-"
    if isinstance(value, dict):
        return "  ".join(f"{k}={compact(v)}" for k, v in value.items())
    if isinstance(value, float):
        return f"{value:.3f}"
    return json.dumps(value)


# --- status and top ------------------------------------------------------------------------
def fleet_status(client: Any, dest: list[str] | None, timeout: float) -> Any:
    """Every node as its arbiter sees it (down ones too), with the pool its worker reports."""
    from ctl.client import Result

    args = {"_timeout": timeout * NODE_SHARE}
    supervised = client.call("status", args, dest)
    pools = client.call("stats", args, dest)
    nodes = {}
    for node, view in supervised.replies.items():
        stats = pools.replies.get(node)
        if isinstance(view, dict) and isinstance(stats, dict):
            if isinstance(stats.get("children"), list):
                supervised_keys = ("state", "generation", "reload_failed")
                view = {**stats, **{k: view[k] for k in supervised_keys if k in view}}
            elif "error" in stats:
                view = {**view, "error": stats["error"]}
        nodes[node] = view
    return Result(
        nodes,
        sorted(set(supervised.missing) | set(pools.missing)),
        supervised.elapsed + pools.elapsed,
        {**pools.errors, **supervised.errors},
    )


def status_table(result: Any) -> Table:
    table = Table(title=f"fleet ({result.elapsed * 1000:.1f} ms)", title_justify="left")
    for column in ("host / node / child", "pid", "state", "task", "rss", "uptime", "done"):
        numeric = column in ("pid", "rss", "uptime", "done")
        table.add_column(column, justify="right" if numeric else "left")
    by_host: dict[str, list[str]] = {}
    for node in sorted(result.replies):
        by_host.setdefault(host_of(node), []).append(node)
    for host in sorted(by_host):
        table.add_row(f"[bold]{escape(host)}[/bold]", "", "", "", "", "", "")
        for node in by_host[host]:
            add_node_rows(table, node, result.replies[node])
    for host in result.missing:
        table.add_row(f"[red]{escape(host)}[/red]", "", "[red]no reply[/red]", "", "", "", "")
    for endpoint, error in result.errors.items():
        table.add_row(
            f"[red]{escape(endpoint)}[/red]", "", "[red]error[/red]", escape(error), "", "", ""
        )
    return table


def add_node_rows(table: Table, node: str, view: Any) -> None:
    if not isinstance(view, dict):
        table.add_row(f"  {escape(node)}", "", "[red]?[/red]", escape(compact(view)), "", "", "")
        return
    state = str(view.get("state") or "")
    colour = {"RUNNING": "green", "STARTING": "yellow", "STOPPING": "yellow"}.get(state, "red")
    task = f"[red]{escape(str(view['error']))}[/red]" if "error" in view else ""
    if "reload_failed" in view:  # the generation before serves on
        task = f"[red]reload failed: {escape(str(view['reload_failed']))}[/red]"
    done = view.get("succeeded", 0) + view.get("failed", 0) if "succeeded" in view else ""
    table.add_row(
        f"  {escape(node)}",
        str(view.get("pid") or "-"),
        f"[{colour}]{state}[/{colour}]",
        task,
        size(view.get("rss")),
        duration(view.get("uptime")),
        str(done),
    )
    children = view.get("children")
    for child in children if isinstance(children, list) else ():
        task = ""
        if child.get("task"):
            runtime = duration(child.get("runtime"))
            task = f"{child.get('task_name')} {str(child['task'])[:8]} ({runtime})"
        table.add_row(
            "    child",
            str(child.get("pid")),
            str(child.get("state", "")),
            escape(task),
            size(child.get("rss")),
            duration(child.get("uptime")),
            str(child.get("tasks_done", "")),
        )


def size(n: Any) -> str:
    if not isinstance(n, (int, float)):
        return ""
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def duration(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)):
        return ""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def show_top(client: Any, dest: list[str] | None, timeout: float, console: Console) -> int:
    """The status table, redrawn every second until `q` (from a terminal) or Ctrl-C; into a
    pipe or a file, one table after the other (as `top -b` does)."""
    from rich.live import Live

    timeout = min(timeout, TOP_EVERY)
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
            table = status_table(fleet_status(client, dest, timeout))
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
def tail_events_of_fleet(client: Any, dest: list[str] | None, timeout: float, as_json: bool) -> int:
    """Subscribe, then ping: if no node answers within `timeout` there is nothing to tail
    (exit 1); hosts that stay silent are named, and the others' events are tailed."""
    events = client.subscribe_events()
    answer = client.call("ping", {"_timeout": timeout * NODE_SHARE}, dest)
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


def event_line(event: dict[str, Any]) -> str:
    """`12:00:01.123 images@h1 task-succeeded tasks.resize 3f2a... runtime=0.012`"""
    ts = event.get("ts")
    when = (
        time.strftime("%H:%M:%S", time.localtime(ts)) + f".{int(ts * 1000) % 1000:03d}"
        if isinstance(ts, (int, float))
        else "-"
    )
    words = [when, str(event.get("node", "-")), str(event.get("type", "-"))]
    words += [str(event[k]) for k in ("name", "id") if event.get(k) is not None]
    shown = ("ts", "node", "type", "name", "id")
    words += [f"{k}={compact(v)}" for k, v in event.items() if k not in shown]
    return " ".join(words)


if __name__ == "__main__":
    sys.exit(main())
