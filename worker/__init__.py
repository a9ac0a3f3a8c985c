"""fleetd's task API: `@task`, `Client`, handles and the errors a caller or a task sees."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .control import control_command
from .task import SoftTimeLimitExceeded, Task, task

if TYPE_CHECKING:
    from .client import BrokerUnavailable, Client, Handle, TaskFailed, TaskRevoked, TaskTooLarge

__all__ = [
    "BrokerUnavailable",
    "Client",
    "Handle",
    "SoftTimeLimitExceeded",
    "Task",
    "TaskFailed",
    "TaskRevoked",
    "TaskTooLarge",
    "control_command",
    "task",
]


def __getattr__(name: str) -> Any:
    """The client side, imported on first use: a worker, and the arbiter, never need it."""
    if name in (
        "BrokerUnavailable",
        "Client",
        "Handle",
        "TaskFailed",
        "TaskRevoked",
        "TaskTooLarge",
    ):
        from . import client

        return getattr(client, name)
    raise AttributeError(f"module 'worker' has no attribute {name!r}")
