"""A private Redis server for one benchmark run: free loopback port, temp dir, no persistence."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import redis


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """`with RedisServer(folder) as server:` runs redis-server until the block ends; under
    `wrapper` (a command line such as valgrind's) if one is given."""

    def __init__(self, folder: Path, wrapper: Sequence[str] = ()) -> None:
        self.folder = folder
        self.wrapper = list(wrapper)
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> RedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("bench: redis-server not found (apt-get install redis-server)")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                *self.wrapper,
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.folder),
                "--save",
                "",
                "--appendonly",
                "no",
                "--logfile",
                str(self.folder / "redis.log"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + (60 if self.wrapper else 10)
        while True:
            try:
                self.client.ping()
                return self
            except redis.ConnectionError as exc:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.stop()
                    log = self.folder / "redis.log"
                    raise SystemExit(f"bench: redis-server did not start; see {log}") from exc
                time.sleep(0.02)

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def cpu_seconds(self) -> float:
        """The server's CPU time so far (utime + stime), to the microsecond: Redis's own
        getrusage figures (`INFO cpu`), not /proc's clock ticks, whose 10 ms steps are as
        large as a short run's whole figure."""
        cpu = self.client.info("cpu")
        return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])

    @property
    def version(self) -> str:
        return str(self.client.info("server")["redis_version"])
