"""The benchmark's surroundings: the peers' own venv, the machine, and every system's version."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import psutil

from bench.systems.base import ASYNC_PEERS_BIN, FLEETD_BIN, PEERS_BIN, REPO

REQUIREMENTS = Path(__file__).with_name("requirements-peers.txt")
ASYNC_REQUIREMENTS = Path(__file__).with_name("requirements-async-peers.txt")


def _ensure_venv(bin_dir: Path, what: str, install: list[str], wanted: str) -> None:
    """Create the venv of `bin_dir` and `pip install` `install` into it, unless it was last
    installed from the same `wanted` text (a requirements or pyproject file)."""
    marker = bin_dir.parent / "bench-installed-from.txt"
    if marker.exists() and marker.read_text() == wanted and (bin_dir / "python").exists():
        return
    print(f"bench: installing {what} into {bin_dir.parent} ...", flush=True)
    if not (bin_dir / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(bin_dir.parent)], check=True)
    subprocess.run([str(bin_dir / "python"), "-m", "pip", "install", "-q", *install], check=True)
    marker.write_text(wanted)


def ensure_peers_venv() -> None:
    """`.bench-venv`: the peers, as pinned in requirements-peers.txt."""
    _ensure_venv(PEERS_BIN, "the peers", ["-r", str(REQUIREMENTS)], REQUIREMENTS.read_text())


def ensure_async_peers_venv() -> None:
    """`.bench-async-venv`: SAQ and arq, as pinned in requirements-async-peers.txt."""
    requirements = ASYNC_REQUIREMENTS.read_text()
    _ensure_venv(ASYNC_PEERS_BIN, "the async peers", ["-r", str(ASYNC_REQUIREMENTS)], requirements)


def ensure_fleetd_venv() -> None:
    """`.bench-fleetd-venv`: fleetd's dependencies and commands as `pip install .` makes them,
    without the project's editable install, whose import hook costs every process start.
    The code itself runs from the working tree (the harness puts it on PYTHONPATH for every
    system, byte-compiled by `compile_bytecode`), so a code change needs no reinstall."""
    pyproject = REPO / "pyproject.toml"
    _ensure_venv(FLEETD_BIN, "fleetd", [f"{REPO}[async]"], pyproject.read_text())


def compile_bytecode() -> None:
    """Byte-compile fleetd and the benchmark's task modules, as pip does for every peer it
    installs: they run from the working tree, and with PYTHONDONTWRITEBYTECODE set (or a
    read-only tree) each process would compile its modules at every start."""
    folders = ["fleetd", "supervisor", "worker", "ctl", "bench/tasks"]
    subprocess.run([sys.executable, "-m", "compileall", "-q", *folders], cwd=REPO, check=True)


def fleetd_missing() -> str | None:
    """Why fleetd cannot be benchmarked yet, or None when it can."""
    if not (FLEETD_BIN / "fleetd").exists():
        return f"fleetd not installed ({FLEETD_BIN / 'fleetd'} missing)"
    check = subprocess.run(
        [str(FLEETD_BIN / "python"), "-c", "from fleetd import Client, task"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    if check.returncode != 0:
        return f"fleetd not built: {check.stderr.strip().splitlines()[-1]}"
    return None


def machine() -> dict[str, str]:
    cpu = platform.processor() or platform.machine()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return {
        "cpu": cpu,
        "cores": str(psutil.cpu_count()),
        "memory": f"{psutil.virtual_memory().total / 2**30:.1f} GiB",
        "kernel": f"{platform.system()} {platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "load average at start (1, 5, 15 min)": load_average(),
    }


def load_average() -> str:
    return ", ".join(f"{load:.2f}" for load in os.getloadavg())


def versions(
    redis_version: str, peers: list[str], async_peers: list[str] | None = None
) -> dict[str, str]:
    """Versions of fleetd, of the peers' distributions, of redis-py on each side and of Redis."""
    found = {"redis-server": redis_version}
    if (FLEETD_BIN / "python").exists():
        fleetd = _installed(FLEETD_BIN, ["fleetd", "redis"])
        found["fleetd"] = fleetd["fleetd"]
        found["redis-py (fleetd)"] = fleetd["redis"]
    if peers:
        peer_versions = _installed(PEERS_BIN, [*peers, "redis"])
        peer_versions["redis-py (peers)"] = peer_versions.pop("redis")
        found.update(peer_versions)
    if async_peers:
        async_versions = _installed(ASYNC_PEERS_BIN, [*async_peers, "redis"])
        async_versions["redis-py (SAQ, arq)"] = async_versions.pop("redis")
        found.update(async_versions)
    return found


def _installed(bin_dir: Path, distributions: list[str]) -> dict[str, str]:
    """The versions of `distributions` in the venv of `bin_dir`."""
    script = (
        "import json, sys; from importlib import metadata as m;"
        " print(json.dumps({d: m.version(d) for d in sys.argv[1:]}))"
    )
    command = [str(bin_dir / "python"), "-c", script, *distributions]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return dict(json.loads(done.stdout))
