"""Handing the memory the arbiter freed back to the system."""

from __future__ import annotations

import ctypes  # loaded anyway: worker.tree calls prctl through it


def release_free_heap() -> None:
    """Return the free parts of the C heap to the system (glibc's malloc_trim; elsewhere
    nothing). Booting a fleet (the imports, the config, the control plane) frees about a
    MiB that glibc keeps mapped: the arbiter then holds that much less, for good, while it
    idles. Called once the fleet is ready, at start and after a reload."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except AttributeError:  # not glibc (musl has no malloc_trim)
        return
    trim(0)
