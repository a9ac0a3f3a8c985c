"""The states of a supervised worker, the transitions allowed between them, and the restart
policy (backoff, FATAL). A leaf: it imports nothing of fleetd, so nothing cycles through it.

The names are supervisord's, and they are what operators see in `fleetctl status`:

    STOPPED --start--> STARTING --ready--> RUNNING
                          |  \\              |  \\
                          |   `--- died ---> BACKOFF --backoff over--> STARTING
                          |                  (or FATAL after FATAL_AFTER failed starts)
                          `--asked to leave--> STOPPING --exited--> STOPPED

A FATAL or STOPPED worker starts again on `fleetctl start` (or a reload).
"""

from __future__ import annotations

import enum


class State(enum.Enum):
    STOPPED = "STOPPED"  # not running, on purpose: not started yet, or shut down
    STARTING = "STARTING"  # spawned and booting (imports, broker): not consuming yet
    RUNNING = "RUNNING"  # said "ready": consumes its queues
    BACKOFF = "BACKOFF"  # died or could not start: started again after restart_delay()
    STOPPING = "STOPPING"  # asked to leave (TERM or QUIT): not started again when it exits
    FATAL = "FATAL"  # failed to start FATAL_AFTER times in a row: left down


STOPPED, STARTING, RUNNING = State.STOPPED, State.STARTING, State.RUNNING
BACKOFF, STOPPING, FATAL = State.BACKOFF, State.STOPPING, State.FATAL

# Where each state may go; anything else is a bug in the arbiter.
TRANSITIONS: dict[State, frozenset[State]] = {
    STOPPED: frozenset({STARTING}),
    STARTING: frozenset({RUNNING, BACKOFF, FATAL, STOPPING}),
    RUNNING: frozenset({BACKOFF, FATAL, STOPPING}),
    BACKOFF: frozenset({STARTING, STOPPED}),
    STOPPING: frozenset({STOPPED}),
    FATAL: frozenset({STARTING, STOPPED}),
}

START_SECS = 3.0  # a worker must run this long after "ready" for its start to count as good
FATAL_AFTER = 5  # failed starts in a row that leave a worker FATAL
BACKOFF_BASE = 0.25  # seconds before the second start after a failed one; doubles after each
BACKOFF_MAX = 10.0


def allowed(old: State, new: State) -> bool:
    return new in TRANSITIONS[old]


def failed_start(ran: float | None) -> bool:
    """Whether a worker that ended after running `ran` seconds since its "ready" (None: it
    never was) failed to start, as supervisord's `startsecs` judges it."""
    return ran is None or ran < START_SECS


def restart_delay(fast_deaths: int) -> float:
    """Seconds before starting a worker again after `fast_deaths` failed starts in a row:
    at once after one (a crash is no reason to wait), then BACKOFF_BASE doubling, capped."""
    if fast_deaths <= 1:
        return 0.0
    return min(BACKOFF_MAX, BACKOFF_BASE * 2 ** (fast_deaths - 2))


def gives_up(fast_deaths: int) -> bool:
    """Whether a worker that failed to start `fast_deaths` times in a row is left FATAL."""
    return fast_deaths >= FATAL_AFTER
