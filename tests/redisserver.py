"""A private redis-server on a free loopback port, for tests that stop, kill and restart Redis."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import redis

START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0


def redis_server_binary() -> str:
    """The path of redis-server; fails under CI (CI=true), skips the test elsewhere."""
    binary = shutil.which("redis-server")
    if binary is None:
        message = "redis-server is not installed: install it (apt-get install redis-server)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return binary


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """One redis-server process with its data folder; `restart` keeps port and data."""

    def __init__(
        self,
        binary: str,
        folder: Path,
        port: int,
        appendonly: bool,
        bind: tuple[str, ...] = ("127.0.0.1",),
        options: tuple[str, ...] = (),
    ) -> None:
        self.binary = binary
        self.folder = folder
        self.port = port
        self.appendonly = appendonly
        self.bind = bind  # addresses it listens on; 127.0.0.1 must be one (the start check)
        self.options = options  # more command-line options for redis-server
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start the server and wait until it answers PING."""
        args = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            " ".join(self.bind),
            "--dir",
            str(self.folder),
            "--save",
            "",
            "--daemonize",
            "no",
            "--logfile",
            str(self.folder / "redis.log"),
        ]
        if self.appendonly:
            args += ["--appendonly", "yes", "--appendfsync", "always"]
        if self.bind != ("127.0.0.1",):  # protected mode refuses all but loopback clients
            args += ["--protected-mode", "no"]
        args += self.options
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2, socket_timeout=0.5)
        try:
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(
                        f"redis-server exited with {self.process.returncode}: {self.log_tail()}"
                    )
                try:
                    if client.ping():
                        return
                except (redis.ConnectionError, redis.TimeoutError):
                    pass  # not listening yet, or still loading its data (LOADING)
                if time.monotonic() > deadline:
                    self.kill()
                    raise RuntimeError(
                        f"redis-server on port {self.port} did not answer PING"
                        f" within {START_TIMEOUT} s"
                    )
                time.sleep(0.02)
        finally:
            client.close()

    def log_tail(self) -> str:
        log = self.folder / "redis.log"
        return " | ".join(log.read_text().splitlines()[-3:]) if log.exists() else "no log"

    def stop(self) -> None:
        """TERM (Redis saves and exits), then KILL if it is still there after a while."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL: nothing gets saved beyond what the AOF already holds."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.kill()
        self.process.wait()

    def restart(self) -> None:
        self.stop()
        self.start()


# A script that holds Redis for ARGV[1] seconds: another client's slow script, as a test's
# peer (past busy-reply-threshold, Redis answers every other client BUSY meanwhile).
BUSY_SCRIPT = """
local t = redis.call('TIME')
local stop = t[1] * 1e6 + t[2] + ARGV[1] * 1e6
repeat t = redis.call('TIME') until t[1] * 1e6 + t[2] >= stop
"""


def limited_user(server: RedisServer, *denied: str) -> str:
    """Make the ACL user `limited` (password `pw`), allowed every command but `denied`
    ("-evalsha", say); the URL that logs in as it."""
    admin = redis.Redis(port=server.port)
    try:
        admin.acl_setuser(
            "limited",
            enabled=True,
            passwords=["+pw"],
            keys=["*"],
            channels=["*"],
            commands=["+@all", *denied],
        )
    finally:
        admin.close()
    return server.url.replace("redis://", "redis://limited:pw@")


def start_redis(
    tmp_path: Path,
    appendonly: bool = True,
    bind: tuple[str, ...] = ("127.0.0.1",),
    options: tuple[str, ...] = (),
) -> RedisServer:
    """A running private server with its data in `tmp_path/redis` (`options`: more of its
    command line); stop it when done."""
    binary = redis_server_binary()
    folder = tmp_path / "redis"
    folder.mkdir(exist_ok=True)
    server = RedisServer(binary, folder, free_port(), appendonly, bind, options)
    for _ in range(2):  # the free port may be taken between our probe and the server's bind
        try:
            server.start()
            return server
        except RuntimeError:
            server = RedisServer(binary, folder, free_port(), appendonly, bind, options)
    server.start()
    return server
