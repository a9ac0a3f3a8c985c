"""The arbiter's signals: handlers only enqueue; `Arbiter.handle_<name>` acts in the loop."""

from __future__ import annotations

import os
import signal
from collections import deque
from types import FrameType

from worker.tree import STRAY_SIGNALS

HANDLED = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGHUP,
    signal.SIGTTIN,
    signal.SIGTTOU,
    signal.SIGUSR1,
    signal.SIGCHLD,
    *STRAY_SIGNALS,  # logged and ignored (Arbiter.step)
)


class SignalQueue:
    """Signals in arrival order, plus a descriptor that becomes readable when one arrives."""

    def __init__(self) -> None:
        self.pending: deque[int] = deque()
        self.read_fd, write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        for signum in HANDLED:
            signal.signal(signum, self._enqueue)

    def _enqueue(self, signum: int, frame: FrameType | None) -> None:
        self.pending.append(signum)

    def drain(self) -> list[int]:
        """The signals received since the last call, oldest first."""
        try:
            while os.read(self.read_fd, 512):
                pass
        except BlockingIOError:
            pass
        out = []
        while self.pending:
            out.append(self.pending.popleft())
        return out


def name(signum: int) -> str:
    """`signal.SIGTERM` -> `"term"`, the suffix of the arbiter's `handle_` methods."""
    return signal.Signals(signum).name[3:].lower()
