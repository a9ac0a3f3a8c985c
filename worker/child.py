"""A pool child: runs the tasks read from its pipe and writes back the outcome of each.

The worker sends each task as `[deliveries, body]`, the raw JSON body the broker held
behind its delivery count; the child answers with one frame per task: `{"id",
"s": state, "r": the result as JSON text | "t"/"m"/"tb": error, "c": countdown for a
retry, "rt": runtime}`. Whatever a task returns or raises, the answer is a frame the
worker can store: a value JSON cannot hold fails the task, never the child.

Sync tasks are answered in order. The first `async def` task a child is given turns it into
an event-loop child (worker/aio.py) for the rest of its life: its async tasks run at once
and are answered by id as each ends; a sync task it is given still runs alone (the worker
hands it one only when no async task is in flight there).
"""

from __future__ import annotations

import _signal
import contextlib
import faulthandler
import json
import math
import os
import resource
import signal
import sys
import time
import traceback
from typing import Any

from .brokers.base import (
    BAD_MESSAGE,
    FAILURE,
    REVOKED,
    SUCCESS,
    Delivery,
    Outcome,
    Retry,
    utf8_text,
)
from .files import file_identity
from .protocol import FrameReader, ProtocolError, Undecodable, encode, line_id, write_all
from .task import REGISTRY, Request, RetryTask, SoftTimeLimitExceeded
from .tree import STRAY_SIGNALS, become_subreaper, set_dispositions, set_parent_death_signal

# How a child that stops between tasks (TERM, or the end of its pipe) leaves: a BYE frame,
# then this exit code. Every task it was given and did not answer never started. (The
# frame, which a task that calls os._exit(86) does not write, makes the code unforgeable.)
CLEAN_STOP = 86
BYE = encode({"bye": True})
TYPE_NAME_LIMIT = 200  # characters kept of an error's type name
MESSAGE_LIMIT = 2000  # and of its message
TRACEBACK_LIMIT = 8000  # and of its traceback (the end of it)
ENCODE_ERROR = "EncodeError"  # a result or outcome JSON cannot hold (kombu's name for it)
BAD_REPLY = "BadReply"  # the worker read something else than an outcome from the child

# Results are JSON in the strict sense: NaN and Infinity are not, and no other client reads them.
encode_result = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode


def printable(value: Any, limit: int) -> str:
    """`value` as text a broker can store: at most `limit` characters, lone surrogates (which
    UTF-8 cannot hold) written as escapes. A non-str is shown as its repr."""
    text = (value if isinstance(value, str) else repr(value))[:limit]
    if not text.isascii():
        text = text.encode("utf-8", "backslashreplace").decode()[:limit]
    return text


def describe(exc: BaseException) -> tuple[str, str]:
    """An exception's type name and message, whatever its class does when asked for them."""
    try:
        name = printable(type(exc).__name__, TYPE_NAME_LIMIT)
    except BaseException:  # noqa: BLE001 - a metaclass may do anything
        name = "Exception"
    try:
        message = printable(str(exc), MESSAGE_LIMIT)
    except BaseException as error:  # noqa: BLE001 - its __str__ raised
        message = f"<{name}: str() raised {type(error).__name__}>"
    return name, message


def traceback_text() -> str:
    """The traceback of the exception being handled, its end if it is long."""
    try:
        return printable(traceback.format_exc()[-TRACEBACK_LIMIT:], TRACEBACK_LIMIT)
    except BaseException:  # noqa: BLE001 - formatting calls the exception's own methods
        return ""


def encode_reply(reply: dict[str, Any]) -> bytes:
    """The reply's frame. An outcome that JSON cannot hold, or too large for a frame, fails
    the task: the worker must always get a frame it can read."""
    try:
        return encode(reply)
    except (TypeError, ValueError, RecursionError, ProtocolError) as exc:
        failure = {key: reply[key] for key in ("id", "rt", "exit") if key in reply}
        message = printable(f"its outcome cannot be sent: {exc}", MESSAGE_LIMIT)
        return encode({**failure, "s": "FAILURE", "t": ENCODE_ERROR, "m": message})


def flush_output() -> None:
    """Flush what tasks printed. A task may have closed fd 1 or put anything in sys.stdout
    or sys.stderr (None, an object whose flush raises): what it printed is lost then,
    never the child, nor the outcome of the task that did it."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


RESTORE_TRIES = 10  # raised_after's: a timer is stopped at the first, a handler runs once more
EVERY_SIGNAL = signal.valid_signals()  # blocked from a task's end until restore unblocks them
TIMER_SIGNALS = {signal.SIGALRM, signal.SIGPROF, signal.SIGVTALRM}


def drop_pending(signals: set[signal.Signals]) -> None:
    """Take those of `signals` that wait, blocked, out of the way: each would be delivered
    when unblocked (a timer's, to its default action: the child's end)."""
    while waiting := signal.sigpending() & signals:
        signal.sigtimedwait(waiting, 0)


# The limits that a task may lower for itself and that would end or fail the next one, left
# so (restore_limits): its CPU time or a file's size (SIGXCPU, SIGXFSZ), its memory (a
# MemoryError), its open files, its processes, a real-time thread's CPU time.
RESOURCE_LIMITS = [
    getattr(resource, f"RLIMIT_{name}")
    for name in ("CPU", "FSIZE", "AS", "DATA", "STACK", "NOFILE", "NPROC", "RTTIME")
    if hasattr(resource, f"RLIMIT_{name}")
]


class OutputFds:
    """Where the child's fds 1 and 2 write (the worker's output pipe), kept on a descriptor
    of its own, so that a task that closed them, or put another file there (and a later
    task's open() took fd 1: its prints would go into that file), leaves neither so."""

    def __init__(self) -> None:
        self.copies = os.dup(1), os.dup(2)  # not inheritable: no program a task starts holds them
        self.identities = file_identity(1), file_identity(2)

    def replaced(self) -> bool:
        return (file_identity(1), file_identity(2)) != self.identities

    def put_back(self) -> tuple[Any, Any]:
        """fds 1 and 2 as they were, and new sys.stdout and sys.stderr over them."""
        for fd, copy in zip((1, 2), self.copies, strict=True):
            with contextlib.suppress(OSError):
                os.dup2(copy, fd)
        return tuple(  # type: ignore[return-value]
            open(fd, "w", encoding="utf-8", errors="backslashreplace", closefd=False)  # noqa: SIM115
            for fd in (1, 2)
        )


def closed(stream: Any) -> bool:
    """Whether a stream is one that was closed; anything a task module put in sys.stdout (a
    logger's writer, None) is as it is."""
    try:
        return getattr(stream, "closed", False) is True
    except Exception:  # noqa: BLE001 - a property of anybody's object may raise
        return False


def reap_adopted() -> None:
    """Collect the descendants that ended after they were re-parented to us. Only between
    tasks: during one, a `subprocess.Popen` of the task must get its own child's status."""
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass


class Child:
    def __init__(self, task_fd: int, result_fd: int, revoke_fd: int, last_task: int = 0) -> None:
        self.pid = os.getpid()  # a copy that a task forks is another process: see leave_if_forked
        self.task_fd = task_fd
        self.result_fd = result_fd
        self.revoke_fd = revoke_fd  # ids revoked while their task waited in our pipe
        self.revoked: set[str] = set()
        self.revoke_tail = b""  # the start of an id whose end is not in the pipe yet
        self.busy = False  # from reading a task until its outcome is written: TERM waits
        self.in_task = False  # inside the task function: where a soft time limit may raise
        self.stop_when_idle = False
        self.frames_read = 0  # task frames, counted as the worker counts those it writes
        # The worker hands no frame past this one: we leave with its reply, without waiting
        # for the worker to close our pipe (a wake-up and a turn of its loop per recycling).
        self.last_task = last_task
        self.async_names = {name for name, task in REGISTRY.items() if task.is_async}

    def on_term(self, signum: int, frame: Any) -> None:
        if not self.busy:
            self.leave()
        self.stop_when_idle = True

    def leave(self) -> None:
        """Stop cleanly, between tasks."""
        self.leave_if_forked(None)
        with contextlib.suppress(OSError):
            os.write(self.result_fd, BYE)
        os._exit(CLEAN_STOP)

    def leave_if_forked(self, exc: BaseException | None) -> None:
        """End here if we are a copy that a task forked and that left the task function
        (returned, or raised `exc`) instead of calling os._exit: the copy must never answer
        for a task, nor read one. It exits as a Python program would, without the atexit
        handlers it shares with the child. (raised and returned, where every task's end
        becomes its reply, sync or async, call it first.)"""
        if os.getpid() == self.pid:
            return
        code = 0
        if isinstance(exc, SystemExit):
            code = exit_code(exc)
        elif exc is not None:
            traceback.print_exception(exc)
            code = 1
        flush_output()
        os._exit(code)

    def on_soft_limit(self, signum: int, frame: Any) -> None:
        if self.in_task:
            raise SoftTimeLimitExceeded("soft time limit exceeded")

    def run(self) -> None:
        # What a task may change and the child or the next tasks rely on, put back after
        # each task (restore): every signal's disposition, the signal mask, the output
        # streams, the recursion limit, the working directory.
        self.handlers: dict[int, Any] = {
            signal.SIGTERM: self.on_term,
            signal.SIGUSR1: self.on_soft_limit,
            signal.SIGINT: signal.SIG_IGN,  # the worker decides
            signal.SIGHUP: signal.SIG_IGN,
            signal.SIGPIPE: signal.SIG_IGN,  # Python's: a closed pipe is an EPIPE, not a death
            signal.SIGQUIT: signal.SIG_DFL,
        }
        for default in (signal.SIGTTIN, signal.SIGTTOU, signal.SIGCHLD, *STRAY_SIGNALS):
            self.handlers[default] = signal.SIG_DFL  # a task's code sees Python's defaults
        set_dispositions(self.handlers)
        self.mask = _signal.pthread_sigmask(signal.SIG_BLOCK, ())
        self.recursion_limit = sys.getrecursionlimit()
        self.streams = sys.stdout, sys.stderr
        self.output = OutputFds()
        self.cwd = os.getcwd()
        self.limits = {which: resource.getrlimit(which) for which in RESOURCE_LIMITS}
        reader = FrameReader(tolerant=True)
        while True:
            reap_adopted()
            try:
                frames = reader.read_frames(self.task_fd)
            except InterruptedError:
                continue
            if frames is None:  # the worker closed our pipe: retire
                return
            for index, frame in enumerate(frames):
                if self.async_names and self.is_async(frame):
                    from .aio import EventLoopChild

                    EventLoopChild(self, reader).run(frames[index:])  # never returns
                self.frames_read += 1
                self.busy = True
                try:
                    reply = self.answer(frame)
                    self.restore(alone=True)  # before the reply: see restore
                except BaseException as exc:  # noqa: BLE001 - see raised_after
                    reply = self.raised_after(frame, exc)
                if self.frames_read == self.last_task:
                    self.stop_when_idle = True
                if self.stop_when_idle:
                    reply["exit"] = True  # the worker must not hand us another task
                write_all(self.result_fd, encode_reply(reply))
                self.busy = False
                if self.stop_when_idle:
                    return

    def restore(self, alone: bool) -> None:
        """Undo what a task did to the child's own state: a handler of its own for TERM (a
        library's graceful shutdown) or USR1, TERM blocked or ignored, another disposition
        for any signal the child set (SIGCHLD ignored, SIGPIPE back to its default),
        sys.stdout or sys.stderr replaced, the recursion limit; and, `alone` (no other task
        runs in this process, as async ones may), an alarm (or ITIMER_REAL) left running,
        a CPU-time timer (ITIMER_PROF, a sampling profiler's, or ITIMER_VIRTUAL), a
        faulthandler dump armed for later, a CPU-time limit, another working directory.
        Else a warm shutdown would wait on a child that runs every task in its pipe, a soft
        time limit would raise nothing, a later task's subprocesses would all exit 0
        (SIGCHLD ignored: the kernel reaps them first) or a write to a closed socket would
        end the child (SIGPIPE), the next tasks would print into the stream a task left (or
        fail there), a timer would go off in a later task (into the handler the task left,
        raising in a task that never asked for it, or, with none, ending the child: the
        next task's death, counted against it), and later tasks would open their relative
        paths elsewhere (or nowhere: a directory the task removed). _signal's calls are
        signal's without the enums those wrap around handlers and masks, which cost some
        5 us a task.

        Called before the task's reply is written: a TERM that the task blocked is taken
        here (the reply then says we leave), and one that it ignored or took with its own
        handler, the worker sends again once it reads the reply, when our handler is back."""
        if alone:  # first: a timer's handler the task left must not go off in what follows
            signal.alarm(0)
            signal.setitimer(signal.ITIMER_PROF, 0)
            signal.setitimer(signal.ITIMER_VIRTUAL, 0)
            drop_pending(TIMER_SIGNALS)  # went off while execute blocked them
        set_dispositions(self.handlers)
        _signal.pthread_sigmask(signal.SIG_SETMASK, self.mask)
        if self.output.replaced() or any(map(closed, self.streams)):
            self.streams = self.output.put_back()
        sys.stdout, sys.stderr = self.streams
        if sys.getrecursionlimit() != self.recursion_limit:
            sys.setrecursionlimit(self.recursion_limit)
        if alone:
            faulthandler.cancel_dump_traceback_later()
            self.restore_limits()
            self.restore_cwd()

    def restore_limits(self) -> None:
        """A resource limit the task changed (its memory, open files, file size, CPU time):
        the next task gets the child's again; a hard limit lowered cannot be raised back,
        so a fresh child takes over after this task."""
        for which, limit in self.limits.items():
            if resource.getrlimit(which) != limit:
                try:
                    resource.setrlimit(which, limit)
                except (ValueError, OSError):
                    self.stop_when_idle = True

    def raised_after(self, frame: Any, exc: BaseException, alone: bool = True) -> dict[str, Any]:
        """The reply for a task whose leftovers raised in our own code once it had returned
        (a handler of its own that its timer or another process set off before restore put
        ours back): its failure, and a fresh child after it, as what else it left is not
        known. Else the child would die, and the task that ran would run again."""
        for _ in range(RESTORE_TRIES):  # the handler may go off again until restore stops it
            try:
                self.leave_if_forked(exc)
                self.restore(alone)
                break
            except BaseException as again:  # noqa: BLE001
                exc = again
        self.stop_when_idle = True
        body = frame[1] if isinstance(frame, list) and len(frame) == 2 else None
        task_id = body.get("id") if isinstance(body, dict) else None
        return self.failure(task_id, exc, time.perf_counter())

    def restore_cwd(self) -> None:
        try:
            moved = os.getcwd() != self.cwd
        except OSError:  # it was removed
            moved = True
        if moved:
            with contextlib.suppress(OSError):  # ours removed too: the next task says so
                os.chdir(self.cwd)

    def is_async(self, frame: Any) -> bool:
        """The frame is a task whose function is an `async def`."""
        if isinstance(frame, Undecodable):
            return False
        body = frame[1]
        return isinstance(body, dict) and body.get("name") in self.async_names

    def answer(self, frame: Any) -> dict[str, Any]:
        """The outcome of one task frame, `[deliveries, body]`."""
        if isinstance(frame, Undecodable):  # the worker read it, but we may not (nesting)
            return {"s": "FAILURE", "t": BAD_MESSAGE, "m": printable(frame.reason, MESSAGE_LIMIT)}
        deliveries, body = frame
        return self.skip_revoked(body) or self.execute(body, deliveries)

    def skip_revoked(self, body: Any) -> dict[str, Any] | None:
        """A REVOKED outcome if this task was revoked while it waited in our pipe."""
        try:
            while data := os.read(self.revoke_fd, 65536):
                *ids, self.revoke_tail = (self.revoke_tail + data).split(b"\n")
                self.revoked.update(map(line_id, ids))
        except BlockingIOError:
            pass
        task_id = body.get("id") if isinstance(body, dict) else None
        if task_id in self.revoked:
            return {"id": task_id, "s": "REVOKED"}
        return None

    def execute(self, body: dict[str, Any], deliveries: int) -> dict[str, Any]:
        start = time.perf_counter()
        task_id = body.get("id")
        try:
            task = REGISTRY[body["name"]]
            task.request = Request(str(task_id), int(body.get("retries", 0)), deliveries)
            self.in_task = True
            try:
                result = task(*body.get("args", []), **body.get("kwargs", {}))
            finally:
                # First: a handler the task left (one that raises, say) goes off no more
                # until restore has put ours back, however many signals come meanwhile.
                _signal.pthread_sigmask(signal.SIG_BLOCK, EVERY_SIGNAL)
                self.in_task = False
        except BaseException as exc:  # noqa: BLE001 - every failure is the task's outcome
            return self.raised(task_id, exc, start)
        finally:
            flush_output()
        return self.returned(task_id, result, start)

    def raised(self, task_id: Any, exc: BaseException, start: float) -> dict[str, Any]:
        """The reply for a task that raised `exc`: a retry it asked for, else its failure."""
        self.leave_if_forked(exc)
        if isinstance(exc, RetryTask):
            reply: dict[str, Any] = {"id": task_id, "s": "RETRY", "c": exc.countdown}
            if exc.exc is not None:
                reply["t"], reply["m"] = describe(exc.exc)
            return reply
        return self.failure(task_id, exc, start)

    def returned(self, task_id: Any, result: Any, start: float) -> dict[str, Any]:
        """The reply for a task that returned `result`: a result JSON cannot hold fails it."""
        self.leave_if_forked(None)
        try:
            result_json = encode_result(result)
        except BaseException as exc:  # noqa: BLE001 - a result JSON cannot hold fails the task
            name, message = describe(exc)
            failure = self.failure(task_id, exc, start)
            failure.update(
                t=ENCODE_ERROR,
                m=printable(f"the result is not JSON ({name}: {message})", MESSAGE_LIMIT),
            )
            return failure
        return {"id": task_id, "s": "SUCCESS", "r": result_json, "rt": time.perf_counter() - start}

    @staticmethod
    def failure(task_id: Any, exc: BaseException, start: float) -> dict[str, Any]:
        name, message = describe(exc)
        return {
            "id": task_id,
            "s": "FAILURE",
            "t": name,
            "m": message,
            "tb": traceback_text(),
            "rt": time.perf_counter() - start,
        }


def exit_code(exc: SystemExit) -> int:
    """The exit status Python gives `sys.exit(code)`: None is 0, an int is itself (its
    low byte), anything else is printed to stderr and is 1."""
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code & 0xFF
    with contextlib.suppress(BaseException):
        print(exc.code, file=sys.stderr)
    return 1


def restore_open_files_limit() -> None:
    """Tasks get the open-files limit fleetd was started with: the arbiter took the hard one
    for the fleet's own descriptors (supervisor.cli), but a task's code, or a program it
    starts, may use select() (past 1,024 it breaks) or close every descriptor up to it."""
    soft = os.environ.get("FLEETD_NOFILE_SOFT", "")
    if soft.isascii() and soft.isdigit():
        with contextlib.suppress(ValueError, OSError):
            hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(int(soft), hard), hard))


def child_main(
    task_fd: int, result_fd: int, revoke_fd: int, worker_pid: int, last_task: int = 0
) -> None:
    """Entry point in a freshly forked child; never returns. `last_task`: the number of the
    task frame after which it leaves (max_tasks_per_child, with the worker's jitter; 0: none)."""
    try:
        os.setpgid(0, 0)
    except OSError:
        pass
    set_parent_death_signal(signal.SIGKILL)
    become_subreaper()  # what a task starts stays below us, where the worker can end it
    if os.getppid() != worker_pid:  # the worker died before the death signal was set
        os._exit(1)
    restore_open_files_limit()
    child = Child(task_fd, result_fd, revoke_fd, last_task)
    try:
        child.run()
    except BaseException:  # noqa: BLE001
        with contextlib.suppress(BaseException):  # stderr may be gone: the exit is not
            traceback.print_exc()
        os._exit(1)
    child.leave()


# --- in the worker: what a child's reply says, trusting nothing in it ---------------
def outcome_of(delivery: Delivery, reply: dict[str, Any], node: str) -> Outcome | Retry:
    """What a child's reply says of its task. A reply that makes no sense (a broken child,
    or a task that wrote to its pipe) fails the task; nothing in it can raise here."""
    state = reply.get("s")
    runtime = seconds_or_none(reply.get("rt"))
    if state == REVOKED:
        return Outcome(delivery.id, REVOKED, node=node)
    if state == "RETRY":
        return retry_of(delivery, reply, node)
    if state == SUCCESS and utf8_text(reply.get("r")):
        return Outcome(delivery.id, SUCCESS, result_json=reply["r"], node=node, runtime=runtime)
    if state == FAILURE:
        return Outcome(
            delivery.id,
            FAILURE,
            exc_type=printable(reply.get("t"), TYPE_NAME_LIMIT),
            exc_message=printable(reply.get("m"), MESSAGE_LIMIT),
            traceback=printable(reply.get("tb") or "", TRACEBACK_LIMIT),
            node=node,
            runtime=runtime,
        )
    return bad_reply(delivery, f"no outcome in it: {printable(reply, 200)}", node)


def retry_of(delivery: Delivery, reply: dict[str, Any], node: str) -> Outcome | Retry:
    """The task back to the broker with its retry count raised, after the reply's countdown."""
    countdown = seconds_or_none(reply.get("c"))
    if countdown is None:
        return bad_reply(delivery, f"no countdown to retry after: {printable(reply, 200)}", node)
    try:  # a body `body_problem` passed, but read deeper in the stack here
        body = json.loads(delivery.body)
        body["retries"] += 1
        text = json.dumps(body)
    # Too deep for this stack, or a retry count of more digits than Python converts
    except (RecursionError, ValueError) as exc:
        return Outcome(delivery.id, FAILURE, exc_type=BAD_MESSAGE, exc_message=str(exc), node=node)
    exc_type, message = reply.get("t"), reply.get("m")
    return Retry(
        delivery.id,
        text,
        time.time() + countdown,
        None if exc_type is None else printable(exc_type, TYPE_NAME_LIMIT),
        None if message is None else printable(message, MESSAGE_LIMIT),
    )


def bad_reply(delivery: Delivery, what: str, node: str) -> Outcome:
    return Outcome(
        delivery.id,
        FAILURE,
        exc_type=BAD_REPLY,
        exc_message=f"the child's reply: {what}",
        node=node,
    )


def seconds_or_none(value: Any) -> float | None:
    """A duration from a child's reply: a finite number of seconds, not below 0, or None."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if math.isfinite(value) and value >= 0:
            return float(value)
    return None
