"""How fleetctl shows what comes back: replies, the fleet's status, dead letters, events.

Tables for a person (rich), with times as ISO times; `--json` readers get the numbers, and
an ISO time beside each (`next_due_iso`).
"""

from __future__ import annotations

import datetime
import errno
import json
import os
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from worker.logs import one_line

if TYPE_CHECKING:
    from rich.table import Table

# Reply fields in epoch seconds: a table shows them as times, --json adds an ISO twin.
EPOCH_FIELDS = ("next_due", "next_run", "last_run")
TASK_FIELDS = ("id", "name", "state", "result", "exc_type", "exc_message", "deliveries", "node")


class Output:
    """rich's Console, made when first used: a command whose output is JSON never loads it."""

    def __init__(self, width: int | None) -> None:
        self.width = width
        self.console: Any = None

    def __getattr__(self, name: str) -> Any:  # only for what Output itself does not have
        if self.console is None:
            from rich.console import Console

            class OwnConsole(Console):
                def on_broken_pipe(self) -> None:  # rich's own exits 1: fleetctl's main says
                    raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))

            self.console = OwnConsole(width=self.width)
        return getattr(self.console, name)

    # Special methods are looked up on the class, never through __getattr__: a Live view
    # enters its console (rich's buffer), so these two go through by hand.
    def __enter__(self) -> Any:
        return self.__getattr__("__enter__")()

    def __exit__(self, *exc: object) -> None:
        self.__getattr__("__exit__")(*exc)


def new_table(**options: Any) -> Table:
    """A rich Table. rich (~25 ms to import) loads for a person's tables only: `--json`
    output, which programs read, never pays for it."""
    from rich.table import Table

    return Table(**options)


def escape(text: str) -> str:
    """`text` shown as it is in a table, not read as rich markup, and with nothing that a
    terminal acts on (an escape sequence, a carriage return: anybody's text, in a task id,
    an error, a result) but its newlines, which stay inside the table's cell."""
    from rich.markup import escape as rich_escape

    return rich_escape(one_line(text, keep="\n"))


def task_table(info: dict[str, Any]) -> Table:
    """A task's info, one field a row (its result as JSON)."""
    table = new_table(show_header=False)
    for key in TASK_FIELDS:
        if info.get(key) is not None:
            value = json.dumps(info[key]) if key == "result" else str(info[key])
            table.add_row(key, escape(value))  # a name, an error, a result: anybody's text
    return table


def queues_table(depths: list[Any]) -> Table:
    table = new_table(title="queues")
    for column in ("queue", "ready", "scheduled", "reserved"):
        table.add_column(column, justify="right" if column != "queue" else "left")
    for d in depths:
        table.add_row(escape(d.queue), str(d.ready), str(d.scheduled), str(d.reserved))
    return table


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
    table = new_table(title=title, title_justify="left")
    for column in ("id", "name", "queue", "error", "when"):
        table.add_column(column, no_wrap=column == "id")  # ids are there to be copied
    for d in dead:
        message = d.extra.get("message")
        error = f"{d.reason}: {message}" if message else d.reason
        table.add_row(escape(d.id), escape(d.name), escape(d.queue), escape(error), iso_time(d.at))
    return table


def iso_time(epoch: float) -> str:
    """Epoch seconds as an ISO 8601 local time that states its UTC offset; a time that no
    calendar date holds (another producer's ETA in the year 33,000) as its number."""
    try:
        return datetime.datetime.fromtimestamp(epoch).astimezone().isoformat(timespec="seconds")
    except (ValueError, OverflowError, OSError):
        return f"{epoch:g}"


def host_of(node: str) -> str:
    return node.rpartition("@")[2]


def reply_table(cmd: str, result: Any) -> Table:
    table = new_table(title=f"{escape(cmd)} ({result.elapsed * 1000:.1f} ms)", title_justify="left")
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


def add_iso_times(replies: Iterable[Any]) -> None:
    """Beside each time in epoch seconds (EPOCH_FIELDS) of the replies (dicts; others are
    left as they are), the same as an ISO time: `next_due_iso`. JSON readers keep the
    number."""
    for reply in replies:
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


def status_table(result: Any) -> Table:
    table = new_table(title=f"fleet ({result.elapsed * 1000:.1f} ms)", title_justify="left")
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
    task = (
        f"[red]{escape(str(view['error']))}[/red]" if "error" in view else escape(autoscaled(view))
    )
    if "reload_failed" in view:  # the generation before serves on
        task = f"[red]reload failed: {escape(str(view['reload_failed']))}[/red]"
    done = view.get("succeeded", 0) + view.get("failed", 0) if "succeeded" in view else ""
    table.add_row(
        f"  {escape(node)}",
        str(view.get("pid") or "-"),
        f"[{colour}]{escape(state)}[/{colour}]",
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


def autoscaled(view: dict[str, Any]) -> str:
    """ "pool 3 in 2..8" for a node whose pool follows its load; "" for a fixed pool."""
    low, high = view.get("pool_min"), view.get("pool_max")
    if low == high:
        return ""
    return f"pool {view.get('pool_size')} in {low}..{high}"


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
    return one_line(" ".join(words))


def schedules_table(listing: dict[str, Any]) -> Table:
    """`fleetctl schedule list`: one schedule a row, times as ISO times."""
    leader = listing["leader"] or "nobody (no worker runs, or its lease ran out)"
    table = new_table(title=f"schedules (led by {escape(leader)})", title_justify="left")
    for column in (
        "name",
        "task",
        "when",
        "timezone",
        "next run",
        "last run",
        "last task",
        "paused",
    ):
        table.add_column(column, no_wrap=column == "last task")
    for s in listing["schedules"]:
        table.add_row(
            escape(s["name"]),
            escape(s["task"]),
            escape(s["when"]),
            escape(s["timezone"]),
            iso_time(s["next_run"]),
            iso_time(s["last_run"]) if s["last_run"] is not None else "never",
            escape(s["last_id"] or "-"),
            "paused" if s["paused"] else "",
        )
    return table
