"""Detection: calls rebuilt from reports, sliding event-time windows, YAML rules, alerts.

The hot path (`COMPILED`) is compiled by mypyc when `make setup` installs the engine
(setup.py): the same source, about twice as fast. Where it could not be compiled it
runs as Python. setup.py records the SHA-256 of each source it compiled; if any of
them has changed since (an edit without `make setup`), or only some were compiled,
all of them run from their source here rather than compiled code that no longer says
what the source says (a warning in the log tells which).
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

COMPILED = ("windows", "calls", "evaluate", "pipeline")
RECORD = "_compiled.sha256"

_FOLDER = Path(__file__).resolve().parent
_EXTENSION_SUFFIXES = tuple(importlib.machinery.EXTENSION_SUFFIXES)


def source_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def compiled_modules(folder: Path = _FOLDER) -> list[str]:
    """The modules of `COMPILED` that have a compiled file beside their source."""
    return [
        name
        for name in COMPILED
        if any((folder / f"{name}{suffix}").exists() for suffix in _EXTENSION_SUFFIXES)
    ]


def stale_reason(folder: Path = _FOLDER) -> str | None:
    """Why the compiled modules must not be used (None: none are compiled, or all are,
    from the sources as they are now)."""
    compiled = compiled_modules(folder)
    if not compiled:
        return None
    if len(compiled) < len(COMPILED):
        missing = ", ".join(sorted(set(COMPILED) - set(compiled)))
        return f"only some are compiled ({missing} is not)"
    try:
        lines = (folder / RECORD).read_text(encoding="ascii").splitlines()
        recorded = dict(line.split()[::-1] for line in lines if line.strip())
    except (OSError, ValueError, UnicodeDecodeError):
        return f"no readable record of what was compiled ({RECORD})"
    changed = [
        f"{name}.py"
        for name in COMPILED
        if recorded.get(f"{name}.py") != source_digest(folder / f"{name}.py")
    ]
    if changed:
        return f"{', '.join(changed)} changed since compiled"
    return None


class _FromSource(importlib.abc.MetaPathFinder):
    """Finds the `COMPILED` modules as their .py sources, ahead of the compiled files."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        package, _, name = fullname.rpartition(".")
        if package != __name__ or name not in COMPILED:
            return None
        return importlib.util.spec_from_file_location(fullname, _FOLDER / f"{name}.py")


_reason = stale_reason()
if os.environ.get("CALLSENTRY_DETECTION_AS_PYTHON", "") not in ("", "0"):
    # Asked for (a profiler or debugger wants the Python lines): no warning.
    sys.meta_path.insert(0, _FromSource())
elif _reason is not None:
    logging.getLogger(__name__).warning(
        "compiled detection not used: %s; running it as Python (slower) until `make setup` "
        "compiles it again",
        _reason,
    )
    sys.meta_path.insert(0, _FromSource())
