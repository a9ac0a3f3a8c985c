"""The one registry of control commands: each with its arguments, help, effect and command line.

A command runs either in the arbiter (`scope="host"`: shutdown, reload, status) or in every
addressed worker (`scope="worker"`), which replies for its node; the arbiter's half of a
worker command, if it has one, is its `before_send`. fleetctl builds its command lines from
this table: `lines` maps the words of each line to the arguments those words stand for, and
each Arg says how fleetctl takes it. Custom commands come from task modules with
`@control_command`, run in the workers, and are called with `fleetctl call`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

REQUIRED = object()  # a default that says: the argument must be given
OPTIONAL = object()  # a default that says: it may be left out, and is then not passed at all
JSON_TYPES: tuple[type, ...] = (str, int, float, bool, list, dict, type(None))
Effect = TypeVar("Effect", bound=Callable[..., Any])


class CommandError(Exception):
    """Bad arguments or an unknown command: sent back as the reply's error."""


@dataclass(frozen=True)
class Arg:
    """One argument of a command: the JSON types it takes, its default, the least number it
    takes, and how fleetctl takes it: a positional when it is REQUIRED or `positional`, else
    an --option (a bool: a bare flag); a list takes one word or more."""

    types: tuple[type, ...]
    default: Any = REQUIRED
    help: str = ""
    positional: bool = False
    minimum: float | None = None

    def problem(self, value: Any) -> str | None:
        """What is wrong with `value` for this argument, if anything."""
        if not isinstance(value, self.types) or (
            isinstance(value, bool) and bool not in self.types
        ):
            return f"must be {_type_names(self.types)}"
        if isinstance(value, list) and not all(isinstance(item, str) for item in value):
            return "must be a list of strings"  # a list is words of the command line
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not finite(value):
            return "must be a finite number"
        if self.minimum is None or not isinstance(value, (int, float)) or isinstance(value, bool):
            return None
        return f"must be >= {self.minimum:g}, got {value:g}" if value < self.minimum else None

    def parse(self, word: str) -> Any:
        """A word of a command line as this argument's value (a list's: as one of its items);
        ValueError naming what is wrong with it."""
        if str in self.types or list in self.types:
            return word
        try:
            if not word.isascii():  # int() and float() read the digits of every script ("١")
                raise ValueError(word)
            value = float(word) if float in self.types else int(word)
        except ValueError:
            raise ValueError(f"not {_type_names(self.types)}: {word:.80}") from None
        problem = self.problem(value)
        if problem:
            raise ValueError(problem)
        return value


def finite(value: float) -> bool:
    """Whether a number is one a float holds: not NaN or infinite, nor an integer too large
    for one (10**400, which arithmetic with floats would raise on)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


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


@dataclass
class Command:
    name: str
    help: str
    args: dict[str, Arg] = field(default_factory=dict)
    # "worker": runs in each addressed worker; "host": in the arbiter; "broker": in fleetctl
    # itself, on the broker (`effect(broker, schedules, **args)`), no node involved
    scope: str = "worker"
    effect: Callable[..., Any] | None = None  # (worker_or_arbiter, **args) -> reply
    check: Callable[[dict[str, Any]], str | None] | None = None  # the arguments taken together
    # fleetctl: its command lines (words -> the arguments they stand for; none: `fleetctl
    # call`), and the request's fields besides args that it offers as options.
    lines: dict[str, dict[str, Any]] = field(default_factory=dict)
    envelope: tuple[str, ...] = ("dest",)
    # The arbiter's half of a worker command: (arbiter, worker, **args), run for each
    # addressed worker before the command goes to it.
    before_send: Callable[..., None] | None = None

    @property
    def custom(self) -> bool:
        """A task module's (`@control_command`): it has no command line of its own."""
        return not self.lines

    def validate(self, args: Any) -> dict[str, Any]:
        """The arguments with defaults filled in; CommandError naming what is wrong."""
        if not isinstance(args, dict):
            raise CommandError(f"{self.name}: args must be an object")
        unknown = set(args) - set(self.args)
        if unknown:
            raise CommandError(f"{self.name}: unknown argument {sorted(unknown)[0]!r}")
        out: dict[str, Any] = {}
        for key, arg in self.args.items():
            if key in args:
                problem = arg.problem(args[key])
                if problem:
                    raise CommandError(f"{self.name}: {key} {problem}")
                out[key] = args[key]
            elif arg.default is REQUIRED:
                raise CommandError(f"{self.name}: missing argument {key!r}")
            elif arg.default is not OPTIONAL:
                out[key] = arg.default
        problem = self.check(out) if self.check else None
        if problem:
            raise CommandError(f"{self.name}: {problem}")
        return out


COMMANDS: dict[str, Command] = {}


def register(
    name: str,
    help: str,
    args: dict[str, Arg] | None = None,
    *,
    scope: str = "worker",
    check: Callable[[dict[str, Any]], str | None] | None = None,
    lines: dict[str, dict[str, Any]] | None = None,
    envelope: tuple[str, ...] = ("dest",),
) -> Callable[[Effect], Effect]:
    """Add a command to the registry (decorates its effect). Its command line is its name
    with dashes (`rate_limit`: `fleetctl rate-limit`) unless `lines` says otherwise."""

    def wrap(fn: Effect) -> Effect:
        own_line: dict[str, dict[str, Any]] = {name.replace("_", "-"): {}}
        COMMANDS[name] = Command(
            name, help, args or {}, scope, fn, check, own_line if lines is None else lines, envelope
        )
        return fn

    return wrap


def before_send(name: str) -> Callable[[Effect], Effect]:
    """Give a registered worker command its arbiter's half: `fn(arbiter, worker, **args)`."""

    def wrap(fn: Effect) -> Effect:
        COMMANDS[name].before_send = fn
        return fn

    return wrap


def control_command(
    fn: Callable[..., Any] | None = None,
    *,
    name: str | None = None,
    args: dict[str, Arg] | None = None,
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
                spec[p.name] = Arg(JSON_TYPES, default)
        COMMANDS[command_name] = Command(command_name, (f.__doc__ or "").strip(), spec, "worker", f)
        return f

    return wrap(fn) if fn is not None else wrap


def worker_command_names() -> list[str]:
    """The commands a worker runs, custom ones included: it tells its arbiter at start."""
    return sorted(name for name, command in COMMANDS.items() if command.scope == "worker")
