"""Tell systemd how the arbiter is doing (sd_notify) without libsystemd; a no-op outside systemd."""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger(__name__)

SEND_TIMEOUT = 1.0  # seconds; a stuck notify socket must never stall the arbiter's loop


class Notifier:
    """Sends sd_notify datagrams to `$NOTIFY_SOCKET`, read once when it is built."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._address = _socket_address(env.get("NOTIFY_SOCKET", ""))
        self._watchdog_usec = env.get("WATCHDOG_USEC", "")
        self._watchdog_pid = env.get("WATCHDOG_PID", "")

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def ready(self, status: str = "") -> None:
        self._send("READY=1" + (f"\nSTATUS={_one_line(status)}" if status else ""))

    def reloading(self) -> None:
        """Say a reload began; call `ready()` again once the new generation serves."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._send(f"RELOADING=1\nMONOTONIC_USEC={usec}")

    def stopping(self) -> None:
        self._send("STOPPING=1")

    def status(self, text: str) -> None:
        self._send(f"STATUS={_one_line(text)}", wait=False)

    def watchdog(self) -> None:
        self._send("WATCHDOG=1", wait=False)

    def watchdog_interval(self) -> float | None:
        """Seconds between two `watchdog()` calls (half of `WatchdogSec=`), or None if off."""
        if self._watchdog_pid and self._watchdog_pid != str(os.getpid()):
            return None
        try:
            usec = int(self._watchdog_usec)
        except ValueError:
            return None
        return usec / 2 / 1_000_000 if usec > 0 else None

    def _send(self, message: str, wait: bool = True) -> None:
        """Send `message`; READY, RELOADING and STOPPING wait up to SEND_TIMEOUT for room in
        a socket nobody reads now, but the STATUS and WATCHDOG pings of every second never
        wait (they held the arbiter's loop a second at a time: control and signals waited)."""
        if self._address is None:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.settimeout(SEND_TIMEOUT if wait else 0.0)
                sock.sendto(message.encode(), self._address)
        except OSError as exc:
            log.debug("sd_notify %r failed: %s", message, exc)


def _socket_address(value: str) -> str | None:
    if value.startswith("@"):
        return "\0" + value[1:]  # Linux abstract namespace
    if value.startswith("/"):
        return value
    if value:
        log.debug("ignoring NOTIFY_SOCKET=%r: only unix socket paths are supported", value)
    return None


def _one_line(text: str) -> str:
    return " ".join(text.splitlines())
