"""fleetd's task API: `@task`, `Client`, handles and the errors a caller or a task sees."""

from .client import Client, Handle, TaskFailed, TaskRevoked
from .control import control_command
from .task import SoftTimeLimitExceeded, Task, task

__all__ = [
    "Client",
    "Handle",
    "SoftTimeLimitExceeded",
    "Task",
    "TaskFailed",
    "TaskRevoked",
    "control_command",
    "task",
]
