"""fleetd's public API: `from fleetd import task, Client, SoftTimeLimitExceeded`.

A thin face over the `worker` package, under a name that a project's own `worker.py`
cannot shadow: fleetd's `worker` is loaded from beside this package, wherever sys.path
would look first. Everything here is also importable from `worker`, as before.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from types import ModuleType
from typing import TYPE_CHECKING, Any


def _internal(name: str) -> ModuleType:
    """fleetd's own top-level package `name` (installed beside this one), even where a module
    of the same name comes first on sys.path (a project's `worker.py` in its folder)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    origin = os.path.join(root, name, "__init__.py")
    loaded = sys.modules.get(name)
    if loaded is not None:
        if getattr(loaded, "__file__", None) != origin:
            raise ImportError(
                f"a module named {name!r} ({getattr(loaded, '__file__', '?')}) was imported"
                f" before fleetd and stands in for fleetd's own: rename it"
            )
        return loaded
    spec = importlib.util.spec_from_file_location(
        name, origin, submodule_search_locations=[os.path.dirname(origin)]
    )
    if spec is None or spec.loader is None:
        raise ImportError(f"fleetd's {name!r} package is missing from {root}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


if TYPE_CHECKING:
    import worker as _worker
    from worker import SoftTimeLimitExceeded, Task, control_command, task
    from worker.client import (
        BrokerUnavailable,
        Client,
        Handle,
        TaskFailed,
        TaskRevoked,
        TaskTooLarge,
    )
else:
    _worker = _internal("worker")
    SoftTimeLimitExceeded = _worker.SoftTimeLimitExceeded
    Task = _worker.Task
    control_command = _worker.control_command
    task = _worker.task

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
    """The client side, imported on first use, as `worker` does: a worker never needs it."""
    if name in __all__:  # only what is not here already: the client side
        return getattr(_worker, name)
    raise AttributeError(f"module 'fleetd' has no attribute {name!r}")
