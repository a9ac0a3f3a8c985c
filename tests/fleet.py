"""A real fleet for end-to-end tests: writes a config, starts `fleetd`, stops it by pid.

Every wait is bounded; every process a test starts is ended by its pid in `stop()`,
also when the test fails, and `descendants()` lets a test check nothing is left.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil

from supervisor.keys import keygen
from worker import Client

BIN = Path(sys.executable).parent
FLEETD = str(BIN / "fleetd")
FLEETCTL = str(BIN / "fleetctl")

TASKS = '''
import os, signal, subprocess, sys, time
from worker import task, control_command, SoftTimeLimitExceeded

@task
def add(a, b):
    return a + b

@task
def noop():
    return None

@task
def fail(message="bad"):
    raise ValueError(message)

@task
def sleep(seconds, marker=None):
    if marker:
        with open(marker, "a") as f:
            f.write(f"start {os.getpid()}\\n")
    time.sleep(seconds)
    return os.getpid()

@task
def hold(gate, marker=None, limit=60):
    """Run until the test creates `gate` (at most `limit` seconds): no timing to guess."""
    if marker:
        with open(marker, "a") as f:
            f.write(f"start {os.getpid()}\\n")
    deadline = time.monotonic() + limit
    while not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.01)
    return os.getpid()

@task
def pid():
    return os.getpid()

@task
def take_signals(how, gate=None, marker=None):
    """Take TERM and USR1 for the task itself, as a library's own shutdown handling does:
    `ignore` them, `handle` them (a handler that does nothing) or `block` them; then hold
    until the test creates `gate`, if it names one."""
    if how == "block":
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGUSR1})
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        if how == "ignore":
            signal.signal(sig, signal.SIG_IGN)
        elif how == "handle":
            signal.signal(sig, lambda signum, frame: None)
    if marker:
        with open(marker, "a") as f:
            f.write(f"start {os.getpid()}\\n")
    deadline = time.monotonic() + 60
    while gate and not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.01)
    return os.getpid()

@task
def record(path, value):
    with open(path, "a") as f:
        f.write(f"{value}\\n")
    return value

@task
def exit_like_a_clean_stop(marker):
    with open(marker, "a") as f:
        f.write("ran\\n")
    os._exit(86)

@task
def suicide():
    os.kill(os.getpid(), signal.SIGKILL)

@task(time_limit=1)
def spawn_and_hang(pidfile):
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    with open(pidfile, "w") as f:
        f.write(str(proc.pid))
    time.sleep(600)

@task(soft_time_limit=0.5, time_limit=5)
def soft_limited():
    try:
        time.sleep(10)
    except SoftTimeLimitExceeded:
        return "cleaned up"

@task(bind=True, max_retries=2)
def flaky(self, path):
    with open(path, "a") as f:
        f.write("try\\n")
    if self.request.retries < 2:
        raise self.retry(countdown=0.1)
    return self.request.retries

@task
def poison(marker):
    with open(marker, "a") as f:
        f.write(f"{os.getpid()}\\n")
    os.kill(os.getpid(), signal.SIGKILL)

@task
def spawn_and_wait(pidfile, seconds):
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    with open(pidfile, "w") as f:
        f.write(str(proc.pid))
    time.sleep(seconds)
    proc.kill()
    proc.wait()
    return proc.pid

@task
def catch_soft(seconds, linger=0, marker=None):
    if marker:
        with open(marker, "a") as f:
            f.write(f"start {os.getpid()}\\n")
    try:
        time.sleep(seconds)
    except SoftTimeLimitExceeded:
        time.sleep(linger)
        return "cleaned up"
    return "not interrupted"

@task(bind=True)
def retry_once(self, path, countdown):
    with open(path, "a") as f:
        f.write(f"{time.time()}\\n")
    if self.request.retries < 1:
        raise self.retry(countdown=countdown)
    return self.request.retries

@task(bind=True)
def always_retry(self, path):
    with open(path, "a") as f:
        f.write("try\\n")
    raise self.retry(countdown=0.05, max_retries=2)

HOARD = []

@task
def hog(mb):
    HOARD.append(b"x" * (mb << 20))
    return os.getpid()

def journal_line(kind, task_id):
    """A journal line: S (started) or E (ended), the task, the process it ran in and that
    one's parent, its worker."""
    return f"{kind} {task_id} {os.getpid()} {os.getppid()}\\n"

def journaled(path, task_id, seconds):
    """Journal an execution's start and end, `seconds` apart."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, journal_line("S", task_id).encode())
        if seconds:
            time.sleep(seconds)
        os.write(fd, journal_line("E", task_id).encode())
    finally:
        os.close(fd)

@task(bind=True)
def journal(self, path, seconds=0.0, pad=""):
    """Writes a journal line when it starts and one when it ends: a log of every execution.
    (`pad` makes a big task of it.)"""
    journaled(path, self.request.id, seconds)
    return os.getpid()

@task(bind=True)
def journal_reply(self, path, seconds, size):
    """As journal, answering `size` characters: a reply larger than a pipe holds."""
    journaled(path, self.request.id, seconds)
    return "x" * size

@task
def stop_self():
    """SIGSTOP its own child: it runs on only when something sends it SIGCONT."""
    os.kill(os.getpid(), signal.SIGSTOP)
    return "resumed"

@task
def stop_process(pid):
    """SIGSTOP another process (a test's own redis-server): our worker's next broker call,
    the one that acks us, goes to a server that hangs."""
    os.kill(pid, signal.SIGSTOP)
    return pid

@task
def quit_worker(via):
    """SIGQUIT to the worker that runs us, from this process or from a shell of ours in a
    session of its own (which lives on a while after it sent it)."""
    worker = os.getppid()
    if via == "task":
        os.kill(worker, signal.SIGQUIT)
    else:
        script = f"kill -QUIT {worker}; sleep 2"
        subprocess.Popen(["sh", "-c", script], start_new_session=True)
    time.sleep(0.3)
    return worker

@task
def quit_arbiter():
    """SIGQUIT to the arbiter: our worker's parent."""
    with open(f"/proc/{os.getppid()}/stat") as f:
        arbiter = int(f.read().rsplit(")", 1)[1].split()[1])
    os.kill(arbiter, signal.SIGQUIT)
    time.sleep(0.3)
    return arbiter

@task
def say(text):
    print(text, flush=True)
    return text

@task
def log_warning(text):
    import logging
    logging.getLogger("a_task").warning(text)
    return text

@control_command
def hello(worker, who="world"):
    return {"ok": f"hello {who} from {worker.node}"}
'''


def fleetd(*args: str) -> subprocess.CompletedProcess[str]:
    """`fleetd ARGS...` run to its end (check, stop, a start that fails), its output as text."""
    return subprocess.run([FLEETD, *args], capture_output=True, text=True, timeout=60)


def fleetctl_on(broker: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`fleetctl ARGS...` on the broker at `broker` ($FLEET_BROKER, no config), run to its end."""
    return subprocess.run(
        [FLEETCTL, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "FLEET_BROKER": broker},
    )


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def executions(journal: Path) -> collections.Counter[str]:
    """How many times each task id started, from a `tasks.journal` file."""
    lines = journal.read_text().splitlines() if journal.exists() else []
    return collections.Counter(line.split()[1] for line in lines if line.startswith("S "))


def wait_for(
    condition: Callable[[], Any],
    timeout: float = 10.0,
    interval: float = 0.02,
    message: str = "condition",
) -> Any:
    """Poll `condition` until it returns something truthy; AssertionError after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


# How long a test watches for something that must NOT happen (a redelivery, a second start,
# a process that should stay). What would happen shows within one turn of a worker's loop,
# which an idle worker takes at once (the broker's wakeup fd wakes it): a few tens of ms.
# QUIET leaves ten times that for a loaded 2-core machine.
QUIET = 0.5


def alive(proc: psutil.Process) -> bool:
    """Whether this very process (pid and start time) still runs (a zombie does not)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def holds(condition: Callable[[], Any], seconds: float = QUIET, interval: float = 0.02) -> bool:
    """Whether `condition` stays truthy for `seconds` (polled; False the moment it is not)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not condition():
            return False
        time.sleep(interval)
    return bool(condition())


class Fleet:
    """One fleetd host in `folder`, with the test task module `tasks.py`."""

    def __init__(
        self,
        folder: Path,
        workers: list[dict[str, Any]] | None = None,
        defaults: dict[str, Any] | None = None,
        fleet: dict[str, Any] | None = None,
        control: dict[str, Any] | None = None,
        rate_limits: dict[str, str] | None = None,
        extra: str = "",
        node: str = "h1",
        launcher: tuple[str, ...] = (),
    ) -> None:
        self.folder = folder
        self.node = node
        self.launcher = launcher  # words before `fleetd start`: `ip netns exec NS` (it execs)
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / "tasks.py").exists():
            (folder / "tasks.py").write_text(textwrap.dedent(TASKS))
        fleet_table = {
            "node": node,
            "broker": "sqlite:///queue.db",
            "state_dir": "state",
            "imports": ["tasks"],
            "lease": 30,
            **(fleet or {}),
        }
        defaults_table = {"concurrency": 2, **(defaults or {})}
        workers = workers or [{"name": "w", "queues": ["default"]}]
        lines = ["[fleet]", *toml_items(fleet_table), "", "[defaults]", *toml_items(defaults_table)]
        if control:
            lines += ["", "[control]", *toml_items(control)]
        if rate_limits:
            lines += ["", "[rate_limits]", *toml_items(rate_limits)]
        for w in workers:
            lines += ["", "[[worker]]", *toml_items(w)]
        self.config = folder / "fleet.toml"
        self.config.write_text("\n".join(lines) + "\n" + extra)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = folder / "fleetd.log"
        self._client: Client | None = None
        self.seen_pids: set[int] = set()

    @property
    def client(self) -> Client:
        if self._client is None:
            self._client = Client.from_config(str(self.config))
        return self._client

    # --- running ---------------------------------------------------------------------
    def start(
        self,
        *args: str,
        wait: bool = True,
        env: dict[str, str] | None = None,
        output: int | None = None,
    ) -> Fleet:
        """Run `fleetd start`, its log (stdout and stderr) into fleetd.log, or into the
        descriptor `output` (then fleet.log() has nothing)."""
        log = open(self.log_path, "ab") if output is None else os.fdopen(os.dup(output), "ab")
        self.proc = subprocess.Popen(
            [
                *self.launcher,
                FLEETD,
                "start",
                "-c",
                str(self.config),
                "--log-level",
                "debug",
                *args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.folder,
            env={**os.environ, **(env or {})},
        )
        log.close()
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, count: int | None = None, timeout: float = 15.0) -> list[dict[str, Any]]:
        """Wait until every worker answers ping (`count` nodes, default: all in the config)."""
        import tomllib

        expected = (
            count if count is not None else len(tomllib.loads(self.config.read_text())["worker"])
        )

        def ready() -> Any:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"fleetd exited with {self.proc.returncode}:\n{self.log()}")
            out = self.ctl("--json", "--timeout", "0.5", "ping", check=False)
            try:
                replies = json.loads(out.stdout)["replies"]
            except (ValueError, KeyError):
                return None
            return replies if len(replies) >= expected else None

        return wait_for(ready, timeout, 0.05, "every worker to answer ping")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.remember_pids()
        os.kill(self.proc.pid, signum)

    def wait_exit(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"fleetd did not exit within {timeout}s:\n{self.log()}") from None

    def stop(self) -> None:
        """End fleetd and everything it started, by pid: TERM, QUIT if tasks hold it up,
        then KILL."""
        if self.proc is not None and self.proc.poll() is None:
            self.remember_pids()
            for signum, grace in ((signal.SIGTERM, 10), (signal.SIGQUIT, 15), (signal.SIGKILL, 5)):
                self.proc.send_signal(signum)
                try:
                    self.proc.wait(grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
        for pid in self.leftovers():
            with contextlib.suppress(psutil.Error):
                psutil.Process(pid).kill()
        if self._client is not None:
            self._client.close()

    # --- looking -----------------------------------------------------------------------
    def descendants(self) -> list[psutil.Process]:
        assert self.proc is not None
        with contextlib.suppress(psutil.Error):
            return psutil.Process(self.proc.pid).children(recursive=True)
        return []

    def worker_pids(self) -> list[int]:
        """The live workers' pids. One that just exited (a zombie the arbiter has yet to reap,
        whose command line reads as an error) is not one, and hides none of the others."""
        assert self.proc is not None
        try:
            children = psutil.Process(self.proc.pid).children()
        except psutil.Error:
            return []
        pids = []
        for p in children:
            with contextlib.suppress(psutil.Error):
                if "worker" in " ".join(p.cmdline()):
                    pids.append(p.pid)
        return pids

    def child_pids(self, worker_pid: int | None = None) -> list[int]:
        pids = [worker_pid] if worker_pid else self.worker_pids()
        out = []
        for pid in pids:
            with contextlib.suppress(psutil.Error):
                out += [c.pid for c in psutil.Process(pid).children()]
        return out

    def remember_pids(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.seen_pids |= {p.pid for p in self.descendants()}

    def leftovers(self) -> list[int]:
        """Processes this fleet started (seen so far) that are still alive (zombies excluded)."""
        self.remember_pids()
        alive = []
        for pid in self.seen_pids:
            with contextlib.suppress(psutil.Error):
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
        return alive

    def ctl(
        self, *args: str, check: bool = True, timeout: float = 30.0
    ) -> subprocess.CompletedProcess[str]:
        out = subprocess.run(
            [FLEETCTL, "-c", str(self.config), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.folder,
        )
        if check and out.returncode != 0:
            raise AssertionError(
                f"fleetctl {' '.join(args)} exited {out.returncode}: {out.stdout}{out.stderr}"
            )
        return out

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def infos(self, ids: list[str]) -> list[dict[str, Any]]:
        return [self.client.handle(i).info() for i in ids]

    def wait_all_final(self, ids: list[str], timeout: float = 60.0) -> list[dict[str, Any]]:
        def final() -> Any:
            infos = self.infos(ids)
            return (
                infos
                if all(i["state"] in ("SUCCESS", "FAILURE", "REVOKED") for i in infos)
                else None
            )

        return wait_for(final, timeout, 0.05, f"{len(ids)} tasks to finish")


def toml_items(table: dict[str, Any]) -> list[str]:
    return [
        f"{json.dumps(k) if not k.isidentifier() else k} = {json.dumps(v)}"
        for k, v in table.items()
    ]


@contextlib.contextmanager
def running(fleet: Fleet, *args: str) -> Iterator[Fleet]:
    try:
        yield fleet.start(*args)
    finally:
        fleet.stop()


@contextlib.contextmanager
def silent_host(folder: Path) -> Iterator[str]:
    """The `[control]` lines of a host whose config names one more host, h9: a peer that
    takes TCP connections and never says a word (a hung host), while the block runs."""
    _, secret = keygen(folder / "keys")
    (folder / "authorized").mkdir(exist_ok=True)
    with socket.socket() as peer:
        peer.bind(("127.0.0.1", 0))
        peer.listen()
        yield (
            '\n[control]\nbind = ["ipc://state/control.sock"]\n'
            f'endpoints = {{ h9 = "tcp://127.0.0.1:{peer.getsockname()[1]}" }}\n'
            f'curve_secret_key = "{secret}"\nauthorized_keys = "{folder / "authorized"}"\n'
        )
