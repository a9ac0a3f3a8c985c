"""fleetd's version, as the installed distribution says it (both command lines' --version)."""

from __future__ import annotations

import argparse
from typing import Any


def version() -> str:
    """The installed distribution's version; "unknown" for a source tree not installed."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("fleetd")
    except PackageNotFoundError:
        return "unknown"


class VersionAction(argparse.Action):
    """`--version`: looks the version up only when asked. importlib.metadata and the search of
    the installed distributions cost ~30 ms and ~2 MiB, which every start of fleetctl and the
    arbiter's whole life would otherwise pay."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, help="print the version and exit")

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> None:
        print(f"{parser.prog} {version()}")
        parser.exit()
