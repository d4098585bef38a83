"""Detection: calls rebuilt from reports, sliding event-time windows, YAML rules, alerts.

The hot path (`COMPILED`: the detection's modules, the caller model's per-caller state
and the menu model's window of calls, which the models layer keeps beside its models)
is compiled by mypyc when `make
setup` installs the engine (setup.py): the same source, about twice as fast. Where it
could not be compiled it runs as Python. setup.py records the SHA-256 of each source
it compiled; if any of them has changed since (an edit without `make setup`), or only
some were compiled, all of them run from their source here rather than compiled code
that no longer says what the source says (a warning in the log tells which).
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

# The compiled sources, from the project's root (setup.py, the Makefile and pyproject's
# doctest ignores name the same).
COMPILED = (
    "engine/detect/windows.py",
    "engine/detect/calls.py",
    "engine/detect/fields.py",
    "engine/detect/aggregates.py",
    "engine/detect/evaluate.py",
    "engine/detect/pipeline.py",
    "engine/detect/conduct.py",
    "models/caller_state.py",
    "models/menu_traffic.py",
)
# Beside this file, written by setup.py: `<sha256>  <source>` for each of COMPILED.
RECORD = "engine/detect/_compiled.sha256"

_ROOT = Path(__file__).resolve().parent.parent.parent
_EXTENSION_SUFFIXES = tuple(importlib.machinery.EXTENSION_SUFFIXES)


def module_name(source: str) -> str:
    """`engine/detect/windows.py` -> `engine.detect.windows`."""
    return source.removesuffix(".py").replace("/", ".")


_MODULES = {module_name(source): source for source in COMPILED}


def source_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def compiled_modules(root: Path = _ROOT) -> list[str]:
    """The sources of `COMPILED` that have a compiled file beside them."""
    return [
        source
        for source in COMPILED
        if any((root / source).with_suffix(suffix).exists() for suffix in _EXTENSION_SUFFIXES)
    ]


def stale_reason(root: Path = _ROOT) -> str | None:
    """Why the compiled modules must not be used (None: none are compiled, or all are,
    from the sources as they are now)."""
    compiled = compiled_modules(root)
    if not compiled:
        return None
    if len(compiled) < len(COMPILED):
        missing = ", ".join(sorted(set(COMPILED) - set(compiled)))
        return f"only some are compiled ({missing} is not)"
    try:
        lines = (root / RECORD).read_text(encoding="ascii").splitlines()
        recorded = dict(line.split()[::-1] for line in lines if line.strip())
    except (OSError, ValueError, UnicodeDecodeError):
        return f"no readable record of what was compiled ({RECORD})"
    changed = [
        source for source in COMPILED if recorded.get(source) != source_digest(root / source)
    ]
    if changed:
        return f"{', '.join(changed)} changed since compiled"
    return None


class _FromSource(importlib.abc.MetaPathFinder):
    """Finds the `COMPILED` modules as their .py sources, ahead of the compiled files.
    (models/__init__.py imports this package first, so the finder is in place before
    the models' compiled module is looked for.)"""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        source = _MODULES.get(fullname)
        if source is None:
            return None
        return importlib.util.spec_from_file_location(fullname, _ROOT / source)


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
