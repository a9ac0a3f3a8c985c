"""fleetd's version, as the installed distribution says it (both command lines' --version)."""

from __future__ import annotations


def version() -> str:
    """The installed distribution's version; "unknown" for a source tree not installed."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("fleetd")
    except PackageNotFoundError:
        return "unknown"
