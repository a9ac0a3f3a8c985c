"""`fleetctl`: steer the fleet over the control plane, and submit and inspect tasks."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from rich.console import Console
from rich.table import Table

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
INSPECT = ("active", "reserved", "scheduled", "registered", "stats", "revoked", "conf")


class UsageError(Exception):
    """Bad arguments or config: exit 2 with one line."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="fleetctl", description="Steer a fleetd fleet and its queue.")
    p.add_argument("-c", "--config", default=os.environ.get("FLEET_CONFIG"),
                   help="the fleet's config (default: $FLEET_CONFIG)")
    p.add_argument("--endpoint", action="append", default=[],
                   help="a control endpoint to ask (repeatable; default: the config's)")
    p.add_argument("--timeout", type=float, default=1.0, help="seconds to wait for replies")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--key", default=os.environ.get("FLEETCTL_KEY"),
                   help="this client's secret key file for tcp:// endpoints (default: the config's"
                        " curve_secret_key)")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)

    def dest(cmd: argparse.ArgumentParser) -> argparse.ArgumentParser:
        cmd.add_argument("--dest", action="append", help="a node (name@host) or a host; repeatable")
        return cmd

    ping = dest(sub.add_parser("ping", help="check that nodes answer"))
    ping.add_argument("--limit", type=int, help="return after this many node replies")
    dest(sub.add_parser("shutdown", help="warm-shut-down nodes or hosts"))
    dest(sub.add_parser("reload", help="graceful reload (fresh code) of hosts"))
    rl = dest(sub.add_parser("rate-limit", help="limit a task to N/s, N/m or N/h (0 clears)"))
    rl.add_argument("task")
    rl.add_argument("rate")
    tl = dest(sub.add_parser("time-limit", help="soft/hard time limits of a task, from now on"))
    tl.add_argument("task")
    tl.add_argument("--soft", type=float, required=True)
    tl.add_argument("--hard", type=float, required=True)
    rv = sub.add_parser("revoke", help="revoke task ids (they never start)")
    rv.add_argument("ids", nargs="+")
    rv.add_argument("--terminate", action="store_true", help="signal the child running one")
    rv.add_argument("--signal", default="TERM")
    ins = dest(sub.add_parser("inspect", help="what nodes hold and know"))
    ins.add_argument("what", choices=INSPECT)
    ev = sub.add_parser("events", help="task events")
    ev.add_argument("action", choices=("enable", "disable", "tail"))
    ev.add_argument("--dest", action="append")
    pool = dest(sub.add_parser("pool", help="grow or shrink pools"))
    pool.add_argument("action", choices=("grow", "shrink"))
    pool.add_argument("n", nargs="?", type=int, default=1)
    dest(sub.add_parser("status", help="a table of the fleet"))
    dest(sub.add_parser("top", help="a live view of the fleet"))
    call = dest(sub.add_parser("call", help="run a custom @control_command"))
    call.add_argument("name")
    call.add_argument("--args", default="{}", help="a JSON object of arguments")
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
    keygen = sub.add_parser("keygen", help="write a CurveZMQ key pair into DIR")
    keygen.add_argument("dir")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console()
    try:
        handler = QUEUE_COMMANDS.get(args.command) or control_command
        return handler(args, console)
    except UsageError as exc:
        print(f"fleetctl: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_FAILED


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
    from worker import Client

    if not args.config and os.environ.get("FLEET_BROKER"):
        return Client(os.environ["FLEET_BROKER"])
    config = load_config(args)
    return Client(config.broker, durability=config.durability)


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
    handle = client.submit(args.task, *[parse_value(a) for a in args.args], kwargs=kwargs,
                           queue=args.queue, countdown=args.countdown)
    if args.wait is None:
        print(json.dumps({"id": handle.id}) if args.json else handle.id)
        return EXIT_OK
    return show_result(client, handle.id, args.wait, args.json, console)


def cmd_result(args: argparse.Namespace, console: Console) -> int:
    return show_result(make_client(args), args.id, args.wait, args.json, console)


def show_result(client: Any, task_id: str, wait: float | None, as_json: bool, console: Console) -> int:
    from worker import TaskFailed, TaskRevoked

    handle = client.handle(task_id)
    code = EXIT_OK
    if wait is not None:
        try:
            handle.get(timeout=wait)
        except (TaskFailed, TaskRevoked):
            code = EXIT_FAILED
        except TimeoutError:
            code = EXIT_FAILED
    info = handle.info()
    if info.get("state") == "FAILURE":
        code = EXIT_FAILED
    if as_json:
        print(json.dumps(info))
    else:
        table = Table(show_header=False)
        for key in ("id", "name", "state", "result", "exc_type", "exc_message", "deliveries", "node"):
            if info.get(key) is not None:
                table.add_row(key, json.dumps(info[key]) if key == "result" else str(info[key]))
        console.print(table)
    return code


def cmd_queues(args: argparse.Namespace, console: Console) -> int:
    broker = make_client(args).broker
    depths = broker.depths()
    dead = broker.dead_letters(limit=50)
    if args.json:
        print(json.dumps({
            "queues": {d.queue: {"ready": d.ready, "scheduled": d.scheduled, "reserved": d.reserved}
                       for d in depths},
            "dead_letters": [{"id": d.id, "queue": d.queue, "name": d.name, "reason": d.reason,
                              "at": d.at, "body": d.body} for d in dead],
        }))
        return EXIT_OK
    table = Table(title="queues")
    for column in ("queue", "ready", "scheduled", "reserved"):
        table.add_column(column, justify="right" if column != "queue" else "left")
    for d in depths:
        table.add_row(d.queue, str(d.ready), str(d.scheduled), str(d.reserved))
    console.print(table)
    letters = Table(title=f"dead letters ({len(dead)} newest)")
    for column in ("id", "name", "queue", "reason", "when"):
        letters.add_column(column)
    for d in dead:
        letters.add_row(d.id, d.name, d.queue, d.reason, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(d.at)))
    console.print(letters)
    return EXIT_OK


def cmd_keygen(args: argparse.Namespace, console: Console) -> int:
    from ctl.keys import keygen

    try:
        public, secret = keygen(args.dir)
    except (FileExistsError, OSError) as exc:
        raise UsageError(str(exc)) from None
    print(f"public key: {public}\nsecret key: {secret} (mode 0600)")
    return EXIT_OK


QUEUE_COMMANDS = {"submit": cmd_submit, "result": cmd_result, "queues": cmd_queues, "keygen": cmd_keygen}


# --- the control plane -------------------------------------------------------------------
def control_request(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """The registry command and arguments a fleetctl command line stands for."""
    c = args.command
    if c == "rate-limit":
        return "rate_limit", {"task": args.task, "rate": args.rate}
    if c == "time-limit":
        return "time_limit", {"task": args.task, "soft": args.soft, "hard": args.hard}
    if c == "revoke":
        return "revoke", {"ids": args.ids, "terminate": args.terminate, "signal": args.signal}
    if c == "inspect":
        return args.what, {}
    if c == "events":
        return "events", {"enable": args.action == "enable"}
    if c == "pool":
        return f"pool_{args.action}", {"n": args.n}
    if c in ("status", "top"):
        return "stats", {}
    if c == "call":
        try:
            custom = json.loads(args.args)
        except ValueError as exc:
            raise UsageError(f"--args is not JSON: {exc}") from None
        if not isinstance(custom, dict):
            raise UsageError("--args must be a JSON object")
        return args.name, custom
    return c, {}


def open_control(args: argparse.Namespace) -> Any:
    from ctl.client import ControlClient
    from ctl.keys import KeyFileError, load_keypair, load_public
    from supervisor.control import ControlConfigError

    endpoints = list(args.endpoint)
    key_file = args.key
    if not endpoints or (any(e.startswith("tcp://") for e in endpoints) and not key_file):
        config = load_config(args)
        if not endpoints:
            endpoints = [b for b in config.control.bind if b.startswith("ipc://")] or config.control.bind[:1]
            endpoints += config.control.endpoints
        key_file = key_file or config.control.curve_secret_key
    client_keys = server_keys = None
    if any(e.startswith("tcp://") for e in endpoints):
        if not key_file:
            raise UsageError("tcp:// endpoints need a key: --key FILE, $FLEETCTL_KEY or [control] curve_secret_key")
        try:
            client_keys = load_keypair(key_file)
            server_public = load_public(os.environ.get("FLEETCTL_SERVER_KEY") or key_file)
        except (KeyFileError, OSError) as exc:
            raise UsageError(str(exc)) from None
        server_keys = {e: server_public for e in endpoints if e.startswith("tcp://")}
    try:
        return ControlClient(endpoints, args.timeout, client_keys, server_keys)
    except ControlConfigError as exc:
        raise UsageError(str(exc)) from None


def control_command(args: argparse.Namespace, console: Console) -> int:
    cmd, cmd_args = control_request(args)
    dest = getattr(args, "dest", None)
    client = open_control(args)
    try:
        if args.command == "events" and args.action == "tail":
            for event in client.subscribe_events():
                console.print_json(json.dumps(event)) if not args.json else print(json.dumps(event), flush=True)
            return EXIT_OK
        if args.command == "top":
            return show_top(client, dest, console)
        result = client.call(cmd, cmd_args, dest)
    finally:
        if args.command != "top":
            client.close()
    limit = getattr(args, "limit", None)
    if limit:
        result.replies = dict(list(result.replies.items())[:limit])
    failed = bool(result.missing or result.errors) or any(
        isinstance(r, dict) and "error" in r for r in result.replies.values())
    if dest and not result.replies and not result.missing:
        failed = True
    if args.json:
        print(result.to_json())
    elif args.command == "status":
        console.print(status_table(result.replies))
    else:
        render(console, cmd, result)
    return EXIT_FAILED if failed else EXIT_OK


def render(console: Console, cmd: str, result: Any) -> None:
    table = Table(title=f"{cmd} ({result.elapsed * 1000:.1f} ms)")
    table.add_column("node")
    table.add_column("reply")
    for node, reply in sorted(result.replies.items()):
        text = reply.get("ok") if isinstance(reply, dict) and set(reply) <= {"ok"} else json.dumps(reply, indent=1)
        table.add_row(node, str(text))
    for host in result.missing:
        table.add_row(f"[red]{host}[/red]", "[red]no reply[/red]")
    for endpoint, error in result.errors.items():
        table.add_row(f"[red]{endpoint}[/red]", f"[red]{error}[/red]")
    console.print(table)


def status_table(replies: dict[str, Any]) -> Table:
    table = Table(title="fleet")
    for column in ("node", "pid", "child", "state", "task", "runtime", "done", "uptime"):
        table.add_column(column)
    for node, stats in sorted(replies.items()):
        if not isinstance(stats, dict) or "error" in stats:
            table.add_row(node, "", "", "[red]error[/red]", str(stats), "", "", "")
            continue
        table.add_row(node, str(stats.get("pid")), "", "running", "", "",
                      str(stats.get("succeeded", 0) + stats.get("failed", 0)), f"{stats.get('uptime', 0):.0f}s")
        for child in stats.get("children", []):
            runtime = child.get("runtime")
            table.add_row("", "", str(child.get("pid")), child.get("state", ""), child.get("task_name") or "",
                          f"{runtime:.1f}s" if runtime else "", str(child.get("tasks_done", 0)), "")
    return table


def show_top(client: Any, dest: list[str] | None, console: Console) -> int:
    from rich.live import Live

    try:
        with Live(console=console, refresh_per_second=2) as live:
            while True:
                live.update(status_table(client.call("stats", {}, dest).replies))
                time.sleep(1.0)
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main())
