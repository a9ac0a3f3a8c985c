"""Rate and time limits set at run time (`fleetctl rate-limit`, `time-limit`): kept in the
state_dir, one file per node, so that a reload or a restart keeps them until cleared.

Where a limit in force comes from: "config" ([rate_limits], [defaults] time limits),
"task" (the `@task` decorator) or "fleetctl" (this file), which wins.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from typing import Any

from .files import read_regular
from .spec import parse_rate

log = logging.getLogger("fleetd.worker")


MAX_STATE_FILE = 4 << 20  # bytes of a limits file read at most: far more than any holds


class RuntimeLimits:
    """The limits fleetctl set for one node: task name -> rate, task name -> (soft, hard)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.rates: dict[str, str] = {}
        self.times: dict[str, tuple[float, float]] = {}

    @classmethod
    def load(cls, state_dir: str, node: str) -> RuntimeLimits:
        """This node's saved limits; none when there is no file, or a bad one (logged)."""
        limits = cls(os.path.join(state_dir, "limits", f"{node}.json"))
        try:
            saved = json.loads(read_regular(limits.path, MAX_STATE_FILE))
            for name, rate in saved.get("rate_limits", {}).items():
                parse_rate(rate)
                limits.rates[str(name)] = str(rate)
            for name, (soft, hard) in saved.get("time_limits", {}).items():
                pair = (float(soft), float(hard))
                if not all(math.isfinite(s) and s >= 0 for s in pair):
                    raise ValueError(f"time limits of {name} are no seconds: {soft}, {hard}")
                limits.times[str(name)] = pair
        except FileNotFoundError:
            pass
        except (
            OSError,
            ArithmeticError,
            ValueError,
            TypeError,
            AttributeError,
            RecursionError,
        ) as exc:
            log.warning("ignoring saved limits %s: %s", limits.path, exc, extra={"node": node})
            limits.rates, limits.times = {}, {}
        return limits

    def save(self) -> str | None:
        """Write the file whole (a new file renamed over the old); why it failed, or None."""
        data: dict[str, Any] = {
            "rate_limits": self.rates,
            "time_limits": {name: list(pair) for name, pair in self.times.items()},
        }
        temporary = f"{self.path}.{os.getpid()}.tmp"
        try:
            os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
            with open(temporary, "w", encoding="utf-8") as f:
                json.dump(data, f)
            os.replace(temporary, self.path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.remove(temporary)
            return f"not kept across restarts ({exc.strerror or exc}: {self.path})"
        return None
