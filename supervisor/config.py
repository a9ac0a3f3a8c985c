"""Load and validate a fleetd TOML config; every error names the file, the key and the problem."""

from __future__ import annotations

import importlib.machinery
import math
import os
import re
import socket
import stat
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from worker.autoscale import MAX_POOL, parse_bounds
from worker.brokers import url_problem
from worker.files import NotRegularFile, read_regular
from worker.spec import WorkerSpec, parse_rate, parse_size

if TYPE_CHECKING:
    from worker.scheduler import Schedule

__all__ = [
    "Config",
    "ConfigError",
    "ControlConfig",
    "WorkerSpec",
    "load",
    "parse_rate",
    "parse_size",
]

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

NAME_RE = re.compile(r"[A-Za-z0-9_.-]+\Z")  # \Z: "$" would take a newline at the end
# A worker reports every second (worker.process.STATS_EVERY): a bound under two reports would
# kill healthy workers that a busy host delayed by a moment.
MIN_WORKER_TIMEOUT = 2.0
# The most a config file may hold: read past it (/dev/zero, a log given by mistake), it is no
# config, and reading on would take the host's memory.
MAX_CONFIG_BYTES = 1 << 20


class ConfigError(Exception):
    """A config problem, as one line: `FILE: KEY: problem`."""

    def __init__(self, path: str, key: str, problem: str) -> None:
        super().__init__(f"{path}: {key}: {problem}")
        self.path, self.key, self.problem = path, key, problem


class ControlConfigError(Exception):
    """A control endpoint cannot be bound as configured; the message says which and why."""


@dataclass(frozen=True)
class ControlConfig:
    bind: list[str]
    endpoints: list[str] = field(default_factory=list)
    curve_secret_key: str = ""
    authorized_keys: str = ""
    hosts: dict[str, str] = field(default_factory=dict)  # endpoint -> the host it names


@dataclass(frozen=True)
class DashboardConfig:
    """`fleetctl dashboard`: where it listens, and the file of the token its actions need."""

    bind: str = "127.0.0.1:9810"
    token_file: str = ""  # absolute; "": a read-only dashboard


OPEN_DASHBOARD = (
    "a dashboard reachable from other hosts needs [dashboard] token_file (or bind to 127.0.0.1)"
)


def is_loopback(host: str) -> bool:
    import ipaddress  # here: the arbiter never needs it

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def dashboard_problem(bind: str, token_file: str) -> str | None:
    """Why `fleetctl dashboard` refuses to serve on `bind` ("HOST:PORT", HOST maybe [v6]),
    if it does: beyond loopback, its actions need a token (OPEN_DASHBOARD)."""
    host = bind.rpartition(":")[0].strip("[]")
    if not token_file and not is_loopback(host):
        return OPEN_DASHBOARD
    return None


def read_token_file(path: str) -> str:
    """The dashboard's bearer token in `path` (its first line; "" for no path); ValueError
    in one line if there is none (`fleetd check` refuses what the dashboard would)."""
    if not path:
        return ""
    try:
        token = read_regular(path, 4096).decode().partition("\n")[0].strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"dashboard token_file {path}: cannot read it: {exc}") from None
    if not token:
        raise ValueError(f"dashboard token_file {path}: it holds no token")
    return token


@dataclass(frozen=True)
class Config:
    path: str
    node: str  # the host's name
    broker: str
    state_dir: str
    imports: list[str]
    pythonpath: list[str]
    lease: float
    durability: str
    result_ttl: int
    control: ControlConfig
    workers: list[WorkerSpec]
    rate_limits: dict[str, str]
    metrics_bind: str = ""
    dashboard: DashboardConfig = field(default_factory=DashboardConfig)
    schedules: list[Schedule] = field(default_factory=list)


# At most 5 digits of port: int() of thousands of digits raises (Python's limit on them).
HOST_PORT_RE = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):[0-9]{1,5}")
# Integers with bounds: the least and the most.
BOUNDED = {
    "prefetch": (0, 1_000_000),
    "async_slots": (1, 1_000_000),
    "ttl": (1, 1_000_000_000),  # seconds: some 31 years (Redis refuses an expiry past its clock)
}
# Seconds of a lease: Redis takes it in whole milliseconds (PX 0 is an error), and refuses an
# expiry past its clock, as for "ttl".
LEASE_BOUNDS = (0.001, 1e9)

# Each key: (type check, default). A default of REQUIRED must be given.
REQUIRED = object()
DEFAULT_KEYS: dict[str, tuple[str, Any]] = {
    "concurrency": ("pos_int", None),  # None: the CPU count
    "prefetch": ("prefetch", 1),
    "async_concurrency": ("async_slots", 100),
    "max_tasks_per_child": ("nonneg_int", 0),
    "max_memory_per_child": ("size", "0"),
    "time_limit": ("nonneg_num", 0),
    "soft_time_limit": ("nonneg_num", 0),
    "acks_late": ("bool", True),
    "max_deliveries": ("pos_int", 3),
    "shutdown_timeout": ("nonneg_num", 0),
    "worker_timeout": ("worker_timeout", 60),
    "autoscale": ("autoscale", ""),
    "autoscale_wait": ("pos_num", 1.0),
    "autoscale_idle": ("pos_num", 30.0),
}
FLEET_KEYS: dict[str, tuple[str, Any]] = {
    "node": ("name", None),
    "broker": ("str", "sqlite:///queue.db"),
    "state_dir": ("str", "state"),
    "imports": ("str_list", []),
    "pythonpath": ("str_list", ["."]),
    "lease": ("lease", 30),
    "durability": ("durability", "default"),
    "result_ttl": ("ttl", 86400),
}
CONTROL_KEYS: dict[str, tuple[str, Any]] = {
    "bind": ("nonempty_str_list", None),  # none at all: a host that nobody could steer
    "endpoints": ("endpoints", []),
    "curve_secret_key": ("str", ""),
    "authorized_keys": ("str", ""),
}
WORKER_KEYS: dict[str, tuple[str, Any]] = {
    "name": ("name", REQUIRED),
    "queues": ("nonempty_str_list", None),
    **DEFAULT_KEYS,
}
METRICS_KEYS: dict[str, tuple[str, Any]] = {"bind": ("host_port", "")}
DASHBOARD_KEYS: dict[str, tuple[str, Any]] = {
    "bind": ("host_port", "127.0.0.1:9810"),
    "token_file": ("str", ""),
}
SECTIONS = {
    "fleet",
    "control",
    "defaults",
    "worker",
    "rate_limits",
    "metrics",
    "dashboard",
    "schedule",
}


def _check(path: str, key: str, kind: str, value: Any) -> Any:
    def bad(expected: str) -> ConfigError:
        return ConfigError(path, key, f"must be {expected}, got {value!r:.80}")

    is_num = isinstance(value, (int, float)) and not isinstance(value, bool)
    refuse_nul(path, key, value)
    if kind == "str":
        if not isinstance(value, str):
            raise bad("a string")
    elif kind == "name":
        if not isinstance(value, str) or not NAME_RE.match(value):
            raise bad("a name of letters, digits, '.', '_' or '-'")
    elif kind == "bool":
        if not isinstance(value, bool):
            raise bad("true or false")
    elif kind == "endpoints":  # a list, or a table that names the host behind each endpoint
        named = isinstance(value, dict) and all(NAME_RE.match(host) for host in value)
        entries = list(value.values()) if named else value
        if not (named or isinstance(value, list)) or not all(
            isinstance(e, str) and e for e in entries
        ):
            raise bad('a list of endpoints, or a table of host = "endpoint"')
    elif kind in ("str_list", "nonempty_str_list"):
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise bad("a list of non-empty strings")
        if kind == "nonempty_str_list" and not value:
            raise bad("a non-empty list of strings")
    elif kind in BOUNDED:  # past these, a broker call or a count overflows at the first task
        least, most = BOUNDED[kind]
        if not isinstance(value, int) or isinstance(value, bool) or not least <= value <= most:
            raise bad(f"an integer from {least} to {most:,}")
    elif kind == "pos_int":
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise bad("an integer >= 1")
    elif kind == "nonneg_int":
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise bad("an integer >= 0")
    elif kind == "pos_num":  # NaN or infinity: never a duration (0 says "none" where it can)
        if not is_num or not math.isfinite(value) or value <= 0:
            raise bad("a finite number > 0")
    elif kind == "lease":
        shortest, longest = LEASE_BOUNDS
        if not is_num or not shortest <= value <= longest:  # NaN is within no bounds
            raise bad(f"finite seconds from {shortest:g} to {longest:,.0f}")
    elif kind == "nonneg_num":
        if not is_num or not math.isfinite(value) or value < 0:
            raise bad("a finite number >= 0")
    elif kind == "worker_timeout":
        if not is_num or (value != 0 and not MIN_WORKER_TIMEOUT <= value < math.inf):
            raise bad(f"0 (no bound) or seconds >= {MIN_WORKER_TIMEOUT:g}")
    elif kind == "autoscale":  # "" -> [], "2,8" -> [2, 8]
        if not isinstance(value, str):
            raise bad('"MIN,MAX" or ""')
        try:
            return list(parse_bounds(value)) if value.strip() else []
        except ValueError as exc:
            raise ConfigError(path, key, f"{exc}, got {value!r:.80}") from None
    elif kind == "size":
        try:
            size = parse_size(value)
        except ValueError as exc:  # its text says which: no size, or one too large
            raise ConfigError(path, key, f'must be a size like "512MB" or "0": {exc}') from None
        text = str(value).strip()
        if not any(c.isalpha() for c in text) and float(text) != 0:
            # A bare number would be bytes (Celery's --max-memory-per-child is KiB): every
            # task would recycle its child. "512B" says bytes on purpose.
            raise bad('a size with its unit, like "512MB" (a bare number would be bytes), or "0"')
        return size
    elif kind == "durability":
        if value not in ("default", "fsync"):
            raise bad('"default" or "fsync"')
    elif kind == "host_port":  # an IPv6 address in brackets: [::1]:9808
        if not isinstance(value, str) or (value and not HOST_PORT_RE.fullmatch(value)):
            raise bad('"host:port"')
        if value and not 0 < int(value.rpartition(":")[2]) < 65536:
            raise bad('"host:port" with a port from 1 to 65535')
    return value


def refuse_nul(path: str, key: str, value: Any) -> None:
    """ConfigError if a NUL character is in `value`: no path, URL or name holds one (open()
    and the like raise on it)."""
    if holds_nul(value):
        raise ConfigError(path, key, f"must not hold a NUL character (\\0), got {value!r:.80}")


def holds_nul(value: Any) -> bool:
    """Whether a NUL character is in `value`: a string, or a list or table of them."""
    if isinstance(value, str):
        return "\0" in value
    if isinstance(value, list):
        return any(holds_nul(item) for item in value)
    if isinstance(value, dict):
        return any(holds_nul(key) or holds_nul(item) for key, item in value.items())
    return False


def _section(
    path: str, name: str, data: Any, keys: dict[str, tuple[str, Any]], defaults: dict[str, Any]
) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ConfigError(path, name, "must be a table")
    for key in data:
        if key not in keys:
            raise ConfigError(path, f"{name}.{key:.80}", f"unknown key (known: {', '.join(keys)})")
    out: dict[str, Any] = {}
    for key, (kind, default) in keys.items():
        if key in data:
            out[key] = _check(path, f"{name}.{key}", kind, data[key])
        elif key in defaults:
            out[key] = defaults[key]
        elif default is REQUIRED:
            raise ConfigError(path, f"{name}.{key}", "is required")
        else:
            out[key] = _check(path, f"{name}.{key}", kind, default) if default is not None else None
    return out


def _resolve(folder: str, value: str) -> str:
    return value if os.path.isabs(value) else os.path.normpath(os.path.join(folder, value))


def resolve_broker_url(folder: str, url: str) -> str:
    """Make a relative `sqlite:///rel.db` absolute against the config file's folder."""
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
        return "sqlite:///" + _resolve(folder, url[len("sqlite:///") :])
    return url


def _resolve_endpoint(folder: str, endpoint: str) -> str:
    if endpoint.startswith("ipc://") and not endpoint.startswith("ipc:///"):
        return "ipc://" + _resolve(folder, endpoint[len("ipc://") :])
    return endpoint


def ipc_path_problem(path: str) -> str | None:
    """Why an ipc:// endpoint's path (relative ones resolved) is no socket file fleetd may
    bind, if it is not. Asked as the config is read, before `fleetd start` touches anything,
    and by the control server before it binds: binding makes the socket's folder 0700, and
    `ipc://` (the config's folder) had that folder's parent, /etc for /etc/fleetd, made so."""
    if not path or path.startswith("@"):  # an abstract socket: no folder's mode protects it
        return "names no socket file that a 0700 folder protects: give one's path"
    if os.path.basename(path) in ("", ".", ".."):
        return "names no socket file: give one, as ipc://state/control.sock"
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return None  # nothing there yet: the bind makes it
    if not stat.S_ISSOCK(mode):
        return "names no socket file but a folder or a file: give a socket file's path"
    return None


def module_exists(name: str, paths: list[str]) -> bool:
    """Find a module on `paths` + sys.path without importing (and so running) any of it."""
    search: list[str] | None = paths + sys.path
    for part in name.split("."):
        spec = importlib.machinery.PathFinder.find_spec(part, search)
        if spec is None:
            return False
        search = list(spec.submodule_search_locations or [])
    return True


def parse_schedules(path: str, entries: Any) -> list[Schedule]:
    """The `[[schedule]]` tables, checked; ConfigError naming the entry and key at fault."""
    if not isinstance(entries, list):
        raise ConfigError(path, "schedule", "must be [[schedule]] tables")
    if not entries:
        return []  # and the scheduler's module (cronsim, zoneinfo) stays unimported
    from worker.scheduler import ScheduleError, parse_schedule

    schedules: list[Schedule] = []
    for index, entry in enumerate(entries):
        for key, value in entry.items() if isinstance(entry, dict) else ():
            if key not in ("args", "kwargs"):  # a task's data may hold one
                refuse_nul(path, f"schedule[{index}].{key}", value)
        try:
            schedule = parse_schedule(entry)
        except ScheduleError as exc:
            raise ConfigError(path, f"schedule[{index}].{exc.key}", str(exc)) from None
        if any(s.name == schedule.name for s in schedules):
            raise ConfigError(
                path, f"schedule[{index}].name", f"duplicate schedule name {schedule.name!r:.80}"
            )
        schedules.append(schedule)
    return schedules


def load(path: str, node: str | None = None, check_imports: bool = True) -> Config:
    """Read and validate the config at `path`. Raises ConfigError (one line) on any problem."""
    return from_dict(read_toml(path), path, node=node, check_imports=check_imports)


def state_dir_of(path: str) -> str:
    """The state folder the config at `path` names, as `load` resolves it, reading no other
    key: `fleetd stop` stops a fleet whose config was edited since into one that does not
    load. ConfigError if the file or that key cannot be read."""
    raw = read_toml(path)
    fleet = raw.get("fleet", {})
    if not isinstance(fleet, dict):
        raise ConfigError(path, "fleet", "must be a table")
    value = _check(
        path, "fleet.state_dir", "str", fleet.get("state_dir", FLEET_KEYS["state_dir"][1])
    )
    return _resolve(os.path.dirname(os.path.abspath(path)), value)


def read_toml(path: str) -> dict[str, Any]:
    """The TOML document at `path`; ConfigError (one line) if it cannot be read as one."""
    try:
        data = read_regular(path, MAX_CONFIG_BYTES + 1)
    except NotRegularFile as exc:
        raise ConfigError(path, "-", str(exc.strerror)) from None
    except FileNotFoundError:
        raise ConfigError(path, "-", "no such file") from None
    except OSError as exc:
        raise ConfigError(path, "-", f"cannot read: {exc.strerror}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(path, "-", f"over {MAX_CONFIG_BYTES >> 20} MiB: not a config file")
    try:
        raw = tomllib.loads(data.decode("utf-8-sig"))  # a BOM (some editors write one) is no key
    except UnicodeDecodeError as exc:
        raise ConfigError(path, "-", f"not UTF-8 text (byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, "-", f"TOML syntax error: {exc}") from None
    except RecursionError:
        raise ConfigError(
            path, "-", "TOML syntax error: arrays or tables nested too deep"
        ) from None
    return raw


def from_dict(
    raw: dict[str, Any], path: str, node: str | None = None, check_imports: bool = True
) -> Config:
    folder = os.path.dirname(os.path.abspath(path))
    for key in raw:
        if key not in SECTIONS:
            raise ConfigError(
                path, f"{key:.80}", f"unknown section (known: {', '.join(sorted(SECTIONS))})"
            )
    fleet = _section(path, "fleet", raw.get("fleet", {}), FLEET_KEYS, {})
    host = node if node is not None else fleet["node"] or socket.gethostname().split(".")[0]
    if not NAME_RE.match(host):  # --node, or the host's name: as fleet.node is checked
        raise ConfigError(
            path,
            "--node" if node else "fleet.node",
            f"must be a name of letters, digits, '.', '_' or '-', got {host!r:.80}",
        )
    state_dir = _resolve(folder, fleet["state_dir"])
    pythonpath = [_resolve(folder, p) for p in fleet["pythonpath"]]
    broker = resolve_broker_url(folder, fleet["broker"])
    if not broker.startswith(("sqlite:///", "redis://", "rediss://", "unix://")):
        raise ConfigError(
            path,
            "fleet.broker",
            f"must be sqlite:///FILE or redis://HOST:PORT/DB, got {broker!r:.80}",
        )
    problem = url_problem(broker)
    if problem:
        raise ConfigError(path, "fleet.broker", problem)
    if check_imports:
        for module in fleet["imports"]:
            if not module_exists(module, pythonpath):
                raise ConfigError(
                    path,
                    "fleet.imports",
                    f"module {module!r:.80} not found on pythonpath {pythonpath}",
                )

    control_raw = _section(path, "control", raw.get("control", {}), CONTROL_KEYS, {})
    bind = control_raw["bind"]
    if bind is None:
        bind = [f"ipc://{os.path.join(state_dir, 'control.sock')}"]
    resolved = [_resolve_endpoint(folder, b) for b in bind]
    for written, endpoint in zip(bind, resolved, strict=True):
        if endpoint.startswith("ipc://") and (wrong := ipc_path_problem(endpoint[len("ipc://") :])):
            raise ConfigError(path, "control.bind", f"endpoint {written!r:.80} {wrong}")
    bind = resolved
    named = control_raw["endpoints"] if isinstance(control_raw["endpoints"], dict) else {}
    endpoints = list(named.values()) if named else list(control_raw["endpoints"])
    keyed = [("control.bind", b) for b in bind] + [("control.endpoints", e) for e in endpoints]
    for key, endpoint in keyed:
        if not endpoint.startswith(("ipc://", "tcp://")):
            raise ConfigError(path, key, f"endpoint {endpoint!r:.80} must be ipc:// or tcp://")
    key_file = control_raw["curve_secret_key"] and _resolve(folder, control_raw["curve_secret_key"])
    auth_dir = control_raw["authorized_keys"] and _resolve(folder, control_raw["authorized_keys"])
    if any(b.startswith("tcp://") for b in bind) and not (key_file and auth_dir):
        raise ConfigError(
            path,
            "control.bind",
            "a tcp:// bind needs control.curve_secret_key and control.authorized_keys"
            " (make keys with `fleetctl keygen DIR`)",
        )
    hosts = {endpoint: host for host, endpoint in named.items()}
    control = ControlConfig(bind, endpoints, key_file, auth_dir, hosts)

    defaults = _section(path, "defaults", raw.get("defaults", {}), DEFAULT_KEYS, {})
    if defaults["concurrency"] is None:
        defaults["concurrency"] = min(os.cpu_count() or 1, MAX_POOL)

    rate_limits = raw.get("rate_limits", {})
    if not isinstance(rate_limits, dict):
        raise ConfigError(path, "rate_limits", 'must be a table of task name = "N/s|m|h"')
    for task_name, rate in rate_limits.items():
        refuse_nul(path, "rate_limits", task_name)
        try:
            parse_rate(rate)
        except ValueError as exc:
            raise ConfigError(path, f"rate_limits.{task_name:.80}", str(exc)) from None

    metrics = _section(path, "metrics", raw.get("metrics", {}), METRICS_KEYS, {})
    dashboard = _section(path, "dashboard", raw.get("dashboard", {}), DASHBOARD_KEYS, {})
    if not dashboard["bind"]:
        raise ConfigError(path, "dashboard.bind", 'must be "host:port", got ""')
    token_file = dashboard["token_file"] and _resolve(folder, dashboard["token_file"])

    schedules = parse_schedules(path, raw.get("schedule", []))

    worker_list = raw.get("worker", [])
    if not isinstance(worker_list, list) or not worker_list:
        raise ConfigError(path, "worker", "needs at least one [[worker]] table")
    workers: list[WorkerSpec] = []
    seen: set[str] = set()
    for index, entry in enumerate(worker_list):
        where = f"worker[{index}]"
        data = _section(path, where, entry, WORKER_KEYS, defaults)
        if data["name"] in seen:
            raise ConfigError(path, f"{where}.name", f"duplicate worker name {data['name']!r:.80}")
        seen.add(data["name"])
        if data["queues"] is None:
            data["queues"] = ["default"]  # where @task puts tasks unless told otherwise
        if (
            data["soft_time_limit"]
            and data["time_limit"]
            and data["soft_time_limit"] >= data["time_limit"]
        ):
            raise ConfigError(path, f"{where}.soft_time_limit", "must be below time_limit")
        if data["autoscale"]:  # the pool starts at MIN and follows the load: no fixed size
            data["concurrency"] = data["autoscale"][0]
        elif data["concurrency"] > MAX_POOL:  # as `pool grow` and autoscale's MAX: a typo
            key = f"{where}.concurrency" if "concurrency" in entry else "defaults.concurrency"
            raise ConfigError(
                path, key, f"must be <= {MAX_POOL} children, got {data['concurrency']!r:.80}"
            )
        workers.append(
            WorkerSpec(
                node=f"{data['name']}@{host}",
                rate_limits=dict(rate_limits),
                broker=broker,
                durability=fleet["durability"],
                lease=fleet["lease"],
                result_ttl=fleet["result_ttl"],
                imports=list(fleet["imports"]),
                pythonpath=pythonpath,
                state_dir=state_dir,
                schedules=[s.to_json() for s in schedules],
                **data,
            )
        )
    return Config(
        path=os.path.abspath(path),
        node=host,
        broker=broker,
        state_dir=state_dir,
        imports=fleet["imports"],
        pythonpath=pythonpath,
        lease=fleet["lease"],
        durability=fleet["durability"],
        result_ttl=fleet["result_ttl"],
        control=control,
        workers=workers,
        rate_limits=dict(rate_limits),
        metrics_bind=metrics["bind"],
        dashboard=DashboardConfig(dashboard["bind"], token_file),
        schedules=schedules,
    )


def non_reloadable_changes(old: Config, new: Config) -> list[str]:
    """Config keys a reload cannot apply (they need a restart)."""
    checks = {
        "control.bind": (old.control.bind, new.control.bind),
        "control.curve_secret_key": (old.control.curve_secret_key, new.control.curve_secret_key),
        "control.authorized_keys": (old.control.authorized_keys, new.control.authorized_keys),
        # The old generation gives its tasks back to the broker it holds them in, and a dead
        # worker's are given back by the live ones of its broker: none would be there.
        "fleet.broker": (old.broker, new.broker),
        "fleet.state_dir": (old.state_dir, new.state_dir),
        "fleet.node": (old.node, new.node),
        "metrics.bind": (old.metrics_bind, new.metrics_bind),
    }
    return [key for key, (a, b) in checks.items() if a != b]
