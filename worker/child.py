"""A pool child: runs one task at a time, read from its pipe, and writes back the outcome.

The worker sends each task as the raw JSON body the broker held; the child answers
with one frame per task: `{"id", "s": state, "r": result | "t"/"m"/"tb": error,
"c": countdown for a retry, "rt": runtime}`.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import time
import traceback
from typing import Any

from .protocol import FrameReader, encode
from .task import REGISTRY, Request, RetryTask, SoftTimeLimitExceeded

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
# How a child that stops between tasks (TERM, or the end of its pipe) leaves: a BYE frame,
# then this exit code. Every task it was given and did not answer never started. (The
# frame, which a task that calls os._exit(86) does not write, makes the code unforgeable.)
CLEAN_STOP = 86
BYE = encode({"bye": True})


# Looked up once, in the worker: every forked child then shares it instead of building
# its own ctypes library object.
_prctl = ctypes.CDLL(None, use_errno=True).prctl


def set_parent_death_signal(signum: int) -> None:
    """Have the kernel send `signum` to this process when its parent exits (Linux)."""
    _prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0)


def become_subreaper() -> bool:
    """Have orphaned descendants (a daemon's double fork, a dead child's subprocesses) become
    this process's children, not init's (Linux); False if the kernel refused."""
    return _prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


def reap_adopted() -> None:
    """Collect the descendants that ended after they were re-parented to us. Only between
    tasks: during one, a `subprocess.Popen` of the task must get its own child's status."""
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass


class Child:
    def __init__(self, task_fd: int, result_fd: int, revoke_fd: int) -> None:
        self.task_fd = task_fd
        self.result_fd = result_fd
        self.revoke_fd = revoke_fd  # ids revoked while their task waited in our pipe
        self.revoked: set[str] = set()
        self.busy = False  # from reading a task until its outcome is written: TERM waits
        self.in_task = False  # inside the task function: where a soft time limit may raise
        self.stop_when_idle = False

    def on_term(self, signum: int, frame: Any) -> None:
        if not self.busy:
            self.leave()
        self.stop_when_idle = True

    def leave(self) -> None:
        """Stop cleanly, between tasks."""
        with contextlib.suppress(OSError):
            os.write(self.result_fd, BYE)
        os._exit(CLEAN_STOP)

    def on_soft_limit(self, signum: int, frame: Any) -> None:
        if self.in_task:
            raise SoftTimeLimitExceeded("soft time limit exceeded")

    def run(self) -> None:
        signal.signal(signal.SIGTERM, self.on_term)
        signal.signal(signal.SIGUSR1, self.on_soft_limit)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the worker decides
        signal.signal(signal.SIGQUIT, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        for sig in (signal.SIGTTIN, signal.SIGTTOU, signal.SIGUSR2, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        reader = FrameReader()
        while True:
            reap_adopted()
            try:
                frames = reader.read_frames(self.task_fd)
            except InterruptedError:
                continue
            if frames is None:  # the worker closed our pipe: retire
                return
            for body in frames:
                self.busy = True
                reply = self.skip_revoked(body) or self.execute(body)
                if self.stop_when_idle:
                    reply["exit"] = True  # the worker must not hand us another task
                os.write(self.result_fd, encode(reply))
                self.busy = False
                if self.stop_when_idle:
                    return

    def skip_revoked(self, body: Any) -> dict[str, Any] | None:
        """A REVOKED outcome if this task was revoked while it waited in our pipe."""
        try:
            while data := os.read(self.revoke_fd, 65536):
                self.revoked.update(data.decode().split())
        except BlockingIOError:
            pass
        task_id = body.get("id") if isinstance(body, dict) else None
        if task_id in self.revoked:
            return {"id": task_id, "s": "REVOKED"}
        return None

    def execute(self, body: Any) -> dict[str, Any]:
        start = time.perf_counter()
        task_id = body.get("id") if isinstance(body, dict) else None
        try:
            name = body["name"]
            task = REGISTRY[name]
            args, kwargs = body.get("args", []), body.get("kwargs", {})
            task.request = Request(
                str(task_id), int(body.get("retries", 0)), int(body.get("deliveries", 1))
            )
            self.in_task = True
            try:
                result = task(*args, **kwargs)
            finally:
                self.in_task = False
            encode(result)  # not JSON-able must fail the task, not the pipe
            return {"id": task_id, "s": "SUCCESS", "r": result, "rt": time.perf_counter() - start}
        except RetryTask as retry:
            return {
                "id": task_id,
                "s": "RETRY",
                "c": retry.countdown,
                "t": type(retry.exc).__name__ if retry.exc else None,
                "m": str(retry.exc) if retry.exc else None,
            }
        except BaseException as exc:  # noqa: BLE001 - every failure is the task's outcome
            return {
                "id": task_id,
                "s": "FAILURE",
                "t": type(exc).__name__,
                "m": str(exc)[:2000],
                "tb": traceback.format_exc()[-8000:],
                "rt": time.perf_counter() - start,
            }
        finally:
            sys.stdout.flush()


def child_main(task_fd: int, result_fd: int, revoke_fd: int, worker_pid: int) -> None:
    """Entry point in a freshly forked child; never returns."""
    try:
        os.setpgid(0, 0)
    except OSError:
        pass
    set_parent_death_signal(signal.SIGKILL)
    become_subreaper()  # what a task starts stays below us, where the worker can end it
    if os.getppid() != worker_pid:  # the worker died before the death signal was set
        os._exit(1)
    child = Child(task_fd, result_fd, revoke_fd)
    try:
        child.run()
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
        os._exit(1)
    child.leave()
