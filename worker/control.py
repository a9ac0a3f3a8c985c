"""The one registry of control commands: each with its arguments, help and effect.

A command runs either in the arbiter (`scope="host"`: shutdown, reload) or in every
addressed worker (`scope="worker"`), which replies for its node. Custom commands
come from task modules with `@control_command`, and run in the workers.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# An argument spec: name -> (accepted types, default); a default of REQUIRED must be given.
REQUIRED = object()
ArgSpec = dict[str, tuple[tuple[type, ...], Any]]
JSON_TYPES: tuple[type, ...] = (str, int, float, bool, list, dict, type(None))


class CommandError(Exception):
    """Bad arguments or an unknown command: sent back as the reply's error."""


@dataclass
class Command:
    name: str
    help: str
    args: ArgSpec = field(default_factory=dict)
    scope: str = "worker"  # "worker": runs in each addressed worker; "host": in the arbiter
    effect: Callable[..., Any] | None = None  # (worker_or_arbiter, **args) -> reply

    def validate(self, args: Any) -> dict[str, Any]:
        """The arguments with defaults filled in; CommandError naming what is wrong."""
        if not isinstance(args, dict):
            raise CommandError(f"{self.name}: args must be an object")
        unknown = set(args) - set(self.args)
        if unknown:
            raise CommandError(f"{self.name}: unknown argument {sorted(unknown)[0]!r}")
        out: dict[str, Any] = {}
        for key, (types, default) in self.args.items():
            if key not in args:
                if default is REQUIRED:
                    raise CommandError(f"{self.name}: missing argument {key!r}")
                out[key] = default
                continue
            value = args[key]
            if isinstance(value, bool) and bool not in types:
                raise CommandError(f"{self.name}: {key} must be {_type_names(types)}")
            if not isinstance(value, types):
                raise CommandError(f"{self.name}: {key} must be {_type_names(types)}")
            out[key] = value
        return out


def _type_names(types: tuple[type, ...]) -> str:
    names = {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "true/false",
        list: "a list",
        dict: "an object",
        type(None): "null",
    }
    return " or ".join(names.get(t, t.__name__) for t in types)


COMMANDS: dict[str, Command] = {}


def register(
    name: str, help: str, args: ArgSpec | None = None, scope: str = "worker"
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Add a command to the registry (decorates its effect)."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        COMMANDS[name] = Command(name, help, args or {}, scope, fn)
        return fn

    return wrap


def control_command(
    fn: Callable[..., Any] | None = None, *, name: str | None = None, args: ArgSpec | None = None
) -> Any:
    """A custom command from a task module: `@control_command def hello(worker, who="x"): ...`.

    The effect gets the worker (for `worker.spec`, `worker.stats()`) and the arguments,
    and returns a JSON-able reply. Arguments default to the function's keyword defaults.
    """

    def wrap(f: Callable[..., Any]) -> Callable[..., Any]:
        command_name = name or f.__name__
        if command_name in COMMANDS:
            raise ValueError(f"control command {command_name!r} exists already: rename yours")
        spec = args
        if spec is None:
            spec = {}
            for p in list(inspect.signature(f).parameters.values())[1:]:
                default = REQUIRED if p.default is inspect.Parameter.empty else p.default
                spec[p.name] = (JSON_TYPES, default)
        COMMANDS[command_name] = Command(command_name, (f.__doc__ or "").strip(), spec, "worker", f)
        return f

    return wrap(fn) if fn is not None else wrap


def worker_command_names() -> list[str]:
    """The commands a worker runs, custom ones included: it tells its arbiter at start."""
    return sorted(name for name, command in COMMANDS.items() if command.scope == "worker")
