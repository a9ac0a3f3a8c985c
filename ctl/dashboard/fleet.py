"""The fleet as the dashboard sees and steers it: every host over the control plane, the
broker through worker.Client, by the code paths fleetctl's commands take."""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Iterator
from typing import Any

from ctl.cli import failed, fleet_status
from ctl.client import ControlClient, Result
from ctl.dashboard.records import Records
from ctl.render import letter_json
from worker import Client
from worker.control import COMMANDS, CommandError
from worker.scheduler import Schedule

DEAD_SHOWN = 50  # dead letters listed on the queues page, newest first


class ActionError(Exception):
    """An action the fleet refused or could not take: `status` is the HTTP status to answer."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class Fleet:
    """One ControlClient for the reads and one broker Client, each used by one thread at a
    time (a ZeroMQ socket belongs to one thread; the requests of the web server come from a
    pool); each action has a ControlClient of its own."""

    def __init__(self, control: ControlClient, client: Client, schedules: list[Schedule]) -> None:
        self._control = control
        self._client = client
        self._schedules = schedules  # the config's [[schedule]] entries
        self._broker_lock = threading.Lock()
        self._nodes_lock = threading.Lock()
        self._nodes: dict[str, Any] = {}
        self._nodes_asked = -math.inf  # monotonic: when the call that read _nodes began
        self.records = Records(client.broker)

    def close(self) -> None:
        self._control.close()
        self._client.close()

    @contextlib.contextmanager
    def _broker(self) -> Iterator[None]:
        """The broker for this thread alone, reading the SQLite queue file now at its path."""
        with self._broker_lock:
            self.records.follow()
            yield

    # --- looking ---------------------------------------------------------------------
    def nodes(self) -> dict[str, Any]:
        """Every node as `fleetctl status` shows it; a node whose arbiter says RUNNING but
        whose worker did not answer is `silent`. One call at a time: a request that waited
        for the lock takes the answer of a call that began after it came, so that pages that
        poll while a host hangs wait out its timeout together, not one after the other."""
        came = time.monotonic()
        with self._nodes_lock:
            if self._nodes_asked >= came:
                return self._nodes
            asked = time.monotonic()
            self._nodes = self._ask_nodes()  # one that raises serves no one after it
            self._nodes_asked = asked
            return self._nodes

    def _ask_nodes(self) -> dict[str, Any]:
        result = fleet_status(self._control, None)  # under _nodes_lock: one call at a time
        nodes = {}
        for node, view in sorted(result.replies.items()):
            if isinstance(view, dict):
                view = {
                    **view,
                    "silent": view.get("state") == "RUNNING"
                    and "pid" in view
                    and not isinstance(view.get("children"), list),
                }
            nodes[node] = view
        return {"nodes": nodes, "missing": result.missing, "errors": result.errors}

    def queues(self) -> dict[str, Any]:
        """Depths, oldest waits and the newest dead letters, as `fleetctl queues` reads them."""
        with self._broker():
            depths = self._client.depths()
            dead = self._client.dead_letters(limit=DEAD_SHOWN)
            waits = self.records.oldest_waits()
        return {
            "queues": [
                {
                    "queue": d.queue,
                    "ready": d.ready,
                    "scheduled": d.scheduled,
                    "reserved": d.reserved,
                    "oldest_wait": waits.get(d.queue),
                }
                for d in depths
            ],
            "dead_letters": [letter_json(d) for d in dead],
        }

    def waits(self, since: float, until: float) -> list[float] | None:
        """The queue waits of the tasks that ended in [since, until); None: not known."""
        with self._broker():
            return self.records.waits(since, until)

    def tasks(self, state: str, name: str, limit: int) -> dict[str, Any]:
        with self._broker():
            tasks, partial = self.records.recent(state, name, limit)
        return {"tasks": tasks, "partial": partial}

    def task(self, task_id: str) -> dict[str, Any] | None:
        """The task's info dict (as Handle.info()) with its args and times; None if the
        broker never saw it."""
        with self._broker():
            info = self._client.find(task_id)
            if info is None:
                return None
            return {**info, **self.records.details(task_id)}

    def schedules(self) -> dict[str, Any]:
        """The schedules and their leader, as `fleetctl schedule list` computes them."""
        return self.schedule("list", {})

    # --- steering --------------------------------------------------------------------
    def control(self, cmd: str, args: dict[str, Any], dest: list[str] | None) -> dict[str, Any]:
        """A table command, checked by the table as fleetctl checks it, sent to the fleet by
        a client of its own: it waits for a hung host once, never behind the sampler's poll
        or another action. ActionError (502) if no node carried it out; where some did, their
        replies, and `problem` names what the others did not do."""
        try:
            request = COMMANDS[cmd].validate(args)
        except CommandError as exc:
            raise ActionError(str(exc)) from None
        with self._control.twin() as control:
            try:
                result = control.call(cmd, request, dest)
            except ValueError as exc:  # over the protocol's 1 MiB
                raise ActionError(str(exc), 413) from None
        if not result.replies and not result.missing and not result.errors:
            raise ActionError(f"no node {', '.join(dest or [])} answered", 404)
        if not failed(result):
            return reply_json(result)
        if all(isinstance(r, dict) and "error" in r for r in result.replies.values()):
            raise ActionError(problem_line(result), 502)
        return {**reply_json(result), "problem": problem_line(result)}

    def schedule(self, verb: str, args: dict[str, Any]) -> dict[str, Any]:
        """`fleetctl schedule VERB` (list, pause, resume, trigger), run as fleetctl runs it:
        the table's effect on the broker; ActionError (404) for a schedule not in the config."""
        command = COMMANDS[f"schedule_{verb}"]
        assert command.effect is not None
        try:
            request = command.validate(args)
        except CommandError as exc:
            raise ActionError(str(exc)) from None
        with self._broker():
            try:
                reply: dict[str, Any] = command.effect(
                    self._client.broker, self._schedules, **request
                )
            except CommandError as exc:  # the only one: no such schedule
                raise ActionError(str(exc), 404) from None
        return reply

    def retry_dead(self, ids: list[str] | None) -> dict[str, Any]:
        with self._broker():
            outcomes = self._client.retry_dead(ids)
        return {
            "retried": [i for i, problem in outcomes.items() if problem is None],
            "failed": {i: problem for i, problem in outcomes.items() if problem},
        }

    def purge_dead(self) -> dict[str, Any]:
        with self._broker():
            return {"purged": self._client.purge_dead()}


def reply_json(result: Result) -> dict[str, Any]:
    return {"replies": result.replies, "missing": result.missing, "errors": result.errors}


def problem_line(result: Result) -> str:
    """What went wrong with a broadcast, in one line."""
    problems = [f"no answer from {host}" for host in result.missing]
    problems += [f"{host}: {error}" for host, error in result.errors.items()]
    problems += [
        f"{node}: {reply['error']}"
        for node, reply in result.replies.items()
        if isinstance(reply, dict) and "error" in reply
    ]
    return "; ".join(problems) or "a node is down"
