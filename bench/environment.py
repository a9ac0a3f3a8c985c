"""The benchmark's surroundings: the peers' own venv, the machine, and every system's version."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import psutil

from bench.systems.base import FLEETD_BIN, PEERS_BIN, PROJECT_BIN, REPO

REQUIREMENTS = Path(__file__).with_name("requirements-peers.txt")
PEERS_VENV = PEERS_BIN.parent
MARKER = PEERS_VENV / "bench-requirements.txt"  # what the venv was last installed from


def ensure_peers_venv() -> None:
    """Create `.bench-venv` and install the peers into it, unless it already matches."""
    wanted = REQUIREMENTS.read_text()
    if MARKER.exists() and MARKER.read_text() == wanted and (PEERS_BIN / "python").exists():
        return
    print(f"bench: installing the peers into {PEERS_VENV} ...", flush=True)
    if not (PEERS_BIN / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(PEERS_VENV)], check=True)
    subprocess.run(
        [str(PEERS_BIN / "python"), "-m", "pip", "install", "-q", "-r", str(REQUIREMENTS)],
        check=True,
    )
    MARKER.write_text(wanted)


def install_fleetd() -> None:
    """(Re)install fleetd from the working tree into `.bench-fleetd-venv`, as a user would."""
    print("bench: installing fleetd from the working tree ...", flush=True)
    if not (FLEETD_BIN / "python").exists():
        subprocess.run(
            [str(PROJECT_BIN / "python"), "-m", "venv", str(FLEETD_BIN.parent)], check=True
        )
        subprocess.run(
            [str(FLEETD_BIN / "python"), "-m", "pip", "install", "-q", str(REPO)], check=True
        )
    subprocess.run(
        [
            str(FLEETD_BIN / "python"),
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--force-reinstall",
            str(REPO),
        ],
        check=True,
    )


def compile_bytecode() -> None:
    """Byte-compile fleetd and the benchmark's task modules, as pip does for every peer it
    installs: fleetd runs from an editable install, and with PYTHONDONTWRITEBYTECODE set
    (or a read-only tree) each of its processes would compile its modules at every start."""
    folders = ["supervisor", "worker", "ctl", "bench/tasks"]
    subprocess.run([sys.executable, "-m", "compileall", "-q", *folders], cwd=REPO, check=True)


def fleetd_missing() -> str | None:
    """Why fleetd cannot be benchmarked yet, or None when it can."""
    if not (FLEETD_BIN / "fleetd").exists():
        return f"fleetd not installed ({FLEETD_BIN / 'fleetd'} missing)"
    check = subprocess.run(
        [str(FLEETD_BIN / "python"), "-c", "from worker import Client, task"],
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


def versions(redis_version: str, peers: list[str]) -> dict[str, str]:
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
