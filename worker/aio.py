"""The event-loop side of a pool child: runs its `async def` tasks many at once on one loop.

A child turns into an event-loop child at its first async task (worker/child.py) and stays
one. Its loop (uvloop where it is installed, asyncio's otherwise) reads the task pipe and
the control pipe as they become readable:

- an async task starts at once as an asyncio task; its reply, `{"id", ...}` as a sync
  task's, is written when it ends, in whatever order they end (a frame the child cannot
  read has no id to answer by: its reply names the frame's number, `"n"`, counted from 1
  as the worker counts the frames it writes). The worker hands a child
  at most `async_concurrency` of them at a time, so every one it holds is running;
- a sync task runs alone, as in a sync child (the worker hands one only to a child with no
  async task in flight: it never stalls theirs);
- the control pipe carries, besides the ids revoked before they start, a soft time limit
  for one task (`SOFT_MARK` id: `SoftTimeLimitExceeded` is raised at the await it is stopped
  on) and a cancel (`CANCEL_MARK` id: its hard time limit passed or it was revoked with
  terminate; the worker has settled it already and kills this child if it does not end
  within a grace period, i.e. if a task blocks the loop).

TERM lets the tasks in flight finish and starts no other; the child leaves (BYE) once none
is left, as it does when the worker closes its task pipe (recycling, shrinking).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from typing import Any

from .child import Child, encode_reply, flush_output, reap_adopted
from .protocol import CANCEL_MARK, SOFT_MARK, FrameReader, Undecodable, line_id, write_all
from .task import REGISTRY, Request, SoftTimeLimitExceeded

SOFT_MESSAGE = "soft time limit exceeded"


try:  # imported by the worker before it forks (see worker/process.py), not by each child
    import uvloop
except ImportError:  # the `async` extra is not installed
    uvloop = None  # type: ignore[assignment]


def new_loop() -> asyncio.AbstractEventLoop:
    """uvloop's loop where it is installed (the `async` extra), else asyncio's."""
    return asyncio.new_event_loop() if uvloop is None else uvloop.new_event_loop()


class EventLoopChild:
    """The loop of one child and the async tasks in flight on it, by id."""

    def __init__(self, child: Child, reader: FrameReader) -> None:
        self.child = child
        self.reader = reader
        self.loop = new_loop()
        self.running: dict[str, asyncio.Task[None]] = {}
        self.soft_cancelled: set[str] = set()  # soft limit by cancel: the await was on a task
        self.closed = False  # the worker closed our task pipe: no task comes any more
        # Replies of the tasks that ended in this turn of the loop, written together at its
        # end: tasks that end at once (their sleeps were started at once) cost one write
        # here and one turn of the worker's loop, not one each.
        self.replies: list[bytes] = []
        self._sync_loop: asyncio.AbstractEventLoop | None = None

    def sync_loop(self) -> asyncio.AbstractEventLoop:
        """The current loop while a sync task runs: one of its own, made when first needed
        and kept for the next (a closed one, which the task closed, is made again)."""
        if self._sync_loop is None or self._sync_loop.is_closed():
            self._sync_loop = asyncio.new_event_loop()
        return self._sync_loop

    def run(self, frames: list[Any]) -> None:
        """Run the loop for the rest of the child's life, starting with `frames`."""
        asyncio.set_event_loop(self.loop)
        self.loop.add_signal_handler(signal.SIGTERM, self.on_term)
        self.child.handlers[signal.SIGTERM] = signal.getsignal(signal.SIGTERM)  # the loop's
        self.loop.add_reader(self.child.task_fd, self.read_tasks)
        self.loop.add_reader(self.child.revoke_fd, self.read_control)
        self.take(frames)
        while True:  # the child ends in leave(), from a callback; never when the loop stops
            try:
                self.loop.run_forever()
            except (SystemExit, KeyboardInterrupt) as exc:  # out of a task's callback
                self.loop_raised(exc)
            else:
                self.loop_stopped()

    def loop_stopped(self) -> None:
        """A task stopped our loop (`loop.stop()`): it runs on. Leaving instead would look
        like a stop between tasks to the worker, which gives back the tasks in flight as
        never started: they would run again, as often as the task stops a loop."""
        self.child.leave_if_forked(None)
        with contextlib.suppress(OSError):
            os.write(2, b"fleetd: a task stopped its child's event loop; the loop goes on\n")

    def loop_raised(self, exc: SystemExit | KeyboardInterrupt) -> None:
        """A callback a task scheduled (`loop.call_soon(sys.exit)`) raised what asyncio lets
        out of the loop: it runs on. Ending the child would end every task in flight on it
        with a death, for another task's doing; the task itself has answered already."""
        self.child.leave_if_forked(exc)
        line = f"fleetd: {type(exc).__name__} out of a task's callback; the loop goes on\n"
        with contextlib.suppress(OSError):
            os.write(2, line.encode())

    def on_term(self) -> None:
        """Warm stop: the tasks in flight finish, none other starts."""
        self.child.stop_when_idle = True
        self.leave_if_idle()

    def leave_if_idle(self) -> None:
        if not self.running and (self.closed or self.child.stop_when_idle):
            self.send_replies()
            self.child.leave()

    def read_tasks(self) -> None:
        self.child.leave_if_forked(None)  # a task's fork shares our loop's epoll: never read
        try:
            frames = self.reader.read_frames(self.child.task_fd)
        except InterruptedError:
            return
        if frames is None:  # the worker let us go
            self.closed = True
            self.loop.remove_reader(self.child.task_fd)
            self.leave_if_idle()
            return
        self.take(frames)

    def take(self, frames: list[Any]) -> None:
        """Start the async tasks, answer the others (sync tasks run here, alone)."""
        for frame in frames:
            if self.child.stop_when_idle:
                return  # never started: the worker gives them back when we leave
            self.read_control()
            if not self.running:
                reap_adopted()  # as between sync tasks; never under a task's subprocesses
            self.child.frames_read += 1
            if isinstance(frame, Undecodable):  # no id to answer by: the frame's number
                self.reply({**self.child.answer(frame), "n": self.child.frames_read})
                self.send_replies()
                continue
            if not self.child.is_async(frame):
                self.child.busy = True
                # It runs alone, as in a sync child: with no loop running, and a loop of its
                # own as the current one (get_event_loop().run_until_complete(), as legacy
                # code does), so that its asyncio.run() works here as it does there.
                asyncio.events._set_running_loop(None)
                asyncio.set_event_loop(self.sync_loop())
                try:
                    reply = self.child.answer(frame)
                    self.child.restore(alone=not self.running)
                except BaseException as exc:  # noqa: BLE001 - see Child.raised_after
                    reply = self.child.raised_after(frame, exc, alone=not self.running)
                finally:
                    asyncio.events._set_running_loop(self.loop)
                    asyncio.set_event_loop(self.loop)  # asyncio.run() leaves none set
                self.reply(reply)
                self.send_replies()
                self.child.busy = False
                continue
            deliveries, body = frame
            task_id = str(body.get("id"))
            if task_id in self.child.revoked:
                self.reply({"id": task_id, "s": "REVOKED"})
                continue
            self.running[task_id] = self.loop.create_task(self.execute(body, deliveries))
        self.child.busy = bool(self.running)

    async def execute(self, body: dict[str, Any], deliveries: int) -> None:
        try:
            reply = await self.outcome(body, deliveries)
            flush_output()
            self.child.restore(alone=not self.running)
        except BaseException as exc:  # noqa: BLE001 - see Child.raised_after
            reply = self.child.raised_after([deliveries, body], exc, alone=not self.running)
        self.reply(reply)
        self.leave_if_idle()

    async def outcome(self, body: dict[str, Any], deliveries: int) -> dict[str, Any]:
        start = time.perf_counter()
        task_id = str(body.get("id"))
        try:
            task = REGISTRY[body["name"]]
            task.request = Request(str(task_id), int(body.get("retries", 0)), deliveries)
            result = await task(*body.get("args", []), **body.get("kwargs", {}))
        except asyncio.CancelledError as cancelled:
            soft = task_id in self.soft_cancelled
            return self.child.raised(
                task_id, SoftTimeLimitExceeded(SOFT_MESSAGE) if soft else cancelled, start
            )
        except BaseException as exc:  # noqa: BLE001 - every failure is the task's outcome
            return self.child.raised(task_id, exc, start)
        finally:
            self.running.pop(task_id, None)
            self.soft_cancelled.discard(task_id)
            self.child.busy = bool(self.running)
        return self.child.returned(task_id, result, start)

    def reply(self, reply: dict[str, Any]) -> None:
        if self.child.stop_when_idle:
            reply["exit"] = True  # the worker must not hand us another task
        if not self.replies:
            self.loop.call_soon(self.send_replies)
        self.replies.append(encode_reply(reply))

    def send_replies(self) -> None:
        self.child.leave_if_forked(None)  # a copy that a task forked answers for nothing
        if self.replies:
            data, self.replies = b"".join(self.replies), []
            write_all(self.child.result_fd, data)

    def read_control(self) -> None:
        """Take in revoked ids, soft limits and cancels from the control pipe."""
        child = self.child
        child.leave_if_forked(None)  # what a task's fork reads, the child would never see
        try:
            while data := os.read(child.revoke_fd, 65536):
                *lines, child.revoke_tail = (child.revoke_tail + data).split(b"\n")
                for line in lines:
                    self.control(line)
        except BlockingIOError:
            return
        self.loop.remove_reader(child.revoke_fd)  # EOF: the worker is gone (we die with it)

    def control(self, line: bytes) -> None:
        if line.startswith(SOFT_MARK):
            self.soft_limit(line_id(line[len(SOFT_MARK) :]))
        elif line.startswith(CANCEL_MARK):
            task_id = line_id(line[len(CANCEL_MARK) :])
            running = self.running.get(task_id)
            if running is not None:
                running.cancel()
            else:  # its frame is not read yet (our loop was blocked): it must never start
                self.child.revoked.add(task_id)
        else:
            self.child.revoked.add(line_id(line))

    def soft_limit(self, task_id: str) -> None:
        """Raise SoftTimeLimitExceeded at the await the task is stopped on. Where that is no
        plain future (it awaits another task, or a gather), cancel it instead: it fails with
        SoftTimeLimitExceeded unless it catches the cancellation."""
        running = self.running.get(task_id)
        if running is None:
            return
        waiter = getattr(running, "_fut_waiter", None)  # the future it waits on
        if type(waiter) is asyncio.Future and not waiter.done():
            if self.wake_apart(running, waiter):
                return
        self.soft_cancelled.add(task_id)
        running.cancel(SOFT_MESSAGE)

    def wake_apart(self, running: asyncio.Task[Any], waiter: asyncio.Future[Any]) -> bool:
        """Wake `running` from the future it waits on with SoftTimeLimitExceeded, leaving that
        future as it is: its wake-up moves to a future of its own that holds the exception.
        (Setting the exception on the future itself failed every task that waited on it, or
        awaited it later: other tasks may share it.) False if its wake-up is not found."""
        for callback, context in list(getattr(waiter, "_callbacks", None) or ()):
            if getattr(callback, "__self__", None) is running:
                waiter.remove_done_callback(callback)
                own: asyncio.Future[Any] = self.loop.create_future()
                own.set_exception(SoftTimeLimitExceeded(SOFT_MESSAGE))
                own.add_done_callback(callback, context=context)
                return True
        return False
