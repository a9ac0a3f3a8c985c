"""The worker processes of one system, started by one command; signalled, timed, stopped by pid."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import psutil


class FleetDied(Exception):
    """A system's worker process exited while the harness still needed it."""


class Fleet:
    """The process a system's command started, with every process it has started since."""

    def __init__(self, command: list[str], env: dict[str, str], cwd: Path, log: Path) -> None:
        self.command = command
        self.log = log
        self.launched_at = time.time()
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                command,
                env=env,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def check_alive(self) -> None:
        """Raise FleetDied, with the end of the log, if the top process has exited."""
        if self.proc.poll() is not None:
            tail = self.log_tail()
            raise FleetDied(f"{self.command[0]} exited with {self.proc.returncode}: {tail}")

    def log_tail(self, lines: int = 3) -> str:
        """The last lines of the fleet's output, on one line."""
        text = self.log.read_text(errors="replace").strip().splitlines()[-lines:]
        return " | ".join(line.strip() for line in text) or "(no output)"

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def tree(self) -> list[psutil.Process]:
        """Every live process of the fleet: the top process first, then its descendants."""
        try:
            top = psutil.Process(self.proc.pid)
            return [top, *top.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def stop(self, timeout: float) -> float | None:
        """TERM the top process; seconds until the whole tree has exited, or None if it had not
        within `timeout` (then what is left is KILLed)."""
        tree = self.tree()
        start = time.perf_counter()
        self.signal(signal.SIGTERM)
        if self._wait_gone(tree, timeout):
            return time.perf_counter() - start
        self.kill()
        return None

    def kill(self) -> None:
        """Freeze the tree (STOP, so that nothing forks any more), then KILL all of it by pid."""
        frozen: dict[int, psutil.Process] = {}
        while new := [proc for proc in self.tree() if proc.pid not in frozen]:
            for proc in new:
                frozen[proc.pid] = proc
                _send(proc, signal.SIGSTOP)
        for proc in frozen.values():
            _send(proc, signal.SIGKILL)
        self._wait_gone(list(frozen.values()), timeout=5)

    def _wait_gone(self, tree: list[psutil.Process], timeout: float) -> bool:
        """Whether every process of `tree` exited (a zombie has) within `timeout`."""
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            self.proc.poll()  # reap our own child, the others' parents reap theirs
            if not any(_running(proc) for proc in tree):
                return True
            time.sleep(0.002)
        return False


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _send(proc: psutil.Process, sig: int) -> None:
    try:
        proc.send_signal(sig)
    except psutil.NoSuchProcess:
        pass


def process_memory(proc: psutil.Process) -> dict[str, float]:
    """RSS and USS of one process, in MiB."""
    info = proc.memory_full_info()
    return {"rss": info.rss / 2**20, "uss": info.uss / 2**20}
