"""`fleetd start|check|stop|reload -c CONFIG`: the arbiter's command line."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys

from worker.arguments import EXIT_USAGE, Parser, non_negative
from worker.imports import SAFE_PATH, describe_failure
from worker.logs import FORMATS, LEVELS, fill_standard_fds, setup_logging, shield_standard_streams
from worker.version import VersionAction

from . import config as configmod

EXIT_OK, EXIT_FAILED = 0, 1  # and EXIT_USAGE (2), from worker.arguments
IMPORT_TIMEOUT = 60.0  # seconds `fleetd check` gives the task modules to import

log = logging.getLogger("fleetd.cli")


def file_path(text: str) -> str:
    """A path given on the command line: "" would be taken as none given (the default)."""
    if not text or "\0" in text:
        raise argparse.ArgumentTypeError(f"must be a file's path, got {text!r}")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="fleetd", description="Run a fleet of task workers on this host.")
    parser.add_argument("--version", action=VersionAction)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    start = sub.add_parser("start", help="run the arbiter in the foreground")
    start.add_argument("-c", "--config", required=True, help="the fleet's TOML config")
    start.add_argument("--node", help="this host's name (default: [fleet] node, or the host name)")
    start.add_argument("--pidfile", type=file_path, help="default: {state_dir}/fleetd.pid")
    start.add_argument("--log-level", default="info", choices=LEVELS, type=str.lower)
    start.add_argument("--log-format", default="text", choices=FORMATS)
    check = sub.add_parser("check", help="validate a config and exit (2 if it is bad)")
    check.add_argument("-c", "--config", required=True)
    for verb, text in (
        ("stop", "warm-shut-down the running arbiter (TERM)"),
        ("reload", "graceful reload of the running arbiter (HUP)"),
    ):
        cmd = sub.add_parser(verb, help=text)
        cmd.add_argument("-c", "--config", required=True)
        cmd.add_argument("--pidfile", type=file_path, help="default: {state_dir}/fleetd.pid")
        if verb == "stop":
            cmd.add_argument(
                "--timeout",
                type=non_negative,
                default=None,
                help="seconds to wait for a warm exit before a cold one (QUIT)",
            )
    return parser


def main(argv: list[str] | None = None) -> int:
    fill_standard_fds()
    args = build_parser().parse_args(argv)
    if args.command == "stop":  # by the pid file: whatever the config holds by now
        try:
            state_dir = configmod.state_dir_of(args.config)
        except configmod.ConfigError as exc:
            print(f"fleetd: {exc}", file=sys.stderr)
            return EXIT_USAGE
        return signal_running(state_dir, args)
    try:
        cfg = configmod.load(
            args.config,
            node=getattr(args, "node", None),
            check_imports=args.command in ("start", "check", "reload"),  # as the arbiter's
        )
    except configmod.ConfigError as exc:
        print(f"fleetd: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.command in ("start", "check"):
        problems = folder_problems(cfg, args.config)
        for problem in problems:
            print(f"fleetd: {problem}", file=sys.stderr)
        if problems:
            return EXIT_USAGE
    if args.command == "check":
        from .control import ControlConfigError, check_bind

        try:
            control = cfg.control
            check_bind(control.bind, control.curve_secret_key, control.authorized_keys)
        except ControlConfigError as exc:  # what `fleetd start` would refuse (exit 2) too
            print(f"fleetd: {args.config}: {exc}", file=sys.stderr)
            return EXIT_USAGE
        dashboard = configmod.dashboard_problem(cfg.dashboard.bind, cfg.dashboard.token_file)
        if dashboard:  # what `fleetctl dashboard` would refuse at its start
            print(
                f"fleetd: {args.config}: dashboard.bind: {dashboard}, got {cfg.dashboard.bind!r}",
                file=sys.stderr,
            )
            return EXIT_USAGE
        try:
            configmod.read_token_file(cfg.dashboard.token_file)
        except ValueError as exc:
            print(f"fleetd: {args.config}: {exc}", file=sys.stderr)
            return EXIT_USAGE
        if cfg.broker.startswith(("redis://", "rediss://", "unix://")):
            from worker.brokers.redis import url_options_problem  # redis-py: here, not in start

            wrong = url_options_problem(cfg.broker)
            if wrong:
                print(f"fleetd: {args.config}: fleet.broker: {wrong}", file=sys.stderr)
                return EXIT_USAGE
        failure = probe_imports(cfg)
        if failure:
            print(f"fleetd: {args.config}: {failure}", file=sys.stderr)
            return EXIT_USAGE
        print(
            f"{args.config}: ok ({len(cfg.workers)} workers:"
            f" {', '.join(w.node for w in cfg.workers)})"
        )
        return EXIT_OK
    if args.command == "start":
        return start(cfg, args)
    return signal_running(cfg.state_dir, args)


def probe_imports(cfg: configmod.Config) -> str | None:
    """Import the task modules as a worker will (its pythonpath, a process of its own): why
    that fails, in one line naming the key, the module and file:line, or a schedule's task
    that none of them registers; None if all is well."""
    import subprocess  # `fleetd check` only: the arbiter, which runs this module, never needs it

    argv = [sys.executable, *SAFE_PATH, "-m", "worker.imports"]
    argv += [json.dumps(cfg.pythonpath), json.dumps(cfg.imports)]
    try:
        done = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=IMPORT_TIMEOUT,
            cwd=os.path.dirname(cfg.path),
        )
    except subprocess.TimeoutExpired:
        return f"fleet.imports: importing {', '.join(cfg.imports)} took over {IMPORT_TIMEOUT:g}s"
    lines = done.stdout.strip().splitlines()
    try:
        verdict = json.loads(lines[-1]) if lines else None
    except ValueError:
        verdict = None
    if not isinstance(verdict, dict):
        return (
            f"fleet.imports: importing {', '.join(cfg.imports)} ended its process"
            f" (exit code {done.returncode})"
        )
    if verdict.get("ok"):
        return unregistered_schedule(cfg, verdict.get("registered", []))
    return f"fleet.imports: {describe_failure(verdict)}"


def unregistered_schedule(cfg: configmod.Config, registered: list[str]) -> str | None:
    """The first [[schedule]] whose task no module of fleet.imports registers, as one line."""
    for index, schedule in enumerate(cfg.schedules):
        if schedule.task not in registered:
            return (
                f"schedule[{index}].task: task {schedule.task!r} is not registered by"
                f" fleet.imports ({', '.join(cfg.imports) or 'none'})"
            )
    return None


def folder_problems(cfg: configmod.Config, config_path: str) -> list[str]:
    """One line for each folder of the config that fleetd would fail to make or write in:
    the state_dir, and a SQLite broker's."""
    folders = [("fleet.state_dir", cfg.state_dir)]
    if cfg.broker.startswith("sqlite:///"):  # made absolute by the config: sqlite:////abs
        folders.append(("fleet.broker", os.path.dirname(cfg.broker[len("sqlite:///") :])))
    problems = []
    for key, folder in folders:
        problem = folder_problem(folder)
        if problem:
            problems.append(str(configmod.ConfigError(config_path, key, problem)))
    if cfg.broker.startswith("sqlite:///"):
        problem = queue_file_problem(cfg.broker[len("sqlite:///") :], cfg.state_dir)
        if problem:
            problems.append(str(configmod.ConfigError(config_path, "fleet.broker", problem)))
    return problems


def queue_file_problem(path: str, state_dir: str) -> str | None:
    """Why a SQLite queue file cannot be at `path`, if it cannot: where the state folder or
    one of its parents is, or where something that is no file is (a folder, a device)."""
    queue_file, state = os.path.abspath(path), os.path.abspath(state_dir)
    if state == queue_file or state.startswith(queue_file + os.sep):
        return f"{path} is the state_dir or a folder of it: give the queue file a path of its own"
    if os.path.exists(path) and not os.path.isfile(path):
        return f"{path} is no file (a folder, a device): give the queue file's path"
    return None


def folder_problem(folder: str) -> str | None:
    """Why `folder` cannot be made (parents too) or written in, if it cannot: found by making,
    and removing, a folder in it or else in its nearest parent that exists."""
    existing = folder
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"cannot make {folder}: {existing} is not a folder"
    # A folder of a name nobody else makes (os.mkdir, not tempfile: the arbiter calls this,
    # and tempfile brings random, shutil and the compressors into its memory for good).
    probe = os.path.join(existing, f".fleetd-check-{os.getpid()}-{os.urandom(6).hex()}")
    try:
        os.mkdir(probe, 0o700)
        os.rmdir(probe)
    except OSError as exc:
        verb = "write in" if existing == folder else "make"
        return f"cannot {verb} {folder}: {exc.strerror} (in {existing})"
    return None


def raise_open_files_limit() -> None:
    """Take the hard limit of open files as ours (systemd gives services 1024 of 524288, and
    says to raise it so): clients that hold connections to the control or metrics port must
    not run the arbiter out of descriptors, where libzmq aborts the process. Its children
    inherit it (nothing of fleetd uses select(), which a descriptor past 1024 would break);
    pool children put the first soft limit back for the tasks (FLEETD_NOFILE_SOFT)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            os.environ["FLEETD_NOFILE_SOFT"] = str(soft)  # what the tasks get back


def start(cfg: configmod.Config, args: argparse.Namespace) -> int:
    from .probe import start_probe

    raise_open_files_limit()
    # A broker the socket probe cannot ask (SQLite) is asked by a forked child meanwhile.
    answer = start_probe(cfg.broker)
    from .arbiter import Arbiter
    from .config import ControlConfigError
    from .orphans import AlreadyRunning
    from .pidfile import PidfileError

    problem = answer()
    if getattr(problem, "url", False):  # as `fleetd check` says it
        print(f"fleetd: {args.config}: fleet.broker: {problem}", file=sys.stderr)
        return EXIT_USAGE
    if problem:
        print(f"fleetd: {problem}", file=sys.stderr)
        return EXIT_FAILED
    setup_logging(args.log_level, args.log_format, f"fleetd@{cfg.node}")
    shield_standard_streams()  # its last line (below) must not hang on a log nobody reads
    arbiter = Arbiter(cfg, args.log_level, args.log_format, args.pidfile)
    try:
        code = arbiter.run()
    except ControlConfigError as exc:  # as `fleetd check` says it
        print(f"fleetd: {args.config}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (AlreadyRunning, PidfileError) as exc:
        print(f"fleetd: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if arbiter.failure:  # a worker could not boot: the fleet was ended (EXIT_BOOT_ERROR)
        print(f"fleetd: {arbiter.failure}", file=sys.stderr)
    return code


def signal_running(state_dir: str, args: argparse.Namespace) -> int:
    """`fleetd stop` or `reload`: signal the arbiter of `state_dir`, whose pid its pidfile
    (or --pidfile) holds, once its lock says one runs there: a stale pidfile may name
    another fleet's arbiter, which would be stopped instead."""
    from .orphans import someone_holds_lock
    from .pidfile import PidfileError, read_live_pid, stop

    path = args.pidfile or os.path.join(state_dir, "fleetd.pid")
    if not someone_holds_lock(state_dir):
        print(
            f"fleetd: no fleetd runs on state_dir {state_dir} (its lock is free)", file=sys.stderr
        )
        return EXIT_FAILED
    if not os.path.lexists(path):  # the arbiter writes it again each second until it can
        print(
            f"fleetd: a fleetd runs on state_dir {state_dir} (its lock is held), but its"
            f" pidfile {path} is missing (a full disk?): `fleetctl shutdown`, or TERM to the"
            " `fleetd start` process, stops it",
            file=sys.stderr,
        )
        return EXIT_FAILED
    try:
        pid = read_live_pid(path)
    except PidfileError as exc:
        print(f"fleetd: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if args.command == "reload":
        os.kill(pid, signal.SIGHUP)
        print(f"fleetd: reload sent to pid {pid}")
        return EXIT_OK
    if stop(pid, timeout=args.timeout):
        print(f"fleetd: pid {pid} stopped")
        return EXIT_OK
    print(f"fleetd: pid {pid} did not exit", file=sys.stderr)
    return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
