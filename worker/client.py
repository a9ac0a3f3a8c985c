"""Submitting tasks and reading their outcome: `Client`, `Handle` and their errors."""

from __future__ import annotations

import datetime
import json
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

from .brokers import open_broker
from .brokers.base import FAILURE, FINAL_STATES, PENDING, REVOKED, Broker, Envelope
from .protocol import oversize
from .task import DEFAULT_QUEUE, REGISTRY, env_broker_source, eta_seconds

_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


class TaskFailed(Exception):
    """The task ended FAILURE; `.exc_type` is the error's type name ("ValueError",
    "WorkerLost", "TimeLimitExceeded", "NotRegistered", ...)."""

    def __init__(self, task_id: str, exc_type: str, message: str, traceback: str | None) -> None:
        super().__init__(f"{exc_type}: {message}")
        self.task_id = task_id
        self.exc_type = exc_type
        self.message = message
        self.traceback = traceback


class TaskRevoked(Exception):
    """The task was revoked and will not run."""


class TaskTooLarge(ValueError):
    """The task's JSON is over protocol.MAX_TASK_SIZE: it was not submitted."""


def encode_body(
    task_id: str, name: str, args: Sequence[Any], kwargs: dict[str, Any], retries: int = 0
) -> str:
    """The JSON text a task travels as; arguments must be JSON-serialisable."""
    return _encode(
        {"id": task_id, "name": name, "args": list(args), "kwargs": kwargs, "retries": retries}
    )


class Handle:
    """A submitted task, by id."""

    def __init__(self, client: Client, task_id: str) -> None:
        self.client = client
        self.id = task_id

    def __repr__(self) -> str:
        return f"<Handle {self.id}>"

    def info(self) -> dict[str, Any]:
        """id, name, state, result, exc_type, exc_message, traceback, deliveries, node."""
        found = self.client.broker.get_result(self.id)
        return found or {"id": self.id, "state": PENDING, "result": None}

    @property
    def state(self) -> str:
        return str(self.info()["state"])

    def get(self, timeout: float | None = None) -> Any:
        """Wait for the outcome: the result, or TaskFailed / TaskRevoked / TimeoutError."""
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = 0.0002
        while True:
            info = self.info()
            if info["state"] in FINAL_STATES:
                break
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(
                    f"task {self.id} not done after {timeout}s (state {info['state']})"
                )
            time.sleep(pause)
            pause = min(pause * 1.25, 0.05)
        if info["state"] == FAILURE:
            raise TaskFailed(
                self.id,
                info.get("exc_type") or "Error",
                info.get("exc_message") or "",
                info.get("traceback"),
            )
        if info["state"] == REVOKED:
            raise TaskRevoked(self.id)
        return info["result"]


class Client:
    """A producer and result reader on one broker.

    `Client("redis://...")`, `Client("sqlite:///queue.db")` or `Client.from_config(path)`.
    """

    def __init__(self, url: str, durability: str = "default", result_ttl: int = 86400) -> None:
        self.url = url
        self._durability = durability
        self._result_ttl = result_ttl
        self._broker: Broker | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, path: str) -> Client:
        from supervisor.config import load

        config = load(path, check_imports=False)
        return cls(config.broker, durability=config.durability, result_ttl=config.result_ttl)

    @property
    def broker(self) -> Broker:
        if self._broker is None:
            with self._lock:
                if self._broker is None:
                    self._broker = open_broker(
                        self.url, durability=self._durability, result_ttl=self._result_ttl
                    )
        return self._broker

    def submit(
        self,
        name: str,
        *args: Any,
        kwargs: dict[str, Any] | None = None,
        queue: str | None = None,
        countdown: float | None = None,
        eta: datetime.datetime | float | None = None,
        task_id: str | None = None,
    ) -> Handle:
        """Submit one task by name; its queue defaults to the task's own (if imported here)."""
        return self.submit_many(
            [(name, args, kwargs or {})],
            queue=queue,
            countdown=countdown,
            eta=eta,
            ids=[task_id] if task_id else None,
        )[0]

    def submit_many(
        self,
        calls: Iterable[tuple[str, Sequence[Any], dict[str, Any]]],
        queue: str | None = None,
        countdown: float | None = None,
        eta: datetime.datetime | float | None = None,
        ids: Sequence[str] | None = None,
    ) -> list[Handle]:
        """Submit many `(name, args, kwargs)` calls in one broker transaction (none of
        them if one is over the size limit: TaskTooLarge)."""
        when = eta_seconds(eta, countdown)
        envelopes = []
        for index, (name, args, kwargs) in enumerate(calls):
            task_id = ids[index] if ids else str(uuid.uuid4())
            registered = REGISTRY.get(name)
            target = queue or (registered.queue if registered else DEFAULT_QUEUE)
            body = encode_body(task_id, name, args, kwargs)
            if too_large := oversize(body):
                raise TaskTooLarge(f"{name}: {too_large}")
            envelopes.append(Envelope(task_id, target, name, body, when))
        self.broker.enqueue(envelopes)
        return [Handle(self, e.id) for e in envelopes]

    def handle(self, task_id: str) -> Handle:
        return Handle(self, task_id)

    def revoke(self, ids: list[str]) -> None:
        """Mark tasks revoked in the broker: queued ones end REVOKED, none of them starts."""
        self.broker.revoke(ids)

    def close(self) -> None:
        if self._broker is not None:
            self._broker.close()
            self._broker = None


_default: Client | None = None


def default_client() -> Client:
    """The client `.delay()` uses: from $FLEET_CONFIG (a config path) or $FLEET_BROKER (a URL)."""
    global _default
    if _default is None:
        source = env_broker_source()
        if source is None:
            raise RuntimeError(
                "set FLEET_CONFIG (a config file) or FLEET_BROKER (a broker URL) to submit tasks"
            )
        kind, value = source
        _default = Client.from_config(value) if kind == "config" else Client(value)
    return _default
