"""`make demo`: a fleet in the background, 600 tasks; midway a child and a worker are killed
with SIGKILL, the fleet is reloaded (HUP) and restarted (TERM); none is lost."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psutil
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fleetd import Client

TASKS = 600
ROOT = Path(__file__).resolve().parent.parent

CONFIG = """
[fleet]
node = "demo"
broker = "sqlite:///queue.db"
state_dir = "state"
imports = ["examples.tasks"]
pythonpath = ["{root}"]

[defaults]
concurrency = 2

[[worker]]
name = "default"

[[worker]]
name = "images"
queues = ["images"]
"""


def start(folder: Path) -> subprocess.Popen[bytes]:
    log = open(folder / "fleetd.log", "ab")
    return subprocess.Popen(
        [str(Path(sys.executable).parent / "fleetd"), "start", "-c", "fleet.toml"],
        cwd=folder,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def kill_a_child(fleet: subprocess.Popen[bytes]) -> str:
    """SIGKILL one pool child (its task is redelivered at once)."""
    for worker in psutil.Process(fleet.pid).children():
        for child in worker.children():
            child.kill()
            return f"kill -9 child {child.pid} of worker {worker.pid}: its task comes back at once"
    return "no child to kill yet"


def kill_a_worker(fleet: subprocess.Popen[bytes]) -> str:
    """SIGKILL one worker (the arbiter restarts it; the tasks it held go back at once)."""
    workers = psutil.Process(fleet.pid).children()
    if not workers:
        return "no worker to kill yet"
    workers[-1].kill()
    return f"kill -9 worker {workers[-1].pid}: restarted, its tasks given back"


def reload(fleet: subprocess.Popen[bytes]) -> str:
    os.kill(fleet.pid, signal.SIGHUP)
    return "reload (HUP): a new generation of workers, fresh code"


def main() -> int:
    console = Console()
    with tempfile.TemporaryDirectory(prefix="fleetd-demo-") as tmp:
        folder = Path(tmp)
        (folder / "fleet.toml").write_text(CONFIG.format(root=ROOT))
        client = Client.from_config(str(folder / "fleet.toml"))
        fleet = start(folder)
        try:
            handles = client.submit_many(
                [("examples.tasks.resize", (i,), {}) for i in range(TASKS)], queue="images"
            )
            done: set[str] = set()
            # (share of the tasks done, what to do then): each at most once.
            steps: list[tuple[float, Callable[[subprocess.Popen[bytes]], str]]] = [
                (1 / 6, kill_a_child),
                (2 / 6, kill_a_worker),
                (3 / 6, reload),
            ]
            restarted = False
            columns = (
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
            )
            with Progress(*columns, console=console) as progress:
                bar = progress.add_task("tasks", total=TASKS)
                deadline = time.monotonic() + 120
                while len(done) < TASKS and time.monotonic() < deadline:
                    for h in handles:
                        if h.id not in done and h.state == "SUCCESS":
                            done.add(h.id)
                    progress.update(bar, completed=len(done))
                    if steps and len(done) >= steps[0][0] * TASKS:
                        progress.console.print(f"[bold]{steps.pop(0)[1](fleet)}")
                    elif not restarted and len(done) >= 4 * TASKS // 6:
                        progress.console.print("[bold]restart (TERM, then a new fleetd start)")
                        fleet.terminate()
                        fleet.wait(60)
                        fleet = start(folder)
                        restarted = True
                    time.sleep(0.1)
            lost = TASKS - len(done)
            runs = sum(client.handle(h.id).info().get("deliveries") or 0 for h in handles)
            console.print(f"submitted {TASKS}, ran {len(done)}, lost {lost}, deliveries {runs}")
            console.print("[green]none lost" if lost == 0 else f"[red]{lost} lost")
            return 0 if lost == 0 else 1
        finally:
            fleet.terminate()
            fleet.wait(60)
            client.close()


if __name__ == "__main__":
    sys.exit(main())
