"""The arbiter's signals: handlers only enqueue; `Arbiter.handle_<name>` acts in the loop."""

from __future__ import annotations

import logging
import os
import signal
from collections import deque
from types import FrameType

from worker.tree import STRAY_SIGNALS, SenderChecked

log = logging.getLogger("fleetd.arbiter")

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
    """Signals in arrival order, plus descriptors that become readable when one arrives: the
    wake-up pipe of the handlers, and `quit_fd` (-1 where signalfd is refused), which reads a
    QUIT with its sender. A QUIT from a process below us, a task's, is ignored: taken for a
    cold stop, it would give that task back without a delivery strike, to run (and stop the
    fleet) again at the next start."""

    def __init__(self) -> None:
        self.pending: deque[int] = deque()
        self.read_fd, write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        for signum in HANDLED:
            signal.signal(signum, self._enqueue)
        # QUIT blocked here stays here: the workers are spawned with a mask of their own.
        self.checked = SenderChecked(os.getpid())
        if self.checked.problem:
            log.warning(
                "cannot tell who sends a QUIT (%s): one from a task stops fleetd too",
                self.checked.problem,
            )

    @property
    def quit_fd(self) -> int:
        return self.checked.fd

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
        if self.quit_fd >= 0:
            act, from_below = self.checked.read()
            out += act
            for signum, sender in from_below:
                log.warning(
                    "%s from pid %d, a process of a task: ignored (a task cannot stop the fleet)",
                    signal.Signals(signum).name,
                    sender,
                )
        return out


def name(signum: int) -> str:
    """`signal.SIGTERM` -> `"term"`, the suffix of the arbiter's `handle_` methods."""
    return signal.Signals(signum).name[3:].lower()
