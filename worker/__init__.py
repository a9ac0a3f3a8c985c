"""fleetd's task API: `@task`, `Client`, handles and the errors a caller or a task sees."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

# Imported here, not on first use as the rest: `worker.task`, once imported, would be the
# module of that name instead of the decorator.
from .task import SoftTimeLimitExceeded, Task, task

if TYPE_CHECKING:
    from .client import BrokerUnavailable, Client, Handle, TaskFailed, TaskRevoked, TaskTooLarge
    from .control import control_command

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

# Where each other name lives, imported on first use: the arbiter imports a few modules of
# this package (its command line, logs, config checks) before it spawns its workers, and
# these later (the control commands) or never.
_HOMES = {
    "BrokerUnavailable": "client",
    "Client": "client",
    "Handle": "client",
    "TaskFailed": "client",
    "TaskRevoked": "client",
    "TaskTooLarge": "client",
    "control_command": "control",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'worker' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{home}"), name)
