"""Log lines that a peer can cause at will at most once per interval, with a count of the rest.

A flood of bad requests must not fill the disk with the arbiter's log (journald, a file): the
first line of a kind is logged in full; of those that follow within the interval, only the
last is, once the interval is over, with how many there were, as the kernel's printk_ratelimit
and journald's RateLimitBurst do. A kind is the line's format string: a constant of its call
site, so that the kinds are few however many peers there are and whatever they send.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class _Window:
    """The interval that began with a logged line of one kind, and what came after it."""

    ends: float
    level: int = logging.NOTSET
    args: tuple[object, ...] = ()  # the last unlogged line's
    unlogged: int = 0


class LogThrottle:
    """`log()` as `Logger.log`, at most one line per kind and per `interval` seconds.

    The count of an interval is said by the first call of any kind after it ended, or by
    `flush()`: call it where a flood may end (each incoming request).
    """

    def __init__(
        self,
        logger: logging.Logger,
        interval: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._interval = interval
        self._clock = clock
        self._windows: dict[str, _Window] = {}

    def log(self, level: int, message: str, *args: object, exc_info: bool = False) -> None:
        """Log `message % args` now if no line of its kind was in the last interval; else
        count it, and log it later if it is the last of its interval."""
        now = self._clock()
        self._close_ended(now)
        window = self._windows.get(message)
        if window is None:
            self._logger.log(level, message, *args, exc_info=exc_info)
            self._windows[message] = _Window(now + self._interval)
        else:
            window.level, window.args = level, args
            window.unlogged += 1

    def flush(self) -> None:
        """Say the counts of the intervals that ended."""
        self._close_ended(self._clock())

    def _close_ended(self, now: float) -> None:
        """Say the count of each interval that ended with lines unlogged (that one line opens
        an interval of its own); forget the quiet ones."""
        for message, window in list(self._windows.items()):
            if now < window.ends:
                continue
            if window.unlogged:
                self._say_unlogged(message, window)
                self._windows[message] = _Window(now + self._interval)
            else:
                del self._windows[message]

    def _say_unlogged(self, message: str, window: _Window) -> None:
        text = message % window.args
        if window.unlogged == 1:
            self._logger.log(window.level, "%s", text)
        else:
            self._logger.log(
                window.level,
                "%s (the last of %d such lines in %g s; the others were not logged)",
                text,
                window.unlogged,
                self._interval,
            )
