"""Network namespaces for multi-host tests: each fleet host in its own, tied to the root by a veth.

Host i gets namespace `fltd-<tag>-<i>` and a veth pair whose root end is 10.213.N.1/24
and whose namespace end is 10.213.N.2/24, N a subnet no interface of the machine uses.
Nothing is routed beyond these pairs: a namespace reaches the root namespace's end of
its own pair and nothing else, and the root namespace reaches each host only through
its pair. `hosts(n)` makes them and removes them all at the end, also when the test
fails; `Namespace.power_off` SIGKILLs every process inside one, by pid.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

SUBNET = "10.213.{}"  # a private range used only on the pairs made here
COMMAND_TIMEOUT = 10.0


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", *args], capture_output=True, text=True, check=check, timeout=COMMAND_TIMEOUT
    )


def require_netns() -> None:
    """Fail under CI (CI=true) when namespaces cannot be made here (not root), skip elsewhere."""
    probe = f"fltd-probe-{uuid.uuid4().hex[:6]}"
    try:
        made = ip("netns", "add", probe, check=False)
    except (FileNotFoundError, subprocess.TimeoutExpired) as exc:
        made = subprocess.CompletedProcess([], 1, "", str(exc))
    if made.returncode == 0:
        ip("netns", "del", probe, check=False)
        return
    message = f"cannot make network namespaces (`ip netns add` needs root): {made.stderr.strip()}"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def used_subnets() -> set[int]:
    """The N of every 10.213.N.x address on the machine's interfaces (root namespace)."""
    shown = ip("-o", "-4", "addr", "show").stdout
    return {int(n) for n in re.findall(r"inet 10\.213\.(\d+)\.", shown)}


@dataclass
class Namespace:
    name: str
    root_if: str  # the root namespace's end of the pair
    root_address: str  # where the host reaches the root namespace (Redis)
    address: str  # the host's own address (its control endpoint)

    def command(self, *argv: str) -> list[str]:
        """argv run inside the namespace (`ip netns exec` execs it: the pid is argv's own)."""
        return ["ip", "netns", "exec", self.name, *argv]

    def pids(self) -> list[int]:
        listed = ip("netns", "pids", self.name, check=False).stdout
        return [int(pid) for pid in listed.split()]

    def power_off(self) -> None:
        """SIGKILL every process in the namespace at once, as a power cut would end them."""
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def add(name: str, root_if: str, subnet: int) -> Namespace:
    inner_if = root_if[:-1] + "n"
    prefix = SUBNET.format(subnet)
    ns = Namespace(name, root_if, f"{prefix}.1", f"{prefix}.2")
    ip("netns", "add", name)
    ip("link", "add", root_if, "type", "veth", "peer", "name", inner_if)
    ip("link", "set", inner_if, "netns", name)
    ip("addr", "add", f"{ns.root_address}/24", "dev", root_if)
    ip("link", "set", root_if, "up")
    ip("-n", name, "addr", "add", f"{ns.address}/24", "dev", inner_if)
    ip("-n", name, "link", "set", inner_if, "up")
    ip("-n", name, "link", "set", "lo", "up")
    return ns


def remove(name: str, root_if: str) -> None:
    """Kill what still runs inside, then delete the namespace and the pair (either end does)."""
    listed = ip("netns", "pids", name, check=False).stdout
    for pid in listed.split():
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)
    ip("link", "del", root_if, check=False)
    ip("netns", "del", name, check=False)


@contextlib.contextmanager
def hosts(count: int) -> Iterator[list[Namespace]]:
    """`count` namespaces, each with its own veth pair and subnet; all removed on exit."""
    require_netns()
    tag = uuid.uuid4().hex[:6]
    free = sorted(set(range(1, 255)) - used_subnets())
    subnets = random.sample(free, count)
    made: list[tuple[str, str]] = []
    try:
        namespaces = []
        for i, subnet in enumerate(subnets, 1):
            name, root_if = f"fltd-{tag}-{i}", f"fv{tag}{i}r"
            made.append((name, root_if))
            namespaces.append(add(name, root_if, subnet))
        yield namespaces
    finally:
        for name, root_if in made:
            remove(name, root_if)
