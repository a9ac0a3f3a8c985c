"""The autoscale policy: whether a worker's pool grows, shrinks or stays, from how long its
tasks wait and how long its children sit idle. Pure functions; the pool acts on them.

The pool grows (one child per decision) while tasks wait in the worker's queues longer than
`autoscale_wait` and no child is idle to take them, and shrinks (one child per decision)
once a child has had no task for `autoscale_idle`; never below MIN, never above MAX. It
decides on measured waits, not on reserved counts: a task held back by a rate limit, or
queued in a busy child's pipe while another child idles, is no reason to fork.
"""

from __future__ import annotations

from dataclasses import dataclass

DECIDE_EVERY = 0.5  # seconds between two decisions: the pool moves by one child at most
MAX_POOL = 1024  # children per worker: `pool grow 10000` or "2,10000" is a typo, not a plan


@dataclass(frozen=True)
class Load:
    """What the pool measured since its last decision."""

    wait: float  # seconds: the longest a task waited to start (waiting now, or started since)
    backlog: bool  # tasks wait to start: held by the worker, or left in its queues
    idle_children: int  # children with no task now
    idle_for: float  # seconds: the longest any child has gone without a task


def decide(
    current: int, low: int, high: int, load: Load, grow_after: float, shrink_after: float
) -> int:
    """How many children to add (> 0) or retire (< 0) now: back inside [low, high] first,
    then one more while tasks wait past `grow_after` with no idle child to take them, or
    one fewer once a child has been idle `shrink_after` seconds."""
    if current < low or current > high:
        return min(max(current, low), high) - current
    if load.backlog and load.wait >= grow_after and not load.idle_children and current < high:
        return 1
    if load.idle_for >= shrink_after and current > low:
        return -1
    return 0


def parse_bounds(text: str) -> tuple[int, int]:
    """`"2,8"` -> (2, 8); ValueError saying what is wrong unless 1 <= MIN <= MAX <= MAX_POOL."""
    parts = [p.strip() for p in text.split(",")]
    # isascii() too: isdigit() takes the digits of other scripts ("١") and "²".
    if len(parts) != 2 or not all(p.isascii() and p.isdigit() for p in parts):
        raise ValueError('must be "MIN,MAX", two whole numbers such as "2,8"')
    low, high = (float(p) for p in parts)  # float(): no digit limit, where int() raises
    if not 1 <= low <= high <= MAX_POOL:
        raise ValueError(f"must have 1 <= MIN <= MAX <= {MAX_POOL}")
    return int(low), int(high)


def moved(current: int, step: int, low: int, high: int) -> tuple[int, str | None]:
    """The pool size that `pool grow|shrink` (step > 0 or < 0) or TTIN/TTOU reach from
    `current` within [low, high], never moving the other way, and the bound that stops it
    short of `current + step` (None if none does)."""
    wanted = current + step
    if step > 0 and wanted > high:
        return max(current, high), f"at the pool's max ({high})"
    if step < 0 and wanted < low:
        return min(current, low), f"at the pool's min ({low})"
    return wanted, None
