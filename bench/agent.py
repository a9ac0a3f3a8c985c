"""The producer process of a session, and the harness's handle on it.

`python -m bench.agent SYSTEM CONFIG_JSON` runs in the system's own venv, builds that
system's `Producer`, prints `{"ready": true}`, then answers one JSON line on stdout for
each JSON command line on stdin:

    {"op": "enqueue", "key": K, "n": N, "batch": B}  -> {"first": t, "seconds": s}
    {"op": "latency", "key": K, "n": N}              -> {"submitted": [t...], "returned": [t...]}
    {"op": "ping", "n": N}                           -> {"seconds": [s...]}
    {"op": "enqueue_async", "key": K, "n": N}        -> {"seconds": s}

`batch` 0 submits one task at a time; otherwise batches of B through the system's batch
API. Times are `time.time()` (comparable with the task bodies' stamps); durations are
`perf_counter`. A failure answers `{"error": "..."}`, or `{"unavailable": "..."}` for a
feature the system does not have.
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

from bench.systems import system_named
from bench.systems.base import NotAvailable, Producer, Site, System

RESULT_TIMEOUT = 30.0


class AgentError(Exception):
    """The producer failed a command, or did not answer in time."""


def enqueue(producer: Producer, key: str, n: int, batch: int) -> dict[str, Any]:
    first = time.time()
    start = time.perf_counter()
    if batch:
        for offset in range(0, n, batch):
            producer.submit_batch(key, min(batch, n - offset))
    else:
        for _ in range(n):
            producer.submit(key)
    return {"first": first, "seconds": time.perf_counter() - start}


def latency(producer: Producer, key: str, n: int) -> dict[str, Any]:
    submitted, returned = [], []
    for _ in range(n):
        submitted.append(time.time())
        producer.wait(producer.submit(key), RESULT_TIMEOUT)
        returned.append(time.time())
    return {"submitted": submitted, "returned": returned}


def serve(producer: Producer, commands: IO[str], answers: IO[str]) -> None:
    for line in commands:
        command = json.loads(line)
        op = command.pop("op")
        try:
            if op == "enqueue":
                answer = enqueue(producer, **command)
            elif op == "latency":
                answer = latency(producer, **command)
            elif op == "ping":
                answer = {"seconds": [producer.ping() for _ in range(command["n"])]}
            elif op == "enqueue_async":
                start = time.perf_counter()
                producer.submit_async(**command)
                answer = {"seconds": time.perf_counter() - start}
            else:
                answer = {"error": f"unknown op {op!r}"}
        except NotAvailable as exc:
            answer = {"unavailable": str(exc)}
        except Exception as exc:  # noqa: BLE001 - every failure is an answer, never a dead agent
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        answers.write(json.dumps(answer) + "\n")
        answers.flush()


def main(argv: list[str]) -> None:
    # Keep the protocol on a private copy of stdout: libraries may print.
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    system = system_named(argv[0])
    producer = system.producer(json.loads(argv[1]))
    answers.write(json.dumps({"ready": True}) + "\n")
    answers.flush()
    try:
        serve(producer, sys.stdin, answers)
    finally:
        producer.close()


class Agent:
    """The harness's handle on a running agent; `with Agent(...) as agent:` stops it by pid."""

    def __init__(self, system: System, site: Site, log: Path) -> None:
        self._log = log.open("ab")
        self.proc = subprocess.Popen(
            [
                str(system.python),
                "-m",
                "bench.agent",
                system.name,
                json.dumps(system.producer_config(site)),
            ],
            env=system.env(site),
            cwd=site.workdir,
            text=True,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
        )
        self._selector = selectors.DefaultSelector()
        assert self.proc.stdout is not None
        self._selector.register(self.proc.stdout, selectors.EVENT_READ)
        self._read(timeout=60)

    def __enter__(self) -> Agent:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def call(self, op: str, timeout: float, **args: Any) -> dict[str, Any]:
        """Send one command; its answer (raises AgentError or NotAvailable on failure)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()
        answer = self._read(timeout)
        if "unavailable" in answer:
            raise NotAvailable(answer["unavailable"])
        if "error" in answer:
            raise AgentError(f"{op}: {answer['error']}")
        return answer

    def _read(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        if not self._selector.select(timeout):
            raise AgentError(f"the producer did not answer within {timeout:.0f} s")
        line = self.proc.stdout.readline()
        if not line:
            raise AgentError(f"the producer exited with {self.proc.wait()}; see {self._log.name}")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def close(self) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        self._selector.close()
        self._log.close()


if __name__ == "__main__":
    main(sys.argv[1:])
