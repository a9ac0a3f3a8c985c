"""Importing a fleet's task modules: in a worker at boot, and in a probe for `fleetd check`.

The probe (`python -P -m worker.imports PYTHONPATH_JSON MODULES_JSON`) imports the modules
exactly as a worker does, in a process of its own, and prints one JSON line: `{"ok": true}`
(with `"registered"`, the task names they registered)
or `{"module", "file", "line", "error"}` naming the first module that failed and where.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import traceback
from typing import Any

# `python -P`: the folder a worker starts in is not put first on sys.path, so a project's own
# `worker.py` there cannot stand in for fleetd's worker package (Python 3.11+).
SAFE_PATH = ("-P",) if sys.version_info >= (3, 11) else ()


class TaskImportError(Exception):
    """A task module failed to import: one line naming the module, where, and the error."""


def import_modules(pythonpath: list[str], modules: list[str]) -> None:
    """Import a fleet's task modules, its folders first on sys.path; TaskImportError for the
    first that fails, whatever it raised."""
    prepend_paths(pythonpath)
    for module in modules:
        try:
            importlib.import_module(module)
        except BaseException as exc:  # noqa: BLE001 - sys.exit() at an import is a failure too
            raise TaskImportError(describe_failure(import_failure(module, exc))) from exc


def describe_failure(failure: dict[str, Any]) -> str:
    """An `import_failure` as one line."""
    where = f"{failure.get('file')}:{failure.get('line')}" if failure.get("file") else "?"
    return f"module {failure.get('module')!r} failed to import ({where}): {failure.get('error')}"


def prepend_paths(pythonpath: list[str]) -> None:
    """Put the fleet's folders first on sys.path, in their order."""
    for path in reversed(pythonpath):
        if path not in sys.path:
            sys.path.insert(0, path)


# fleetd's own packages: an import that fails in them (a @task option refused) is named by
# the line of the task module that called them.
FLEETD_CODE = tuple(
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), package, "")
    for package in ("worker", "supervisor", "ctl", "fleetd")
)


def import_failure(module: str, exc: BaseException) -> dict[str, Any]:
    """Where an import failed: the innermost frame of the fleet's own code (not fleetd's),
    or the file that did not compile."""
    if isinstance(exc, SyntaxError):
        return {"module": module, "file": exc.filename, "line": exc.lineno, "error": _one(exc)}
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [
        f
        for f in frames
        if "importlib" not in f.filename and not os.path.abspath(f.filename).startswith(FLEETD_CODE)
    ]
    where = ours[-1] if ours else (frames[-1] if frames else None)
    return {
        "module": module,
        "file": where.filename if where else None,
        "line": where.lineno if where else None,
        "error": _one(exc),
    }


def _one(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text.splitlines()[0] if text.strip() else type(exc).__name__


def probe(pythonpath: list[str], modules: list[str]) -> dict[str, Any]:
    """Import `modules` as a worker does; the first failure, or ok."""
    prepend_paths(pythonpath)
    for module in modules:
        try:
            importlib.import_module(module)
        except BaseException as exc:  # noqa: BLE001 - whatever a module raises is the verdict
            return import_failure(module, exc)
    from .task import REGISTRY  # here: the arbiter imports this module for SAFE_PATH alone

    return {"ok": True, "registered": sorted(REGISTRY)}


if __name__ == "__main__":
    verdict = probe(json.loads(sys.argv[1]), json.loads(sys.argv[2]))
    sys.stdout.flush()
    print(json.dumps(verdict), flush=True)
